"""The training loop: learning, bitwise determinism, exact resume, checkpoint content, user errors, float64."""

from __future__ import annotations

import math

import numpy as np
import pytest

import hpc_llm
from hpc_llm.checkpoint import find_latest, load_checkpoint
from hpc_llm.data.prepare import prepare
from hpc_llm.errors import UserError
from hpc_llm.train.trainer import Trainer


def run(cfg, resume=None) -> Trainer:
    tr = Trainer(cfg, resume=resume)
    tr.summary = tr.run()
    return tr


# -- learning --------------------------------------------------------------------------------------------------------


def test_loss_falls(make_cfg):
    cfg = make_cfg(**{"train.max_iters": 60, "train.eval_interval": 60, "train.eval_iters": 5})
    tr = run(cfg)
    ev = tr.metrics.eval
    assert ev["step"] == [0, 60]
    uniform = math.log(256)
    # untrained: about the uniform guess; trained: well below it (the corpus has ~2.8 nats/byte unigram entropy)
    assert abs(ev["val_loss"][0] - uniform) < 0.1
    assert ev["val_loss"][-1] < 0.6 * uniform, ev["val_loss"]
    assert ev["train_loss"][-1] < 0.6 * uniform, ev["train_loss"]
    losses = tr.metrics.train["loss"]
    assert len(losses) == 60 and tr.metrics.train["step"] == list(range(1, 61))
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 1.5
    assert tr.summary["step"] == 60 and tr.summary["val_loss"] == ev["val_loss"][-1]


def test_loss_falls_on_embedded_corpus(make_cfg, tmp_path):
    """The quick start's corpus (a slice of the standard library's sources): 40 steps beat the uniform guess."""
    from hpc_llm.data.prepare import prepare_stdlib

    prepare_stdlib(tmp_path / "stdlib", max_bytes=300_000)
    cfg = make_cfg(
        **{
            "data.path": str(tmp_path / "stdlib"),
            "train.max_iters": 40,
            "train.eval_interval": 40,
            "train.eval_iters": 5,
        }
    )
    ev = run(cfg).metrics.eval
    assert ev["val_loss"][-1] < ev["val_loss"][0] - 1.5, ev["val_loss"]


# -- determinism -----------------------------------------------------------------------------------------------------

