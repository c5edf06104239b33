"""Inference: batched prompts of mixed lengths, sampling over vocabulary shards (tensor parallelism), int8 weights,
and `hpc-llm eval`.

References and bounds:
- batched = unbatched: the same float64 model decodes each prompt alone and inside a batch of prompts of other
  lengths; the tokens must be equal and the logits of every step within 1e-10 (they differ only by the rounding of
  attention sums over a different number of masked, exactly-zero terms and BLAS blocking: ~1e-15 measured).
- TP = single process (2 and 4 ranks, float64): the logits within 1e-10 (sums over shards reorder a few float64
  additions), the greedy tokens equal, and the sampled tokens equal for temperature / top-k / top-p: the schemes
  in hpc_llm/infer/generate.py are exact, so a draw could differ only if a uniform or a nucleus boundary fell within
  ~1e-15 of a cumulative sum: with a few thousand draws here the chance is ~1e-11.
- int8: dequantized weights within scale / 2 of the originals (round to nearest); the int8 layers compute exactly
  x @ (q s) (checked against the float model given the dequantized weights, 1e-5 relative: float32 rounding); the
  error of one layer is bounded by |x (W - q s)|_j <= s_j / 2 * sum_i |x_i| (checked for a linear and the head).
- eval: the mean loss over the windows equals a float64 reference from model.forward on each window separately,
  weighted by tokens (1e-12 relative), and is the same at tp 2 / 4 (1e-10).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import check, count_reads, mpiexec, random_model, write_run_config
from mpi4py import MPI

import hpc_llm.infer.generate as G
from hpc_llm.errors import UserError
from hpc_llm.infer.evaluate import batches, evaluate, windows
from hpc_llm.infer.quantize import QuantizedWeight, quantize_model, weight_bytes
from hpc_llm.model.gpt import GPT
from hpc_llm.model.kv_cache import KVCache
from hpc_llm.parallel.comm import Comm
from hpc_llm.parallel.grid import make_grid

SOLO = Comm(None)
# n_layer, n_head, n_embd, block_size, vocab (padded to 128: 58 padding columns)
SHAPE = (2, 4, 32, 16, 70)


def record_logits(monkeypatch) -> list:
    """Wrap generate's sampler: every step's logits (B, V) it is given are appended to the list returned."""
    seen = []
    original = G.sample_sharded

    def spy(logits, *a, **kw):
        seen.append(np.array(logits))
        return original(logits, *a, **kw)

    monkeypatch.setattr(G, "sample_sharded", spy)
    return seen


# -- batched prompts of different lengths ----------------------------------------------------------------------------


# 30: every prompt's context overflows block_size 16 (restarts)
@pytest.mark.parametrize("max_new", [6, 30])
def test_batched_prompts_equal_unbatched(monkeypatch, max_new):
    model = random_model(SHAPE, "float64", seed=3, pos_scale=6.0)
    rng = np.random.default_rng(5)
    # 20 > block_size: its last 16
    prompts = [rng.integers(0, SHAPE[4], size=n) for n in (1, 7, 3, 16, 20, 12)]
    seen = record_logits(monkeypatch)
    alone = []
    for p in prompts:
        seen.clear()
        alone.append(
            (G.generate_batch(model, [p], max_new, temperature=0)[0], np.concatenate(seen))
        )
    seen.clear()
    together = G.generate_batch(model, prompts, max_new, temperature=0)
    steps = np.stack(seen)  # (max_new, B, V)
    assert steps.shape == (max_new, len(prompts), 128)
    for b, (tokens, logits) in enumerate(alone):
        assert np.array_equal(together[b], tokens), b
        err = np.abs(steps[:, b, : SHAPE[4]] - logits[:, : SHAPE[4]]).max()
        assert err <= 1e-10, (b, err)
        # the padded vocabulary is never a candidate
        assert np.all(np.isneginf(steps[:, b, SHAPE[4] :]))
    assert len({tuple(t) for t in together}) > 1
    # sampled: each prompt draws from its own stream, so batching does not change what it gets
    kw = dict(temperature=1.3, top_k=9, top_p=0.9, seed=4)
    one_by_one = [
        G.generate_batch(model, [p], max_new, indices=[i], **kw)[0] for i, p in enumerate(prompts)
    ]
    assert all(
        np.array_equal(a, b)
        for a, b in zip(one_by_one, G.generate_batch(model, prompts, max_new, **kw))
    )
    results = G.generate_prompts(model, prompts, max_new, batch_size=4, **kw)
    assert [r["tokens"] for r in results] == [list(t) for t in one_by_one]


def test_kv_pool_holds_one_buffer():
    """Rows overflowing block_size at different steps (2 rows at once, then single rows) rebuild in caches of
    several row counts; afterwards the model's pool holds one buffer, the size of the whole batch's cache, and a
    smaller batch runs in that same buffer."""
    model = random_model(SHAPE, "float64", seed=3, pos_scale=6.0)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, SHAPE[4], size=n) for n in (1, 7, 3, 16, 20, 12)]
    G.generate_batch(model, prompts, 30, temperature=0)
    pool = model._kv_pool
    assert len(pool) == 1, {k: v.shape for k, v in pool.items()}
    (buf,) = pool.values()
    assert buf.size == KVCache(model, len(prompts)).kv.size
    G.generate_batch(model, prompts[:2], 30, temperature=0)
    assert len(pool) == 1 and next(iter(pool.values())) is buf


def test_cache_rows_have_their_own_lengths():
    """forward_cached with per-row lengths: each row's logits equal a full forward over that row's tokens alone,
    and padding written beyond a row's length is never read (a stale cache entry is overwritten first)."""
    model = random_model(SHAPE, "float64", seed=1)
    rng = np.random.default_rng(2)
    rows = [rng.integers(0, SHAPE[4], size=n) for n in (3, 9, 5)]
    n = np.array([len(r) for r in rows])
    idx = np.zeros((3, 9), dtype=np.int64)
    for b, r in enumerate(rows):
        idx[b, : len(r)] = r
    cache = KVCache(model, 3)
    first = model.forward_cached(idx, cache, lengths=n, last=True)
    assert list(cache.lengths) == [3, 9, 5]
    extra = rng.integers(0, SHAPE[4], size=(3, 1))
    second = model.forward_cached(extra, cache, last=True)
    for b, r in enumerate(rows):
        full = model.logits(np.concatenate([r, extra[b]])[None])[0]
        assert np.abs(first[b] - full[len(r) - 1]).max() <= 1e-12
        assert np.abs(second[b] - full[len(r)]).max() <= 1e-12


