"""Incremental decoding with the KV cache, and `generate`'s sampling semantics."""

from __future__ import annotations

import numpy as np
import pytest

from hpc_llm.config import ModelConfig
from hpc_llm.errors import UserError
from hpc_llm.generate import generate
from hpc_llm.model.gpt import GPT, KVCache

SHAPES = [  # (n_layer, n_head, n_embd, block_size, vocab_size)
    (1, 1, 8, 12, 17),
    (2, 3, 24, 16, 50),
    (3, 2, 16, 10, 64),
    (2, 4, 32, 20, 70),
]


def random_model(shape, dtype="float64", seed=0, std=0.5, pos_scale=1.0) -> GPT:
    """A model with every parameter (LayerNorm gains and biases included) random and large enough that attention
    is far from uniform and logits spread over several units. pos_scale > 1 makes the position embedding dominate,
    so greedy decoding does not collapse onto one token and its output depends on the positions used."""
    n_layer, n_head, n_embd, block_size, vocab = shape
    cfg = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab,
                      dtype=dtype)
    model = GPT(cfg, seed=None)
    rng = np.random.default_rng(seed)
    model.flat[:] = (rng.standard_normal(model.num_params) * std).astype(model.dtype)
    model.params["wpe.weight"][...] *= pos_scale
    return model


def incremental_logits(model: GPT, idx: np.ndarray, first: int) -> np.ndarray:
    """Logits for all of idx via the cache: a chunk of `first` tokens, then one at a time, then a chunk of 3."""
    B, T = idx.shape
    cache = KVCache(model, B)
    parts = [model.forward_cached(idx[:, :first], cache)]
    for t in range(first, T - 3):
        parts.append(model.forward_cached(idx[:, t:t + 1], cache))
        assert cache.length == t + 1
    parts.append(model.forward_cached(idx[:, T - 3:], cache))
    assert cache.length == T
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}H{}C{}T{}V{}".format(*s))
def test_kv_cache_matches_full_forward(shape, dtype, tol):
    model = random_model(shape, dtype)
    block, vocab = shape[3], shape[4]
    rng = np.random.default_rng(1)
    idx = rng.integers(0, vocab, size=(2, block))
    full = model.logits(idx)
    assert full.shape == (2, block, vocab)
    assert np.ptp(full) > 1.0  # nontrivial logits, so a tolerance of 1e-5 means something
    for first in (1, 4):
        inc = incremental_logits(model, idx, first)
        assert inc.shape == full.shape and inc.dtype == model.dtype
        np.testing.assert_allclose(inc, full, rtol=0, atol=tol)
    # a cache that is full refuses more tokens rather than overwrite
    cache = KVCache(model, 2)
    model.forward_cached(idx, cache)
    with pytest.raises(UserError, match="block_size"):
        model.forward_cached(idx[:, :1], cache)


def test_kv_cache_detects_a_wrong_cache():
    """The comparison above can fail: a cache holding another prefix gives different logits."""
    model = random_model(SHAPES[1])
    rng = np.random.default_rng(2)
    idx = rng.integers(0, 50, size=(1, 8))
    other = idx.copy()
    other[0, 2] = (other[0, 2] + 1) % 50
    cache = KVCache(model, 1)
    model.forward_cached(other[:, :5], cache)
    wrong = model.forward_cached(idx[:, 5:], cache)
    assert np.abs(wrong - model.logits(idx)[:, 5:]).max() > 1e-3


# -- generate --------------------------------------------------------------------------------------------------------