VARIANTS = {"plain": {}, "dropout": {"model.dropout": 0.1}, "grad_accum": {"train.grad_accum": 2}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_seed_is_bitwise_identical(make_cfg, variant):
    extra = {"train.max_iters": 8, "train.eval_iters": 0, **VARIANTS[variant]}
    a = run(make_cfg("a", **extra))
    b = run(make_cfg("b", **extra))
    c = run(make_cfg("c", **extra, **{"train.seed": 7}))
    la, lb, lc = (t.metrics.train["loss"] for t in (a, b, c))
    assert len(la) == 8
    assert la == lb  # float == float: bitwise for finite values
    assert np.array_equal(a.model.flat, b.model.flat)
    assert np.array_equal(a.opt.m, b.opt.m) and np.array_equal(a.opt.v, b.opt.v)
    assert la != lc
    assert not np.array_equal(a.model.flat, c.model.flat)
    if variant != "plain":
        # the variant really changes the computation, so its determinism is not the plain run's in disguise
        plain = run(make_cfg("plain", **{"train.max_iters": 2, "train.eval_iters": 0}))
        assert plain.metrics.train["loss"][0] != la[0]


# -- exact resume ----------------------------------------------------------------------------------------------------


def _assert_same_state(x: Trainer, y: Trainer) -> None:
    assert x.step == y.step
    for key in ("step", "loss", "lr", "grad_norm"):
        assert x.metrics.train[key] == y.metrics.train[key], key
    assert x.model.flat.dtype == y.model.flat.dtype
    assert np.array_equal(x.model.flat, y.model.flat)
    assert np.array_equal(x.opt.m, y.opt.m)
    assert np.array_equal(x.opt.v, y.opt.v)
    assert x.opt.t == y.opt.t


@pytest.mark.parametrize(
    "k, extra",
    [
        (
            6,
            {"model.dropout": 0.1},
        ),  # k a multiple of eval_interval: the eval at k is not repeated on resume
        (
            7,
            {"model.dropout": 0.1, "train.grad_accum": 2},
        ),  # k between evals: the first run's final eval is extra
    ],
)
def test_exact_resume(make_cfg, k, extra):
    N = 14
    common = {"train.eval_interval": 3, "train.eval_iters": 2, **extra}
    full = run(make_cfg("full", **common, **{"train.max_iters": N}))
    first = run(make_cfg("split", **common, **{"train.max_iters": k}))
    assert first.step == k
    ckpt_path = first.summary["checkpoint"]
    second = run(make_cfg("split", **common, **{"train.max_iters": N}), resume=ckpt_path)
    assert second.metrics.train["loss"][:k] == first.metrics.train["loss"]
    _assert_same_state(full, second)
    # evals inside the resumed range (9 and 12) and at the end give the same numbers as the uninterrupted run
    ev_full, ev_res = full.metrics.eval, second.metrics.eval
    expected_steps = sorted(set(ev_full["step"]) | {k})
    assert ev_res["step"] == expected_steps
    assert [s for s in ev_res["step"] if s > k] == [9, 12, 14]
    by_step = {
        s: (tl, vl)
        for s, tl, vl in zip(ev_full["step"], ev_full["train_loss"], ev_full["val_loss"])
    }
    for s, tl, vl in zip(ev_res["step"], ev_res["train_loss"], ev_res["val_loss"]):
        if s in by_step:
            assert (tl, vl) == by_step[s], s
    assert second.summary["val_loss"] == full.summary["val_loss"]


def test_resume_auto_takes_newest_and_empty_dir_starts_fresh(make_cfg):
    extra = {"train.eval_iters": 0, "checkpoint.interval": 3, "model.dropout": 0.1}
    first = run(make_cfg("run", **extra, **{"train.max_iters": 6}))
    assert find_latest(first.out_dir).name == "ckpt_00000006.h5"
    assert (first.out_dir / "ckpt_00000003.h5").is_file()

    resumed = Trainer(make_cfg("run", **extra, **{"train.max_iters": 9}), resume="auto")
    assert resumed.step == 6
    _assert_same_state(first, resumed)
    (
        first.out_dir / "latest"
    ).unlink()  # without the pointer, the newest file by step is still found
    assert Trainer(make_cfg("run", **extra, **{"train.max_iters": 9}), resume="auto").step == 6

    fresh = Trainer(make_cfg("empty", **extra, **{"train.max_iters": 9}), resume="auto")
    scratch = Trainer(make_cfg("scratch", **extra, **{"train.max_iters": 9}))
    assert fresh.step == 0 and fresh.opt.t == 0
    assert fresh.metrics.train["loss"] == []
    assert np.array_equal(fresh.model.flat, scratch.model.flat)
    assert not fresh.opt.m.any() and not fresh.opt.v.any()


# -- checkpoint content ----------------------------------------------------------------------------------------------


def test_checkpoint_content_and_load_model(make_cfg):
    cfg = make_cfg(**{"train.max_iters": 5, "train.eval_interval": 2, "train.eval_iters": 2})
    assert cfg.model.vocab_size == 0  # to be resolved from the data
    tr = run(cfg)
    path = tr.summary["checkpoint"]
    saved = load_checkpoint(path)
    assert saved.state["step"] == 5
    assert saved.config["model"]["vocab_size"] == 256
    assert saved.config["train"]["max_iters"] == 5
    assert saved.config["model"]["n_embd"] == 32
    for table in ("train", "eval"):
        for key, values in getattr(tr.metrics, table).items():
            assert np.array_equal(
                saved.metrics[table][key], np.asarray(values, dtype=np.float64)
            ), (table, key)
    assert list(saved.metrics["train"]["step"]) == [1, 2, 3, 4, 5]
    assert list(saved.metrics["eval"]["step"]) == [0, 2, 4, 5]
    for name, p in tr.model.params.items():
        assert np.array_equal(saved.params[name], p), name

    model = hpc_llm.load_model(path)
    assert model.cfg.vocab_size == 256 and model.flat.dtype == np.float32
    x, y = tr.batch(tr.val_tokens, 3, 0, 1)
    expected = tr.model.loss(x, y)
    assert model.loss(x, y) == expected
    assert math.isfinite(expected) and expected < math.log(256)


# -- user errors -----------------------------------------------------------------------------------------------------


def test_resume_with_different_model_shape(make_cfg):
    first = run(make_cfg(**{"train.max_iters": 2, "train.eval_iters": 0}))
    cfg = make_cfg(**{"train.max_iters": 4, "train.eval_iters": 0, "model.n_embd": 64})
    with pytest.raises(UserError, match=r"model\.n_embd") as e:
        Trainer(cfg, resume=first.summary["checkpoint"])
    assert "32" in str(e.value) and "64" in str(e.value)


def test_vocab_size_smaller_than_data(make_cfg):
    cfg = make_cfg(**{"model.vocab_size": 100})
    with pytest.raises(UserError, match=r"model\.vocab_size=100") as e:
        Trainer(cfg)
    assert "256" in str(e.value)


@pytest.mark.parametrize("n_chars, split, n_tokens", [(12, "train", 10), (100, "val", 10)])
def test_corpus_smaller_than_block(make_cfg, tmp_path, n_chars, split, n_tokens):
    src = tmp_path / "small.txt"
    src.write_text("x" * n_chars)
    meta = prepare([src], tmp_path / "small", tokenizer="byte", val_fraction=0.1)
    assert meta[f"n_{split}"] == n_tokens
    cfg = make_cfg(**{"data.path": str(tmp_path / "small")})
    with pytest.raises(UserError, match=split) as e:
        Trainer(cfg)
    msg = str(e.value)
    assert str(n_tokens) in msg and "17" in msg and "block_size" in msg


def test_missing_data_path(make_cfg, tmp_path):
    missing = tmp_path / "no_such_data"
    with pytest.raises(UserError, match="no_such_data"):
        Trainer(make_cfg(**{"data.path": str(missing)}))
    assert not (tmp_path / "run").exists()  # nothing created before the inputs were checked


# -- float64 ---------------------------------------------------------------------------------------------------------


def test_float64_training(make_cfg):
    extra = {"train.max_iters": 4, "train.eval_iters": 0}
    t32 = run(make_cfg("f32", **extra))
    t64 = run(make_cfg("f64", **extra, **{"model.dtype": "float64"}))
    assert t64.model.flat.dtype == np.float64 and t64.opt.m.dtype == np.float64
    assert t32.model.flat.dtype == np.float32
    l32, l64 = t32.metrics.train["loss"], t64.metrics.train["loss"]
    assert all(math.isfinite(v) for v in l64)
    assert abs(l64[0] - l32[0]) < 1e-5
    assert l64[-1] < l64[0]
    saved = load_checkpoint(t64.summary["checkpoint"])
    assert saved.params["wte.weight"].dtype == np.float64