# -- sampling helpers ------------------------------------------------------------------------------------------------


def reference_nucleus(p: np.ndarray, top_p: float) -> set:
    """The smallest set of the most likely entries (ties: lower index first) whose mass is >= top_p."""
    order = sorted(range(p.size), key=lambda i: (-p[i], i))
    out, mass = set(), 0.0
    for i in order:
        if p[i] <= 0:
            break
        out.add(i)
        mass += p[i]
        if mass >= top_p:
            break
    return out


# 3000: the nucleus outgrows candidates' first 64 and 256 entries
@pytest.mark.parametrize("vocab", [50, 3000])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999, 1.0])
def test_top_p_set_equals_reference(top_p, vocab):
    rng = np.random.default_rng(int(top_p * 1000))
    z = rng.standard_normal((40, vocab)) * (2 if vocab < 100 else 0.5)
    z[0, :10] = 1.0  # ties
    z[1, :] = np.round(z[1, :], 1)  # many ties, some across the first 64 entries' boundary
    probs, idx = G.candidates(z, 0, SOLO, top_p)
    p_sorted, idx_sorted, _, m = G.nucleus(probs, idx, top_p)
    full = np.exp(z - z.max(axis=1, keepdims=True))
    full /= full.sum(axis=1, keepdims=True)
    for b in range(z.shape[0]):
        assert set(idx_sorted[b, : m[b]].astype(int).tolist()) == reference_nucleus(
            full[b], top_p
        ), b


