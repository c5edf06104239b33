"""Incremental decoding with the KV cache, and `generate`'s sampling semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import random_model

from hpc_llm.errors import UserError
from hpc_llm.infer.generate import generate, sample_next
from hpc_llm.model.gpt import GPT
from hpc_llm.model.kv_cache import KVCache

SHAPES = [  # (n_layer, n_head, n_embd, block_size, vocab_size)
    (1, 1, 8, 12, 17),
    (2, 3, 24, 16, 50),
    (3, 2, 16, 10, 64),
    (2, 4, 32, 20, 70),
]


def incremental_logits(model: GPT, idx: np.ndarray, first: int) -> np.ndarray:
    """Logits for all of idx via the cache: a chunk of `first` tokens, then one at a time, then a chunk of 3."""
    B, T = idx.shape
    cache = KVCache(model, B)
    parts = [model.forward_cached(idx[:, :first], cache)]
    for t in range(first, T - 3):
        parts.append(model.forward_cached(idx[:, t : t + 1], cache))
        assert cache.length == t + 1
    parts.append(model.forward_cached(idx[:, T - 3 :], cache))
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


@pytest.mark.parametrize(
    "shape, prompt_len, max_new",
    [
        (SHAPES[0], 3, 30),  # past block_size 12: the window restarts twice
        (SHAPES[1], 5, 40),  # block 16: the window restarts from 8 tokens, several times
        (
            SHAPES[2],
            13,
            12,
        ),  # prompt longer than block_size 10: only its last 10 tokens are context
        (SHAPES[3], 1, 6),  # never reaches block_size
        (
            (1, 1, 8, 11, 17),
            3,
            30,
        ),  # an odd block_size: the restart keeps 11 // 2 = 5 tokens (not 6)
    ],
)
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
    # the same until the window first fills
    assert np.array_equal(ours[:, : T + 1], sliding[:, : T + 1])
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


# -- sampling semantics: top-k support and the distribution ----------------------------------------------------------
#
# Reference: nanoGPT's sampling. Divide the logits by the temperature; with top-k, set every logit below the k-th
# largest to -inf (ties at the k-th value are all kept); sample from the softmax of what is left.

LOGITS = np.array([0.3, -0.8, 1.5, 0.9, -0.4, 1.2, 0.0, -1.0])  # distinct: the top k is unambiguous
N_DRAWS = 50_000
SE_BOUND = 5.0  # standard errors per category
CHI2_X = 14.0  # Laurent-Massart: P(chi2_df >= df + 2 sqrt(df x) + 2x) <= exp(-x) = 8e-7


def reference_probs(z, temperature: float, top_k: int | None) -> np.ndarray:
    """softmax(z / T) over the top k of z (all of z when top_k is None); 0 elsewhere."""
    z = np.asarray(z, dtype=np.float64) / temperature
    keep = np.ones(z.size, dtype=bool)
    if top_k is not None:
        keep = z >= np.sort(z)[-top_k]
    w = np.where(keep, np.exp(z - z.max()), 0.0)
    return w / w.sum()


def chi2_bound(df: int) -> float:
    """A value a chi-square variable with df degrees of freedom exceeds with probability <= exp(-CHI2_X) (Laurent &
    Massart 2000, Lemma 1)."""
    return df + 2.0 * math.sqrt(df * CHI2_X) + 2.0 * CHI2_X


def pearson(counts, p) -> float:
    """Pearson's statistic of counts against probabilities p, over the categories with p > 0."""
    n, on = counts.sum(), p > 0
    return float(np.sum((counts[on] - n * p[on]) ** 2 / (n * p[on])))


def distribution_problems(counts, p) -> list[str]:
    """Where counts (N draws) disagree with p: a category with p = 0 drawn at all, a category off by more than
    SE_BOUND standard errors sqrt(p(1-p)/N), or Pearson's statistic above chi2_bound(categories - 1)."""
    n = counts.sum()
    freq, on = counts / n, p > 0
    bad = [
        f"token {i} drawn {counts[i]} times, probability 0"
        for i in np.flatnonzero(~on & (counts > 0))
    ]
    se = np.sqrt(p * (1 - p) / n)
    for i in np.flatnonzero(on & (np.abs(freq - p) > SE_BOUND * se)):
        bad.append(
            f"token {i}: frequency {freq[i]:.5f}, probability {p[i]:.5f} ({abs(freq[i] - p[i]) / se[i]:.1f} se)"
        )
    stat, bound = pearson(counts, p), chi2_bound(int(on.sum()) - 1)
    if stat > bound:
        bad.append(f"Pearson statistic {stat:.1f} > {bound:.1f}")
    return bad