def reference_greedy(model: GPT, prompt: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Argmax decoding by full forwards (no cache), over the same context window generate uses: the last block_size
    tokens of the prompt; when that window is full after a token is chosen, it restarts from the last
    block_size // 2 tokens (the new one included) and grows again."""
    T = model.cfg.block_size
    out = [list(row) for row in np.asarray(prompt)]
    start = max(0, len(out[0]) - T)
    for _ in range(max_new_tokens):
        window = np.array([row[start:] for row in out])
        assert window.shape[1] <= T
        nxt = model.logits(window)[:, -1].argmax(axis=-1)
        for row, t in zip(out, nxt):
            row.append(int(t))
        if window.shape[1] == T:
            start = len(out[0]) - T // 2
    return np.array(out)


@pytest.mark.parametrize("shape, prompt_len, max_new", [
    (SHAPES[0], 3, 30),  # past block_size 12: the window restarts twice
    (SHAPES[1], 5, 40),  # block 16: the window restarts from 8 tokens, several times
    (SHAPES[2], 13, 12),  # prompt longer than block_size 10: only its last 10 tokens are context
    (SHAPES[3], 1, 6),  # never reaches block_size
])
def test_greedy_equals_full_forward_argmax(shape, prompt_len, max_new):
    model = random_model(shape, "float64", seed=3, pos_scale=6.0)
    vocab = shape[4]
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, vocab, size=(2, prompt_len))
    out = generate(model, prompt, max_new, temperature=0)
    assert out.shape == (2, prompt_len + max_new)
    assert np.array_equal(out[:, :prompt_len], prompt)
    assert out.min() >= 0 and out.max() < vocab
    ref = reference_greedy(model, prompt, max_new)
    assert np.array_equal(out, ref)
    assert len(np.unique(out[:, prompt_len:])) > 1  # not a degenerate constant output
    # top_k = 1 samples from a one-hot distribution: greedy again, whatever the temperature
    assert np.array_equal(generate(model, prompt, max_new, temperature=1.0, top_k=1, seed=9), ref)


def test_greedy_reference_would_notice_a_different_window():
    """The window semantics matter: a reference that slides the last block_size tokens disagrees past block_size
    (so the equality above really checks the restart rule)."""
    model = random_model(SHAPES[0], "float64", seed=3, pos_scale=6.0)
    prompt = np.random.default_rng(4).integers(0, 17, size=(2, 3))
    T = model.cfg.block_size
    out = [list(r) for r in prompt]
    for _ in range(30):
        nxt = model.logits(np.array([r[-T:] for r in out]))[:, -1].argmax(axis=-1)
        for r, t in zip(out, nxt):
            r.append(int(t))
    sliding = np.array(out)
    ours = generate(model, prompt, 30, temperature=0)
    assert np.array_equal(ours[:, :T + 1], sliding[:, :T + 1])  # the same until the window first fills
    assert not np.array_equal(ours, sliding)


def test_sampling_is_seeded():
    model = random_model(SHAPES[1], "float32", seed=5)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    a = generate(model, prompt, 25, temperature=1.0, seed=11)
    b = generate(model, prompt, 25, temperature=1.0, seed=11)
    c = generate(model, prompt, 25, temperature=1.0, seed=12)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.array_equal(a[:, :3], prompt) and a.max() < 50
    k = generate(model, prompt, 25, temperature=1.0, top_k=3, seed=11)
    assert np.array_equal(k, generate(model, prompt, 25, temperature=1.0, top_k=3, seed=11))


@pytest.mark.parametrize("bad", [50, 1000, -1])
def test_out_of_vocab_prompt(bad):
    model = random_model(SHAPES[1], "float32")
    prompt = np.array([[1, bad, 3]])
    with pytest.raises(UserError, match=f"token id {bad}"):
        generate(model, prompt, 5, temperature=0)


def test_bad_sampling_arguments():
    model = random_model(SHAPES[0], "float32")
    prompt = np.array([[1, 2]])
    with pytest.raises(UserError, match="temperature"):
        generate(model, prompt, 3, temperature=-1.0)
    with pytest.raises(UserError, match="top-k"):
        generate(model, prompt, 3, top_k=0)
    with pytest.raises(UserError, match="prompt"):
        generate(model, np.zeros((1, 0), dtype=np.int64), 3)