def test_top_p_distribution():
    """N draws from one row with top_p 0.7: the frequencies match the renormalised nucleus (5 standard errors per
    token; tokens outside it never drawn)."""
    z = np.array([0.3, -0.8, 1.5, 0.9, -0.4, 1.2, 0.0, -1.0])
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = sorted(reference_nucleus(p, 0.7))
    q = np.zeros_like(p)
    q[keep] = p[keep] / p[keep].sum()
    N = 40_000
    draws = G.sample_next(np.tile(z, (N, 1)), np.random.default_rng(1), 1.0, None, top_p=0.7)
    freq = np.bincount(draws, minlength=z.size) / N
    assert np.all(freq[q == 0] == 0)
    se = np.sqrt(q * (1 - q) / N)
    assert np.all(np.abs(freq - q) <= 5 * se + 1e-12), (freq, q)


def test_top_p_draw_renormalised_over_the_nucleus_alone():
    """Candidates beyond the nucleus, as the shards of a TP group send them (each its own prefix reaching top_p): the
    draw by u is the inverse CDF of the nucleus renormalised, so over a grid of u each nucleus entry gets its share
    p / (nucleus mass) and the entries beyond it none."""
    p = np.array([[0.1, 0.5, 0.25, 0.15]])  # top_p 0.6: the nucleus is {1, 2}, mass 0.75
    idx = np.array([[7, 3, 9, 4]])
    u = (np.arange(4000) + 0.5) / 4000
    draws = np.array([G._nucleus_draw(p, idx, 0.6, np.array([x]))[0] for x in u])
    share = {k: float(np.mean(draws == k)) for k in (3, 9, 7, 4)}
    # to the grid's resolution
    want = {3: 0.5 / 0.75, 9: 0.25 / 0.75, 7: 0.0, 4: 0.0}
    assert all(abs(share[k] - w) <= 1 / 4000 for k, w in want.items()), share