@pytest.mark.parametrize(
    "temperature, top_k", [(0.5, None), (2.0, None), (0.7, 3), (1.6, 3), (1.3, 7)]
)
def test_sampling_distribution_matches_softmax(temperature, top_k):
    """N_DRAWS draws (one sample_next call on identical rows) against softmax(z/T), renormalised over the top k:
    every category within 5 standard errors, Pearson's statistic below its chi-square bound, tokens outside the top k
    never drawn. False failure for correct code: per category P(|Z| > 5) = 5.7e-7 (normal approximation; every
    expected count is >= 150), plus 8e-7 for the chi-square bound: < 1e-5 for the test. The seed is fixed.
    Power: the same counts are also tested against the distribution of a plausible slip (temperature ignored, i.e.
    T = 1; with top-k, k+1 tokens kept) and must fail it by far."""
    p = reference_probs(LOGITS, temperature, top_k)
    assert N_DRAWS * p[p > 0].min() >= 150
    draws = sample_next(np.tile(LOGITS, (N_DRAWS, 1)), np.random.default_rng(7), temperature, top_k)
    assert draws.shape == (N_DRAWS,)
    counts = np.bincount(draws, minlength=LOGITS.size)
    assert counts.size == LOGITS.size  # no id outside the vocabulary
    bad = distribution_problems(counts, p)
    assert not bad, "\n".join(bad)
    # power: temperature ignored (T = 1) is far outside the same bound, in expectation (draws from q have a
    # statistic of df + N sum (q-p)^2/p on average) and on these very counts (tested against q)
    q, bound = reference_probs(LOGITS, 1.0, top_k), chi2_bound(int((p > 0).sum()) - 1)
    on = p > 0
    assert N_DRAWS * np.sum((q[on] - p[on]) ** 2 / p[on]) > 5 * bound
    assert pearson(counts, q) > 5 * bound and distribution_problems(counts, q)
    if top_k is not None:
        q = reference_probs(LOGITS, temperature, top_k + 1)
        extra = np.flatnonzero((q > 0) & (p == 0))
        # k+1 kept: that token ~100+ times, here 0
        assert len(extra) == 1 and N_DRAWS * q[extra[0]] > 100
        assert distribution_problems(counts, q)


