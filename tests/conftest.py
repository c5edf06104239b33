"""Shared fixtures: a small generated corpus, its prepared token directory, and tiny model/run configs."""

from __future__ import annotations

import random

import pytest

from hpc_llm.config import Config, validate
from hpc_llm.data import prepare


def make_corpus(n_bytes: int = 6000, seed: int = 0) -> str:
    """Repetitive but not trivial English-like text: random subject-verb-object sentences (about 2.8 nats/byte
    unigram entropy, far below ln 256, so a model that learns anything at all beats the uniform guess)."""
    r = random.Random(seed)
    subj = ["the cat", "a dog", "my friend", "the old man", "every bird", "her brother"]
    verb = ["sees", "likes", "chases", "finds", "calls", "feeds"]
    obj = ["the ball", "a red fish", "some bread", "the moon", "two mice", "his hat"]
    out, size = [], 0
    while size < n_bytes:
        line = f"{r.choice(subj)} {r.choice(verb)} {r.choice(obj)}.\n"
        out.append(line)
        size += len(line)
    return "".join(out)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus())
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_file):
    """A byte-tokenized data directory (vocab 256, ~5400 train + ~600 val tokens), shared read-only by the tests."""
    out = tmp_path_factory.mktemp("data") / "tokens"
    prepare([corpus_file], out, tokenizer="byte")
    return out


def tiny_config(data_path, out_dir, **overrides) -> Config:
    """A validated tiny run: 2 layers, 2 heads, 32 dim, block 16, batch 4; no peak-FLOP measurement at start.

    overrides: {"section.key": value}, e.g. tiny_config(d, o, **{"model.dropout": 0.1, "train.max_iters": 5}).
    """
    cfg = Config()
    m, t = cfg.model, cfg.train
    m.n_layer, m.n_head, m.n_embd, m.block_size = 2, 2, 32, 16
    cfg.data.path = str(data_path)
    t.batch_size = 4
    t.max_iters = 10
    t.lr, t.min_lr = 1e-2, 1e-3
    t.warmup_iters, t.lr_decay_iters = 3, 60
    t.eval_interval, t.eval_iters = 1000, 2
    t.log_interval = 1000
    t.peak_tflops = 1.0
    t.out_dir = str(out_dir)
    for key, value in overrides.items():
        section, name = key.split(".")
        sub = getattr(cfg, section)
        assert hasattr(sub, name), key  # a typo in a test must not pass silently
        setattr(sub, name, value)
    validate(cfg)
    return cfg


@pytest.fixture
def make_cfg(data_dir, tmp_path):
    """make_cfg(out="run", **{"train.max_iters": 5}) -> a tiny Config writing under tmp_path/out."""

    def make(out: str = "run", **overrides) -> Config:
        return tiny_config(data_dir, tmp_path / out, **overrides)

    return make