def test_greedy_ties_take_the_lowest_index():
    z = np.array([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    assert list(G.sample_next(z, np.random.default_rng(0), 0.0, None)) == [1, 0]


# -- tensor parallelism ----------------------------------------------------------------------------------------------


def tp_pair(tp: int, shape=SHAPE, dtype="float64"):
    """(the model sharded over a TP group of tp ranks, the same model on this process)."""
    grid = make_grid(MPI.COMM_WORLD, tp)
    ref = random_model(shape, dtype, seed=3, pos_scale=6.0)
    model = GPT(ref.cfg, seed=None, tp_comm=grid.tp_comm)
    model.load_state(ref.full_tensors(ref.flat))
    return model, ref


@pytest.mark.parallel(nprocs=[2, 4])
def test_tp_generation_equals_single_process(monkeypatch):
    """Every decoding step's logits (the vocabulary slices gathered here) equal the single process's within 1e-10,
    through the rows' block_size overflows (prompts 2, 9, 5 + 24 tokens, block 16), and so do the tokens."""
    bad = []
    size = MPI.COMM_WORLD.Get_size()
    model, ref = tp_pair(size)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, SHAPE[4], size=n) for n in (2, 9, 5)]
    seen = record_logits(monkeypatch)
    for kw in (
        dict(temperature=0),
        dict(temperature=0.8),
        dict(temperature=1.5, top_k=5),
        dict(temperature=1.2, top_p=0.8),
        dict(temperature=2.0, top_k=12, top_p=0.6),
    ):
        seen.clear()
        got = G.generate_batch(model, prompts, 24, seed=2, **kw)
        local = np.stack(seen)  # (steps, B, this rank's slice)
        seen.clear()
        want = G.generate_batch(ref, prompts, 24, seed=2, **kw)
        if not all(np.array_equal(a, b) for a, b in zip(got, want)):
            bad.append(f"tp {size} {kw}: tokens {got} != single process {want}")
        # (steps, B, padded vocabulary)
        full = np.concatenate(list(model.tp.allgather(local)), axis=-1)
        steps = np.stack(seen)
        if full.shape != steps.shape or full.shape[0] != 24:
            bad.append(
                f"tp {size} {kw}: logits of shape {full.shape}, single process {steps.shape}"
            )
            continue
        err = np.abs(full[..., : SHAPE[4]] - steps[..., : SHAPE[4]]).max()
        if not err <= 1e-10:
            bad.append(f"tp {size} {kw}: logits differ by {err:.2e}")
        if not np.all(np.isneginf(full[..., SHAPE[4] :])):
            bad.append(f"tp {size} {kw}: the padded vocabulary is not -inf")
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=[2, 4])
def test_sharded_candidates_equal_full_vocabulary():
    """Rows split over the ranks: the gathered candidates' nucleus (and top-k set) is the full row's."""
    comm = Comm(MPI.COMM_WORLD)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((30, 64)) * 3
    Vl = 64 // comm.size
    mine = z[:, comm.rank * Vl : (comm.rank + 1) * Vl]
    bad = []
    for top_p in (0.3, 0.8, 0.95, 1.0):
        probs, idx = G.candidates(mine, comm.rank * Vl, comm, top_p)
        _, got_idx, _, got_m = G.nucleus(probs, idx, top_p)
        probs1, idx1 = G.candidates(z, 0, SOLO, top_p)
        _, want_idx, _, want_m = G.nucleus(probs1, idx1, top_p)
        for b in range(z.shape[0]):
            if set(got_idx[b, : got_m[b]].tolist()) != set(want_idx[b, : want_m[b]].tolist()):
                bad.append(f"top_p {top_p} row {b}")
    for k in (1, 3, 10):
        got = G._top_k_threshold(mine, k, comm)
        if not np.array_equal(got, np.sort(z, axis=1)[:, -k]):
            bad.append(f"top_k {k} threshold")
    # greedy ties: within a shard and across shards (columns 5, 7 on the first rank, 40 and 63 on later ones)
    tied = z.copy()
    tied[0::3, [40, 63]] = tied[1::3, [5, 7, 40]] = tied[2::3, [7, 40]] = z.max() + 1
    got = G._greedy(tied[:, comm.rank * Vl : (comm.rank + 1) * Vl], comm.rank * Vl, comm)
    if not np.array_equal(got, tied.argmax(axis=1)):
        bad.append(f"greedy ties: {got} != the lowest index {tied.argmax(axis=1)}")
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=[2, 4])
def test_tp_reads_only_its_shards(shared_tmp_path):
    """A checkpoint written by one process, loaded by every rank of a TP group with model_from_file: each rank reads
    exactly its shard's elements (hyperslabs), checksums its share, and holds the same model as a whole load."""

    from hpc_llm import checkpoint as ckpt
    from hpc_llm.api import load_model, model_from_file
    from hpc_llm.config import Config

    comm = MPI.COMM_WORLD
    ref = random_model(SHAPE, "float32", seed=4)
    path = shared_tmp_path / "m.h5"
    if comm.rank == 0:
        ckpt.save_checkpoint(
            path,
            params=ref.full_tensors(ref.flat),
            optimizer={},
            state={"step": 0},
            config=Config(model=ref.cfg).to_dict(),
            metrics={},
        )
    comm.Barrier()
    grid = make_grid(comm, comm.Get_size())
    bad = []
    with count_reads() as read, ckpt.CheckpointFile(path) as saved:
        model = model_from_file(saved, tp_comm=grid.tp_comm)
    if read["params"] != model.local_size:
        bad.append(f"read {read['params']} elements, holds {model.local_size}")
    full = model.full_tensors(model.flat)
    for name, t in ref.full_tensors(ref.flat).items():
        if not np.array_equal(full[name], t):
            bad.append(name)
    single = load_model(path)
    if not np.array_equal(single.flat, ref.flat):
        bad.append("the single-process load")
    # int8 over the TP group: each rank's shards quantized as the single process quantizes them
    quantize_model(model)
    quantize_model(single)
    idx = np.random.default_rng(1).integers(0, SHAPE[4], size=(2, 9))
    got, want = model.logits(idx), single.logits(idx)
    if not np.abs(got - want).max() <= 1e-5 * np.abs(want).max():
        bad.append(f"int8 tp logits differ by {np.abs(got - want).max():.2e}")
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=[2, 4])
def test_tp_eval_equals_single_process():
    size = MPI.COMM_WORLD.Get_size()
    model, ref = tp_pair(size)
    tokens = np.random.default_rng(3).integers(0, SHAPE[4], size=16 * 5 + 7)
    got, want = evaluate(model, tokens, batch_size=2), evaluate(ref, tokens, batch_size=2)
    check(abs(got["loss"] - want["loss"]) <= 1e-10 * abs(want["loss"]), f"{got} != {want}")