def test_top_k_support_on_fixed_logits():
    """Every one of N_DRAWS draws is among the k largest logits, for each k, at a high temperature (so the draws
    spread over the whole top k: each of its tokens is drawn); k >= V keeps everything."""
    rows = np.tile(LOGITS, (N_DRAWS // 10, 1))
    order = np.argsort(-LOGITS)
    for k in range(1, LOGITS.size + 2):
        draws = sample_next(rows, np.random.default_rng(k), 5.0, k)
        assert set(draws.tolist()) == set(order[:k].tolist()), k


def test_top_k_keeps_ties_at_the_kth_value():
    """Ties, explicitly: with k = 2 and logits (1, 2, 2, 0.5, 2, 3), the k-th largest is 2 and every token with a logit
    >= 2 is kept (nanoGPT's `logits < v[:, [-1]]` rule): tokens 1, 2, 4, 5 and only they are drawn."""
    z = np.array([1.0, 2.0, 2.0, 0.5, 2.0, 3.0])
    draws = sample_next(np.tile(z, (5000, 1)), np.random.default_rng(3), 1.0, 2)
    assert set(draws.tolist()) == {1, 2, 4, 5}


def context_logits(model: GPT, out: np.ndarray, prompt_len: int) -> list[np.ndarray]:
    """For each generated position of out, the logits of its last context token by a full forward over the window
    generate uses (reference_greedy's rule: the last block_size prompt tokens, restarting from the last
    block_size // 2 tokens when full)."""
    T = model.cfg.block_size
    start, logits = max(0, prompt_len - T), []
    for i in range(prompt_len, out.shape[1]):
        window = out[:, start:i]
        assert window.shape[1] <= T
        logits.append(model.logits(window)[:, -1])
        if window.shape[1] == T:
            start = i + 1 - T // 2
    return logits


def test_top_k_inside_generate_samples_only_the_k_largest():
    """generate on a random model, 24 rows x 40 tokens (past block_size 16: restarts) at temperature 2 with top_k 3:
    every token is among the 3 largest of the logits a full forward gives for its context (no 4th largest is within
    1e-9 of the 3rd, so the cache's rounding cannot reorder the boundary). Power: the draws are not greedy (many are
    not the argmax), and without top-k the same run draws many tokens outside the top 3."""
    shape = SHAPES[1]
    model = random_model(shape, "float64", seed=8)
    prompt = np.random.default_rng(9).integers(0, shape[4], size=(24, 5))
    k, n = 3, 40
    out = generate(model, prompt, n, temperature=2.0, top_k=k, seed=10)
    assert out.shape == (24, 5 + n) and np.array_equal(out[:, :5], prompt)
    outside = not_argmax = 0
    for i, lg in enumerate(context_logits(model, out, 5)):
        tok = out[:, 5 + i]
        srt = np.sort(lg, axis=-1)
        kth, mine = srt[:, -k], lg[np.arange(len(tok)), tok]
        assert (
            kth - srt[:, -k - 1] > 1e-9
        ).all()  # no near-tie at the boundary: the top k is unambiguous
        outside += int(np.sum(mine < kth))
        not_argmax += int(np.sum(tok != lg.argmax(axis=-1)))
    assert outside == 0
    assert not_argmax > 0.3 * out[:, 5:].size
    free = generate(model, prompt, n, temperature=2.0, top_k=None, seed=10)
    free_outside = sum(
        int(np.sum(lg[np.arange(24), free[:, 5 + i]] < np.sort(lg, axis=-1)[:, -k]))
        for i, lg in enumerate(context_logits(model, free, 5))
    )
    assert free_outside > 0.2 * free[:, 5:].size


# -- the number of tokens and the context length ---------------------------------------------------------------------


def spy_positions(model: GPT) -> list[tuple[int, int]]:
    """Wrap model.forward_cached: record (first position, new tokens) of every call, and check that no call reaches
    past block_size (positions stay < block_size, so does the cache)."""
    calls = []
    forward_cached = model.forward_cached
    T = model.cfg.block_size

    def spy(idx, cache, **kw):
        calls.append((cache.length, idx.shape[1]))
        assert cache.length + idx.shape[1] <= T, (
            f"positions {cache.length}..{cache.length + idx.shape[1] - 1}"
        )
        logits = forward_cached(idx, cache, **kw)
        assert cache.length <= T
        return logits

    model.forward_cached = spy
    return calls


# block_size 12: a prompt shorter, equal to and longer
@pytest.mark.parametrize("prompt_len", [1, 5, 12, 20])
@pytest.mark.parametrize("max_new", [0, 1, 7, 40])
def test_new_token_count_and_context_length(prompt_len, max_new):
    """generate returns the prompt followed by exactly max_new_tokens ids (0 included; 40 is past block_size 12),
    sampled or greedy; the model never sees more than block_size positions: every forward_cached call stays below
    position block_size, the prompt's context is its last block_size tokens, and the window restarts from block_size
    // 2 tokens at position 0."""
    model = random_model(SHAPES[0], "float64", seed=3)
    T, vocab = model.cfg.block_size, SHAPES[0][4]
    prompt = np.random.default_rng(prompt_len).integers(0, vocab, size=(3, prompt_len))
    for temperature, top_k in ((0.0, None), (1.0, None), (0.8, 4)):
        calls = spy_positions(model)
        out = generate(model, prompt, max_new, temperature=temperature, top_k=top_k, seed=1)
        del model.forward_cached
        assert out.shape == (3, prompt_len + max_new)
        assert np.array_equal(out[:, :prompt_len], prompt)
        assert out.min() >= 0 and out.max() < vocab
        assert calls[0] == (0, min(prompt_len, T))  # the prompt, truncated to the context length
        for (pos, n), nxt in zip(calls, calls[1:]):
            # each step appends one token at the next position; only a full cache restarts, from T // 2 tokens at 0
            assert nxt == ((0, T // 2) if pos + n == T else (pos + n, 1)), calls
        assert max(pos + n for pos, n in calls) <= T
        assert len(calls) >= max_new  # a forward for every token drawn after the first