@pytest.mark.parallel(nprocs=[2, 4])
def test_dp_eval_equals_single_process():
    """eval dealt over dp replicas (2 ranks: dp 2; 4 ranks: dp 4 and dp 2 x tp 2): every rank gets the one-process
    result, the loss within 1e-12 (float64 sums in another order), the counts exact. 6 batches of 2 windows and
    the short tail: replicas run different numbers of batches."""
    size = MPI.COMM_WORLD.Get_size()
    tokens = np.random.default_rng(3).integers(0, SHAPE[4], size=16 * 11 + 7)
    bad = []
    for tp in (1, 2) if size == 4 else (1,):
        model, ref = tp_pair(tp)
        grid = make_grid(MPI.COMM_WORLD, tp)  # the same split as tp_pair's: its dp group
        for max_batches in (None, 3):
            got = evaluate(
                model, tokens, batch_size=2, max_batches=max_batches, dp_comm=grid.dp_comm
            )
            want = evaluate(ref, tokens, batch_size=2, max_batches=max_batches)
            if not (
                abs(got["loss"] - want["loss"]) <= 1e-12 * abs(want["loss"])
                and {k: got[k] for k in ("tokens", "windows", "batches")}
                == {k: want[k] for k in ("tokens", "windows", "batches")}
            ):
                bad.append(f"dp {grid.dp} x tp {tp}, max_batches {max_batches}: {got} != {want}")
    check(not bad, "\n".join(bad))


# -- int8 ------------------------------------------------------------------------------------------------------------


def test_int8_scales_and_dequantization():
    rng = np.random.default_rng(0)
    # per-column scales
    w = (rng.standard_normal((48, 20)) * rng.uniform(0.01, 3, size=20)).astype(np.float32)
    w[:, 3] = 0  # a zero channel
    qw = QuantizedWeight.quantize(w, axis=1)
    assert qw.q.dtype == np.int8 and qw.scale.dtype == np.float32 and qw.scale.shape == (20,)
    np.testing.assert_array_equal(qw.scale, np.abs(w).max(axis=0) / np.float32(127))
    assert np.abs(qw.q).max() == 127
    assert np.all(np.abs(qw.dequantize() - w) <= qw.scale / 2 * (1 + 1e-6))
    # the matmul is the dequantized one (exact factorisation, blocks of columns), and its error is bounded
    x = rng.standard_normal((5, 48)).astype(np.float32)
    y = x @ qw
    np.testing.assert_allclose(y, x @ qw.dequantize(), rtol=1e-5, atol=1e-5 * np.abs(y).max())
    bound = qw.scale / 2 * np.abs(x).sum(axis=1, keepdims=True)
    assert np.all(np.abs(y - x @ w) <= bound * (1 + 1e-5) + 1e-6)
    # per row (the embedding): lookup and transpose
    e = QuantizedWeight.quantize(w.T.copy(), axis=0)
    np.testing.assert_array_equal(e[np.array([[1, 3]])], e.dequantize()[[[1, 3]]])
    np.testing.assert_allclose(
        x @ e.T, x @ e.dequantize().T, rtol=1e-5, atol=1e-5 * np.abs(y).max()
    )


def test_int8_model_logits_and_memory():
    model = random_model((2, 4, 64, 16, 70), "float32", seed=2, std=0.05)
    ref = random_model((2, 4, 64, 16, 70), "float32", seed=2, std=0.05)
    before = weight_bytes(model)
    quantize_model(model)
    after = weight_bytes(model)
    # the 2-D weights are 1/4, the LayerNorms, biases and wpe stay float: well under 0.3 of the bytes here
    assert after < 0.3 * before, (before, after)
    assert model.flat is None and isinstance(model.params["wte.weight"], QuantizedWeight)
    # the int8 model computes the float model whose weights are the dequantized ones
    deq = {
        n: (v.dequantize() if isinstance(v, QuantizedWeight) else v)
        for n, v in model.params.items()
    }
    full = ref.full_tensors(ref.flat)
    full.update(
        {
            n: (d if n != "wte.weight" else np.concatenate([d, full[n][d.shape[0] :]]))
            for n, d in deq.items()
        }
    )
    twin = GPT(ref.cfg, seed=None)
    twin.load_state(full)
    idx = np.random.default_rng(3).integers(0, 70, size=(3, 16))
    got, want, orig = model.logits(idx), twin.logits(idx), ref.logits(idx)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # the quantization error itself: small
    assert 0 < np.abs(got - orig).max() <= 0.05 * np.ptp(orig)
    # generation and the KV cache run on int8 weights
    out = G.generate(model, idx[:, :3], 20, temperature=0)
    assert out.shape == (3, 23)


def test_quantize_refuses_float64():
    model = random_model(SHAPE, "float64")
    with pytest.raises(UserError, match="float32"):
        quantize_model(model)


# -- eval ------------------------------------------------------------------------------------------------------------


def test_layout_from_sets():
    """eval: tp divides the ranks (dp = ranks / tp); generate: tp is the number of ranks."""
    assert G.tp_from_sets([], 4, "eval", data_parallel=True) == 4
    assert G.tp_from_sets(["parallel.tp=2"], 4, "eval", data_parallel=True) == 2
    assert G.tp_from_sets(["parallel.tp=1"], 4, "eval", data_parallel=True) == 1
    with pytest.raises(
        UserError, match=r"^parallel.tp=3 but 4 rank\(s\): `hpc-llm eval` runs dp x tp ranks"
    ):
        G.tp_from_sets(["parallel.tp=3"], 4, "eval", data_parallel=True)
    with pytest.raises(
        UserError, match=r"^parallel.tp=2 but 4 rank\(s\): `hpc-llm generate` runs one"
    ):
        G.tp_from_sets(["parallel.tp=2"], 4)


def test_eval_windows_cover_every_prediction_once():
    for n, T in ((100, 16), (97, 16), (17, 16), (2, 16), (33, 8)):
        ws = windows(n, T)
        covered = np.concatenate([np.arange(a, a + m) for a, m in ws])
        assert np.array_equal(covered, np.arange(n - 1)), (n, T)
        assert sum(len(b) for b in batches(n, T, 3)) == len(ws)


def test_eval_equals_reference():
    model = random_model(SHAPE, "float64", seed=5)
    tokens = np.random.default_rng(1).integers(0, SHAPE[4], size=16 * 7 + 5)
    got = evaluate(model, tokens, batch_size=3)
    total = count = 0
    for a in range(0, len(tokens) - 1, 16):
        n = min(16, len(tokens) - 1 - a)
        x, y = tokens[None, a : a + n], tokens[None, a + 1 : a + 1 + n]
        lp = model.logits(x)[0]
        lp = lp - lp.max(axis=-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(axis=-1, keepdims=True))
        total -= lp[np.arange(n), y[0]].sum()
        count += n
    assert got["tokens"] == count == len(tokens) - 1 and got["windows"] == 8
    assert abs(got["loss"] - total / count) <= 1e-12 * total / count
    assert math.isclose(got["perplexity"], math.exp(got["loss"]))
    part = evaluate(model, tokens, batch_size=3, max_batches=1)
    assert part["tokens"] == 3 * 16 and part["batches"] == 1


# -- the command line ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def char_run(tmp_path_factory, corpus_file):
    """A tiny char-tokenized model trained for a few steps (float32), its data and a float64 twin checkpoint."""
    from hpc_llm.data.prepare import prepare

    root = tmp_path_factory.mktemp("inference")
    prepare([corpus_file], root / "data", tokenizer="char")
    write_run_config(root / "cfg.toml", root / "data", root / "run")
    run(
        [
            sys.executable,
            "-m",
            "hpc_llm",
            "train",
            str(root / "cfg.toml"),
            "--set",
            "train.max_iters=3",
        ]
    )
    return root


def run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, **kw)
    assert p.returncode == 0, (cmd, p.stdout, p.stderr)
    return p.stdout


def test_cli_prompts_out_and_tp2(char_run):

    chars = (
        json.loads((char_run / "data" / "meta.json").read_text())["chars"]
        .replace("\n", "")
        .replace("\r", "")
    )
    texts = [chars[:6], chars[3], chars[::-1] * 2]  # lengths 6, 1 and over block_size 16
    prompts = char_run / "prompts.txt"
    prompts.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    base = [
        sys.executable,
        "-m",
        "hpc_llm",
        "generate",
        str(char_run / "run"),
        "--prompts",
        str(prompts),
        "--max-new-tokens",
        "20",
        "--top-k",
        "7",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--dtype",
        "float64",
    ]
    run(base + ["--out", str(char_run / "a.jsonl"), "--batch-size", "2"])
    rows = [json.loads(line) for line in (char_run / "a.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == texts
    assert all(
        len(r["tokens"]) == 20 and len(r["completion"]) == 20 and r["seconds"] > 0 for r in rows
    )
    run(
        [mpiexec(), "--oversubscribe", "-n", "2"]
        + base
        + ["--out", str(char_run / "b.jsonl"), "--set", "parallel.tp=2"]
    )
    other = [json.loads(line) for line in (char_run / "b.jsonl").read_text().splitlines()]
    # tp 2, batch 8 = tp 1, batch 2
    assert [r["tokens"] for r in other] == [r["tokens"] for r in rows]


def test_cli_eval_tp2_equals_tp1(char_run):

    cmd = [
        "-m",
        "hpc_llm",
        "eval",
        str(char_run / "run"),
        "--data",
        str(char_run / "data"),
        "--dtype",
        "float64",
        "--max-batches",
        "3",
    ]
    one = json.loads(run([sys.executable, *cmd]))
    two = json.loads(
        run([mpiexec(), "--oversubscribe", "-n", "2", sys.executable, *cmd]).splitlines()[-1]
    )
    assert one["tokens"] == two["tokens"] == 3 * 8 * 16 and two["tp"] == 2
    assert abs(one["loss"] - two["loss"]) <= 1e-10 * one["loss"]
    assert math.isclose(one["perplexity"], math.exp(one["loss"]))
    # data parallel: 2 replicas of the whole model, batches 0 and 2 on one, 1 on the other
    dp = json.loads(
        run(
            [
                mpiexec(),
                "--oversubscribe",
                "-n",
                "2",
                sys.executable,
                *cmd,
                "--set",
                "parallel.tp=1",
            ]
        ).splitlines()[-1]
    )
    assert dp["tp"] == 1 and dp["dp"] == 2 and one["dp"] == 1 and dp["tokens"] == one["tokens"]
    assert abs(one["loss"] - dp["loss"]) <= 1e-12 * one["loss"]
