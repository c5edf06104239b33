"""Tensor parallelism piece by piece, under mpiexec with 2 and 4 ranks (mpi-pytest): every sharded forward and backward
equals the unsharded computation, done on every rank with the same inputs.

Float64 throughout. The sharded and the full computations do the same arithmetic except for the order of the sums (a
matmul over a shard followed by an allreduce of the partial results, instead of one matmul), so they differ by a few
float64 roundings. Forward values (outputs, losses, logits) are compared normwise: max |got - want| <= 1e-12 *
max |want| per tensor. Gradients are compared entry by entry (`grad_mismatch`):

    |got_i - want_i| <= GRAD_TOL * (max |want| + |want_i|),   GRAD_TOL = 64 u,  u = 2^-53 (64 u = 7.1e-15)

Reordering a float64 sum changes it by a few u times the sum of its terms' magnitudes; in a gradient those magnitudes
are the tensor's scale (an entry near zero is a cancellation of terms of ordinary size), hence the absolute part
u * max |want|, and the relative part u * |want_i| for the largest entries. Through the backward of a 2-layer model
the measured worst is 11 u * (max |want| + |want_i|) (test_gpt_equals_single_process, 4 ranks; the weight gradients of
the single blocks come out bitwise equal here), so 64 u leaves a margin of ~5 and is 70x (at the largest entries) to
140x (elsewhere) tighter than the normwise 1e-12 used before. Pure data movement (sharding, gathering) must be bitwise
exact.

Every assertion goes through `check` (mpi-pytest's parallel_assert): all ranks agree on the verdict, so a failure on one
rank fails the test on all of them instead of leaving the others waiting in the next collective.
"""

from __future__ import annotations

from fnmatch import fnmatch

import numpy as np
import pytest
from helpers import F64_RTOL, TP_RTOL, check, crc, mismatch
from mpi4py import MPI

from hpc_llm.config import ModelConfig
from hpc_llm.model import attention as SA
from hpc_llm.model import layers as L
from hpc_llm.model import tensor_parallel as TP
from hpc_llm.model import vocab_parallel as VP
from hpc_llm.model.distill import (
    Distill,
    vocab_parallel_distill_backward,
    vocab_parallel_distill_forward,
)
from hpc_llm.model.gpt import GPT
from hpc_llm.model.kv_cache import KVCache
from hpc_llm.model.layout import init_tensor, param_specs
from hpc_llm.parallel.comm import Comm
from hpc_llm.parallel.grid import make_grid

NPROCS = [2, 4]


GRAD_TOL = 64 * 2.0**-53


def grad_mismatch(got, want, what: str, scale: float | None = None) -> list[str]:
    """[] if every entry of the gradient got matches want: |got_i - want_i| <= GRAD_TOL * (scale + |want_i|), scale =
    max |want| by default; else [the worst entry and how many are off]."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return [f"{what}: shape {got.shape}, expected {want.shape}"]
    if got.dtype != want.dtype:
        return [f"{what}: dtype {got.dtype}, expected {want.dtype}"]
    if not np.all(np.isfinite(got)):
        return [f"{what}: {np.count_nonzero(~np.isfinite(got))} non-finite values"]
    if not got.size:
        return []
    scale = float(np.max(np.abs(want))) if scale is None else scale
    err, tol = np.abs(got - want), GRAD_TOL * (scale + np.abs(want))
    off = err > tol
    if not off.any():
        return []
    i = np.unravel_index(
        int(np.argmax(err / np.maximum(tol, np.finfo(np.float64).tiny))), err.shape
    )
    return [
        f"{what}: {int(off.sum())} of {err.size} entries off; worst at {tuple(map(int, i))}: got {got[i]!r}, "
        f"expected {want[i]!r}, |error| {err[i]:.3e} > {GRAD_TOL:.2e} * ({scale:.3e} + |expected|)"
    ]


def tp_sizes() -> list[int]:
    """TP group sizes to try: the whole world, and groups of 2 (a DP x TP grid) when the world is larger."""
    return sorted({2, MPI.COMM_WORLD.Get_size()})


def model_cfg(vocab_size: int = 256, n_layer: int = 1) -> ModelConfig:
    return ModelConfig(
        n_layer=n_layer, n_head=4, n_embd=32, block_size=16, vocab_size=vocab_size, dtype="float64"
    )


def specs_by_name(cfg: ModelConfig, tp: int) -> dict:
    return {s.name: s for s in param_specs(cfg, tp)}


# -- sharding by spec ------------------------------------------------------------------------------------------------


@pytest.mark.parallel(nprocs=NPROCS)
def test_shard_index_and_full_tensors():
    """shard_index gives each rank its heads' q, k and v (tp_blocks=3); the ranks' shards partition every tensor;
    GPT.full_tensors puts the shards back together bitwise (initial weights, and arbitrary loaded tensors)."""
    bad = []
    for tp in tp_sizes():
        grid = make_grid(MPI.COMM_WORLD, tp)
        r = grid.tp_rank
        cfg = model_cfg(vocab_size=65)
        C, H = cfg.n_embd, cfg.n_head
        hd = C // H
        specs = specs_by_name(cfg, tp)

        # the fused qkv columns are (q|k|v) x heads x head_dim: rank r owns heads [r H/tp, (r+1) H/tp) of each part
        mine_heads = range(r * H // tp, (r + 1) * H // tp)
        expected = [
            part * C + h * hd + d for part in range(3) for h in mine_heads for d in range(hd)
        ]
        for name, axis in (("h.0.attn.c_attn.weight", 1), ("h.0.attn.c_attn.bias", 0)):
            s = specs[name]
            assert s.tp_blocks == 3 and s.tp_axis == axis
            idx = TP.shard_index(s.shape, s.tp_axis, s.tp_blocks, tp, r)
            if list(idx[axis]) != expected:
                bad.append(
                    f"tp {tp} {name}: columns {list(idx[axis])[:6]}..., expected {expected[:6]}..."
                )

        # every split tensor: the ranks' indices partition its split axis, and the local shape is the shard's
        for s in specs.values():
            if s.tp_axis is None:
                continue
            cols = np.concatenate(
                [
                    TP.shard_index(s.shape, s.tp_axis, s.tp_blocks, tp, q)[s.tp_axis]
                    for q in range(tp)
                ]
            )
            if not np.array_equal(np.sort(cols), np.arange(s.shape[s.tp_axis])):
                bad.append(f"tp {tp} {s.name}: the shards do not partition axis {s.tp_axis}")
            full = np.arange(np.prod(s.shape), dtype=np.float64).reshape(s.shape)
            if (
                TP.shard(full, s, tp, r).shape != s.local_shape
                or TP.local_shape(s, tp) != s.local_shape
            ):
                bad.append(
                    f"tp {tp} {s.name}: shard shape {TP.shard(full, s, tp, r).shape} != {s.local_shape}"
                )

        model = GPT(cfg, seed=3, tp_comm=grid.tp_comm)
        full = model.full_tensors(model.flat)
        for s in model.specs:
            want = init_tensor(s, 3, cfg.vocab_size)
            bad += mismatch(full[s.name], want, f"tp {tp} initial {s.name} (full)", rtol=0)
            bad += mismatch(
                model.params[s.name],
                TP.shard(want, s, tp, r),
                f"tp {tp} initial {s.name} (shard)",
                rtol=0,
            )

        rng = np.random.default_rng(11)  # the same tensors on every rank
        tensors = {s.name: rng.standard_normal(s.shape) for s in model.specs}
        model.load_state(tensors)
        back = model.full_tensors(model.flat)
        for name, t in tensors.items():
            bad += mismatch(back[name], t, f"tp {tp} load_state/full_tensors {name}", rtol=0)
    check(not bad, "\n".join(bad))


# -- the transformer block's two halves ------------------------------------------------------------------------------


def _randn(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


@pytest.mark.parallel(nprocs=NPROCS)
def test_attention_block():
    """f -> column-parallel qkv -> attention over this rank's heads -> row-parallel proj -> g -> + bias equals the
    full attention sub-block, forward and backward (input, weight and bias gradients); two allreduces in all."""
    bad = []
    for tp in tp_sizes():
        grid = make_grid(MPI.COMM_WORLD, tp)
        comm, r = grid.tp_comm, grid.tp_rank
        cfg = model_cfg()
        C, H = cfg.n_embd, cfg.n_head
        sp = specs_by_name(cfg, tp)
        rng = np.random.default_rng(1)
        B, T = 2, 24
        x, dout = _randn(rng, B, T, C), _randn(rng, B, T, C)
        W, b = _randn(rng, C, 3 * C, scale=0.3), _randn(rng, 3 * C, scale=0.1)
        Wp, bp = _randn(rng, C, C, scale=0.3), _randn(rng, C, scale=0.1)

        # the full sub-block
        qkv = L.linear_forward(x, W, b)
        y, att = SA.attention_forward(qkv, H)
        out = L.linear_forward(y, Wp, bp)
        dW, db, dWp, dbp = np.zeros_like(W), np.zeros_like(b), np.zeros_like(Wp), np.zeros_like(bp)
        dy = L.linear_backward(dout, y, Wp, dWp, dbp, False)
        dqkv = SA.attention_backward(dy, att, H)
        dx = L.linear_backward(dqkv, x, W, dW, db, False)

        # tensor-parallel, as GPT.forward/backward do it
        s_w, s_b, s_p = (
            sp["h.0.attn.c_attn.weight"],
            sp["h.0.attn.c_attn.bias"],
            sp["h.0.attn.c_proj.weight"],
        )
        Wl, bl, Wpl = TP.shard(W, s_w, tp, r), TP.shard(b, s_b, tp, r), TP.shard(Wp, s_p, tp, r)
        grid.world.ledger.reset()
        h = TP.copy_to_tp_region(x, comm)
        qkv_l = L.linear_forward(h, Wl, bl)
        y_l, att_l = SA.attention_forward(qkv_l, H // tp)
        a = TP.reduce_from_tp_region(L.linear_forward(y_l, Wpl, None), comm)
        a += bp
        dWl, dbl, dWpl = np.zeros_like(Wl), np.zeros_like(bl), np.zeros_like(Wpl)
        da = TP.reduce_from_tp_region_backward(dout.copy(), comm)
        # the bias after g is replicated: its gradient needs no collective
        dbp_tp = da.reshape(-1, C).sum(axis=0)
        dy_l = L.linear_backward(da, y_l, Wpl, dWpl, None, False)
        dqkv_l = SA.attention_backward(dy_l, att_l, H // tp)
        dx_tp = TP.copy_to_tp_region_backward(
            L.linear_backward(dqkv_l, h, Wl, dWl, dbl, False), comm
        )
        calls = dict(grid.world.ledger.calls)

        w = f"tp {tp} attention"
        bad += mismatch(a, out, f"{w} forward")
        bad += grad_mismatch(dx_tp, dx, f"{w} dx")
        bad += grad_mismatch(dWl, TP.shard(dW, s_w, tp, r), f"{w} d c_attn.weight")
        bad += grad_mismatch(dbl, TP.shard(db, s_b, tp, r), f"{w} d c_attn.bias")
        bad += grad_mismatch(dWpl, TP.shard(dWp, s_p, tp, r), f"{w} d c_proj.weight")
        bad += grad_mismatch(dbp_tp, dbp, f"{w} d c_proj.bias")
        if calls != {"tp.allreduce": 2}:
            bad.append(
                f"{w}: collectives {calls}, expected one allreduce forward (g) and one backward (f)"
            )
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=NPROCS)
def test_mlp_block():
    """f -> column-parallel fc -> GELU -> row-parallel proj -> g -> + bias equals the full MLP, forward and backward."""
    bad = []
    for tp in tp_sizes():
        grid = make_grid(MPI.COMM_WORLD, tp)
        comm, r = grid.tp_comm, grid.tp_rank
        cfg = model_cfg()
        C = cfg.n_embd
        sp = specs_by_name(cfg, tp)
        rng = np.random.default_rng(2)
        B, T = 2, 24
        x, dout = _randn(rng, B, T, C), _randn(rng, B, T, C)
        W, b = _randn(rng, C, 4 * C, scale=0.3), _randn(rng, 4 * C, scale=0.1)
        Wp, bp = _randn(rng, 4 * C, C, scale=0.2), _randn(rng, C, scale=0.1)

        f = L.linear_forward(x, W, b)
        g, gt = L.gelu_forward(f)
        out = L.linear_forward(g, Wp, bp)
        dW, db, dWp, dbp = np.zeros_like(W), np.zeros_like(b), np.zeros_like(Wp), np.zeros_like(bp)
        dg = L.linear_backward(dout, g, Wp, dWp, dbp, False)
        dx = L.linear_backward(L.gelu_backward(dg, f, gt), x, W, dW, db, False)

        s_w, s_b, s_p = (
            sp["h.0.mlp.c_fc.weight"],
            sp["h.0.mlp.c_fc.bias"],
            sp["h.0.mlp.c_proj.weight"],
        )
        Wl, bl, Wpl = TP.shard(W, s_w, tp, r), TP.shard(b, s_b, tp, r), TP.shard(Wp, s_p, tp, r)
        grid.world.ledger.reset()
        h = TP.copy_to_tp_region(x, comm)
        f_l = L.linear_forward(h, Wl, bl)
        g_l, gt_l = L.gelu_forward(f_l)
        m = TP.reduce_from_tp_region(L.linear_forward(g_l, Wpl, None), comm)
        m += bp
        dWl, dbl, dWpl = np.zeros_like(Wl), np.zeros_like(bl), np.zeros_like(Wpl)
        dm = TP.reduce_from_tp_region_backward(dout.copy(), comm)
        dbp_tp = dm.reshape(-1, C).sum(axis=0)
        dg_l = L.linear_backward(dm, g_l, Wpl, dWpl, None, False)
        dh = L.linear_backward(L.gelu_backward(dg_l, f_l, gt_l), h, Wl, dWl, dbl, False)
        dx_tp = TP.copy_to_tp_region_backward(dh, comm)
        calls = dict(grid.world.ledger.calls)

        w = f"tp {tp} mlp"
        bad += mismatch(m, out, f"{w} forward")
        bad += grad_mismatch(dx_tp, dx, f"{w} dx")
        bad += grad_mismatch(dWl, TP.shard(dW, s_w, tp, r), f"{w} d c_fc.weight")
        bad += grad_mismatch(dbl, TP.shard(db, s_b, tp, r), f"{w} d c_fc.bias")
        bad += grad_mismatch(dWpl, TP.shard(dWp, s_p, tp, r), f"{w} d c_proj.weight")
        bad += grad_mismatch(dbp_tp, dbp, f"{w} d c_proj.bias")
        if calls != {"tp.allreduce": 2}:
            bad.append(
                f"{w}: collectives {calls}, expected one allreduce forward (g) and one backward (f)"
            )
    check(not bad, "\n".join(bad))


# -- vocabulary-parallel embedding and cross-entropy -----------------------------------------------------------------

# 256: no padding; 65 -> padded 128: at tp 4 rank 3's 32 columns are all padding; 20 -> padded 64: at tp 2 rank 1's
# (and at tp 4 ranks 1-3's) columns are all padding.
VOCABS = [256, 65, 20]


def _targets(rng, n: int, vocab: int, padded: int, tp: int) -> np.ndarray:
    """Random token ids in [0, vocab), with the edges of every rank's slice that holds real ids, and vocab - 1."""
    t = rng.integers(0, vocab, size=n)
    edges = sorted(
        {0, vocab - 1}
        | {v for q in range(tp) for v in (q * padded // tp, q * padded // tp - 1) if 0 <= v < vocab}
    )
    t[: len(edges)] = edges
    return t


@pytest.mark.parallel(nprocs=NPROCS)
def test_vocab_parallel_embedding():
    """Token rows looked up on the rank that holds them and summed over the TP group (plus positions, also at pos0 > 0)
    equal the full embedding; backward scatters each rank's rows (added to the head's gradient already there) and
    writes the full position gradient (overwrite and accumulate)."""
    bad = []
    for tp in tp_sizes():
        grid = make_grid(MPI.COMM_WORLD, tp)
        comm, r = grid.tp_comm, grid.tp_rank
        for vocab in VOCABS:
            cfg = model_cfg(vocab_size=vocab)
            Vp, C = cfg.padded_vocab, cfg.n_embd
            s = specs_by_name(cfg, tp)["wte.weight"]
            Vl = s.local_shape[0]
            v0 = r * Vl
            rng = np.random.default_rng(vocab)
            wte, wpe = _randn(rng, Vp, C), _randn(rng, cfg.block_size, C)
            wte[vocab:] = 0
            wte_l = TP.shard(wte, s, tp, r)
            if not np.array_equal(wte_l, wte[v0 : v0 + Vl]):
                bad.append(f"tp {tp} vocab {vocab}: the wte shard is not rows [{v0}, {v0 + Vl})")
            B, T = 3, 12
            idx = _targets(rng, B * T, vocab, Vp, tp).reshape(B, T)
            w = f"tp {tp} vocab {vocab} embedding"
            for pos0 in (0, 4):
                want = L.embedding_forward(wte, wpe, idx, pos0)
                got = VP.vocab_parallel_embedding_forward(wte_l, wpe, idx, v0, comm, pos0)
                bad += mismatch(got, want, f"{w} forward pos0={pos0}")
            dx = _randn(rng, B, T, C)
            for accumulate in (False, True):
                # the tied head's gradient, written before the embedding's backward
                head = _randn(rng, Vp, C)
                dwpe0 = _randn(rng, cfg.block_size, C)
                dwte, dwpe = head.copy(), dwpe0.copy()
                L.embedding_backward(dx, idx, dwte, dwpe, accumulate)
                dwte_l, dwpe_l = TP.shard(head, s, tp, r).copy(), dwpe0.copy()
                VP.vocab_parallel_embedding_backward(dx, idx, v0, dwte_l, dwpe_l, accumulate, comm)
                bad += grad_mismatch(
                    dwte_l, TP.shard(dwte, s, tp, r), f"{w} d wte (accumulate={accumulate})"
                )
                bad += grad_mismatch(dwpe_l, dwpe, f"{w} d wpe (accumulate={accumulate})")
    check(not bad, "\n".join(bad))


def _full_cross_entropy(logits, targets, vocab: int, scale: float):
    """The reference: softmax cross-entropy over the first `vocab` columns; padding columns get zero gradient."""
    N = logits.shape[0]
    z = logits[:, :vocab]
    m = z.max(axis=1, keepdims=True)
    lse = m + np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    loss = float(np.mean(lse[:, 0] - z[np.arange(N), targets]))
    grad = np.zeros_like(logits)
    grad[:, :vocab] = np.exp(z - lse)
    grad[np.arange(N), targets] -= 1.0
    grad *= scale / N
    return loss, grad


def _distill_mismatch(logits, rng, targets, vocab, comm, v0, Vl, w) -> list[str]:
    """The distillation loss on this rank's slices (one max and one sum allreduce) against one process's."""
    teacher = _randn(rng, *logits.shape, scale=3.0)
    teacher[:, vocab:] = -50.0  # garbage again
    full = Distill(targets, teacher.copy(), 0.6, 2.5)
    want_loss, cache = vocab_parallel_distill_forward(logits.copy(), full, vocab, 0, Comm(None))
    want_grad = vocab_parallel_distill_backward(cache, 0.5)
    ledger = comm.ledger
    before = ledger.calls.get("tp.allreduce", 0)
    mine = Distill(targets, teacher[:, v0 : v0 + Vl].copy(), 0.6, 2.5)
    loss, cache = vocab_parallel_distill_forward(
        logits[:, v0 : v0 + Vl].copy(), mine, vocab, v0, comm
    )
    grad = vocab_parallel_distill_backward(cache, 0.5)
    bad = []
    if not (np.isfinite(loss) and abs(loss - want_loss) <= TP_RTOL * abs(want_loss)):
        bad.append(f"{w} distill: loss {loss!r}, expected {want_loss!r}")
    if ledger.calls.get("tp.allreduce", 0) - before != 2:
        bad.append(f"{w} distill: expected 2 allreduces")
    scale = float(np.abs(want_grad).max())
    return bad + grad_mismatch(
        grad, want_grad[:, v0 : v0 + Vl], f"{w} distill d logits", scale=scale
    )


@pytest.mark.parallel(nprocs=NPROCS)
def test_vocab_parallel_cross_entropy():
    """Three small allreduces (max, target logit, sum of exp) over vocabulary slices give the full loss and its
    gradient; padding columns (even a slice that is all padding) are masked: no NaN, exactly zero gradient."""
    bad, seen_all_padding = [], False
    for tp in tp_sizes():
        grid = make_grid(MPI.COMM_WORLD, tp)
        comm, r = grid.tp_comm, grid.tp_rank
        for vocab in VOCABS:
            Vp = model_cfg(vocab_size=vocab).padded_vocab
            Vl = Vp // tp
            v0 = r * Vl
            all_padding = v0 >= vocab
            rng = np.random.default_rng(100 + vocab)
            N, scale = 40, 0.5
            logits = _randn(rng, N, Vp, scale=3.0)
            logits[:, vocab:] = 50.0  # garbage in the padding columns: it must not reach the loss
            targets = _targets(rng, N, vocab, Vp, tp)
            want_loss, want_grad = _full_cross_entropy(logits, targets, vocab, scale)

            grid.world.ledger.reset()
            loss, cache = VP.vocab_parallel_cross_entropy_forward(
                logits[:, v0 : v0 + Vl].copy(), targets, vocab, v0, comm
            )
            grad = VP.vocab_parallel_cross_entropy_backward(cache, scale)
            calls = grid.world.ledger.calls.get("tp.allreduce", 0)

            w = f"tp {tp} vocab {vocab} cross-entropy (rank {r}: columns [{v0}, {v0 + Vl})" + (
                ", all padding)" if all_padding else ")"
            )
            if not (np.isfinite(loss) and abs(loss - want_loss) <= TP_RTOL * abs(want_loss)):
                bad.append(f"{w}: loss {loss!r}, expected {want_loss!r}")
            bad += grad_mismatch(
                grad,
                want_grad[:, v0 : v0 + Vl],
                f"{w} d logits",
                scale=float(np.abs(want_grad).max()),
            )
            pad = max(0, vocab - v0)
            if np.any(grad[:, pad:] != 0):
                bad.append(f"{w}: non-zero gradient in the padding columns")
            if calls != 3:
                bad.append(f"{w}: {calls} allreduces, expected 3")
            bad += _distill_mismatch(logits, rng, targets, vocab, comm, v0, Vl, w)
            seen_all_padding = seen_all_padding or all_padding
    # the premise of the padding cases: some rank did hold a slice of padding only
    if not MPI.COMM_WORLD.allreduce(seen_all_padding, op=MPI.LOR):
        bad.append("no rank held a vocabulary slice of padding only")
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=NPROCS)
def test_gather_from_tp_region():
    """Each rank's slice of the last axis -> the full last axis in rank order, bitwise, in one allgather."""
    bad = []
    for tp in tp_sizes():
        grid = make_grid(MPI.COMM_WORLD, tp)
        comm, r = grid.tp_comm, grid.tp_rank
        rng = np.random.default_rng(5)
        for shape in ((3, 5, 4 * tp), (7, 2 * tp)):
            full = rng.standard_normal(shape)
            n = shape[-1] // tp
            grid.world.ledger.reset()
            got = TP.gather_from_tp_region(
                np.ascontiguousarray(full[..., r * n : (r + 1) * n]), comm
            )
            bad += mismatch(got, full, f"tp {tp} gather {shape}", rtol=0)
            if dict(grid.world.ledger.calls) != {"tp.allgather": 1}:
                bad.append(f"tp {tp} gather {shape}: collectives {dict(grid.world.ledger.calls)}")
    check(not bad, "\n".join(bad))


# -- the whole model -------------------------------------------------------------------------------------------------


@pytest.mark.parallel(nprocs=NPROCS)
def test_gpt_equals_single_process():
    """A tiny float64 GPT sharded over the TP group: loss, every gradient (full_tensors of grad_flat), the logits and
    the KV-cache decoding equal the single-process model's; also with a padded vocabulary (65 -> 128)."""
    bad = []
    for tp in tp_sizes():
        grid = make_grid(MPI.COMM_WORLD, tp)
        for vocab in (256, 65):
            cfg = model_cfg(vocab_size=vocab, n_layer=2)
            model = GPT(cfg, seed=7, tp_comm=grid.tp_comm)
            ref = GPT(cfg, seed=7)
            assert model.flat.dtype == np.float64 and model.local_size < ref.local_size
            rng = np.random.default_rng(vocab)
            B, T = 3, cfg.block_size
            idx = _targets(rng, B * T, vocab, cfg.padded_vocab, tp).reshape(B, T)
            targets = rng.integers(0, vocab, size=(B, T))
            targets[0, :4] = [0, vocab - 1, 1, vocab - 2]
            w = f"tp {tp} vocab {vocab} GPT"

            loss = model.forward(idx, targets, keep_cache=True)
            model.backward()
            want = ref.forward(idx, targets, keep_cache=True)
            ref.backward()
            if not abs(loss - want) <= TP_RTOL * abs(want):
                bad.append(f"{w}: loss {loss!r}, single process {want!r}")
            grads = model.full_tensors(model.grad_flat)
            for name, g in ref.grads.items():
                bad += grad_mismatch(grads[name], g, f"{w} gradient {name}")
            if np.any(grads["wte.weight"][vocab:] != 0):
                bad.append(f"{w}: non-zero gradient in the padded vocabulary rows of wte")

            logits = model.logits(idx)
            want_logits = ref.logits(idx)
            bad += mismatch(logits, want_logits, f"{w} logits")

            cache = KVCache(model, B)
            pieces = [
                model.forward_cached(idx[:, a:b], cache)
                for a, b in ((0, 5), (5, 6), (6, 7), (7, 12), (12, T))
            ]
            bad += mismatch(
                np.concatenate(pieces, axis=1), want_logits, f"{w} forward_cached logits"
            )
    check(not bad, "\n".join(bad))


# -- sequence parallelism --------------------------------------------------------------------------------------------


def test_dropout_rng_for_positions_draws_the_single_process_masks():
    """A slice's view draws, for each row, the masks of all T positions and keeps its own: the slices' masks put
    together are the full draw, and the site's later draws (another dropout at the same site) follow in the same
    order as in the single process, after a heads view's draw too."""
    B, T, C, tp = 3, 8, 5, 4
    full = L.DropoutRNG(5, 2, 1, range(10, 10 + B)).site(3)
    want = [full.for_heads(0, 4, 4).random((B, 4, 2, 2), np.float64)] + [
        full.random((B, T, C), np.float64) for _ in range(2)
    ]
    pieces = []
    for r in range(tp):
        site = L.DropoutRNG(5, 2, 1, range(10, 10 + B)).site(3)
        site.for_heads(r, r + 1, 4).random((B, 1, 2, 2), np.float64)
        view = site.for_positions(2 * r, 2 * r + 2, T)
        pieces.append([view.random((B, 2, C), np.float64) for _ in range(2)])
    for k in range(2):
        got = np.concatenate([p[k] for p in pieces], axis=1)
        assert np.array_equal(got, want[k + 1]), k
    whole = L.DropoutRNG(5, 2, 1, range(10, 10 + B)).site(3).for_positions(0, T, T)
    assert np.array_equal(whole.random((B, 4, 2, 2), np.float64), want[0])


@pytest.mark.parallel(nprocs=NPROCS)
def test_sequence_parallel_mappings():
    """gather_from_sequence_parallel_region: each rank's slice of positions -> the whole sequence in rank order
    (bitwise, one allgather); its backward: the sum over the group of each rank's gradient, this rank's positions
    (one reduce-scatter). reduce_scatter_to_sequence_parallel_region and its backward the other way round. Against
    float64 references every rank computes from the same inputs; the ledger counts the whole array's bytes. And
    Comm's two methods along the other axes (the first: no copies)."""
    bad = []
    for tp in tp_sizes():
        grid = make_grid(MPI.COMM_WORLD, tp)
        comm, r = grid.tp_comm, grid.tp_rank
        rng = np.random.default_rng(8)
        B, T, C = 3, 4 * tp, 5
        n = T // tp
        full = rng.standard_normal((B, T, C))
        # each rank's own array (its partial of a sum), which every rank can make
        parts = rng.standard_normal((tp, B, T, C))
        summed = parts.sum(axis=0)
        mine = full[:, r * n : (r + 1) * n].copy()
        cases = [
            ("gather forward", TP.gather_from_sequence_parallel_region, mine, full, "allgather"),
            (
                "gather backward",
                TP.gather_from_sequence_parallel_region_backward,
                parts[r].copy(),
                summed[:, r * n : (r + 1) * n],
                "reduce_scatter",
            ),
            (
                "reduce-scatter forward",
                TP.reduce_scatter_to_sequence_parallel_region,
                parts[r].copy(),
                summed[:, r * n : (r + 1) * n],
                "reduce_scatter",
            ),
            (
                "reduce-scatter backward",
                TP.reduce_scatter_to_sequence_parallel_region_backward,
                mine,
                full,
                "allgather",
            ),
        ]
        for what, fn, x, want, kind in cases:
            before = x.copy()
            grid.world.ledger.reset()
            got = fn(x, comm)
            w = f"tp {tp} {what}"
            # data movement: bitwise; a sum: to a few roundings (tp 2 is one exact-order addition)
            bad += mismatch(got, want, w, rtol=0 if kind == "allgather" else TP_RTOL)
            bad += mismatch(x, before, f"{w}: its input changed", rtol=0)
            ledger = grid.world.ledger
            if dict(ledger.calls) != {f"tp.{kind}": 1} or ledger.bytes[f"tp.{kind}"] != full.nbytes:
                bad.append(
                    f"{w}: ledger {ledger.summary()}, expected one tp.{kind} of {full.nbytes} B"
                )
        for axis in (0, 2):
            shape = [2 * tp, 3, 2 * tp]
            a = rng.standard_normal((tp, *shape))
            k = shape[axis] // tp
            piece = (slice(None),) * axis + (slice(r * k, (r + 1) * k),)
            got = comm.allgather_along(np.ascontiguousarray(a[0][piece]), axis)
            bad += mismatch(got, a[0], f"tp {tp} allgather_along axis {axis}", rtol=0)
            got = comm.reduce_scatter_along(a[r].copy(), axis)
            bad += mismatch(got, a.sum(axis=0)[piece], f"tp {tp} reduce_scatter_along axis {axis}")
    check(not bad, "\n".join(bad))


def _sp_pair(tp_comm, n_layer: int = 2, freeze=(), **kw):
    """The same float64 model with dropout 0.2 and a padded vocabulary (65 -> 128), sequence-parallel over tp_comm
    and in one process; `freeze`: parameter patterns not trained, in both."""
    cfg = ModelConfig(
        n_layer=n_layer,
        n_head=4,
        n_embd=32,
        block_size=16,
        vocab_size=65,
        dropout=0.2,
        dtype="float64",
    )
    return (
        GPT(cfg, seed=7, tp_comm=tp_comm, sequence_parallel=True, freeze=freeze, **kw),
        GPT(cfg, seed=7, freeze=freeze),
    )


@pytest.mark.parallel(nprocs=NPROCS)
def test_sequence_parallel_block_equals_single_process():
    """One block with sequence parallelism, dropout 0.2, float64: its output at this rank's positions and its input
    gradient there equal the single process's block's, and so do all its parameter gradients (the LayerNorms' summed
    over the TP group), over two micro-batches accumulated. The collectives: the forward gathers twice and
    reduce-scatters twice, no allreduce; backward also gathers the output gradients and the inputs again, and sums
    the LayerNorms' partials in one allreduce. With the column-parallel weights frozen (train.freeze) backward skips
    their inputs' gathers."""
    bad = []
    frozen = ("h.*.attn.c_attn.weight", "h.*.mlp.c_fc.weight")
    for tp, freeze in [(tp, f) for tp in tp_sizes() for f in ((), frozen)]:
        grid = make_grid(MPI.COMM_WORLD, tp)
        r = grid.tp_rank
        model, ref = _sp_pair(grid.tp_comm, n_layer=1, freeze=freeze)
        blk, ref_blk = model.chunks[0].blocks[0], ref.chunks[0].blocks[0]
        rng = np.random.default_rng(21)
        B, T, C = 3, 16, 32
        n = T // tp
        pos = slice(r * n, (r + 1) * n)
        w = f"tp {tp} block" + (" frozen column weights" if freeze else "")
        for micro in range(2):
            x, dout = rng.standard_normal((B, T, C)), rng.standard_normal((B, T, C))
            drop = L.DropoutRNG(3, 1, micro, range(4, 4 + B))
            y_ref, c_ref = ref_blk.forward(x.copy(), drop)
            dx_ref = ref_blk.backward(dout.copy(), c_ref, accumulate=micro > 0)
            grid.world.ledger.reset()
            y, c = blk.forward(np.ascontiguousarray(x[:, pos]), drop)
            fwd = dict(grid.world.ledger.calls)
            grid.world.ledger.reset()
            dx = blk.backward(np.ascontiguousarray(dout[:, pos]), c, accumulate=micro > 0)
            bwd = dict(grid.world.ledger.calls)
            bad += mismatch(y, y_ref[:, pos], f"{w} micro {micro} output", rtol=F64_RTOL)
            bad += mismatch(dx, dx_ref[:, pos], f"{w} micro {micro} input gradient", rtol=F64_RTOL)
            if fwd != {"tp.allgather": 2, "tp.reduce_scatter": 2}:
                bad.append(f"{w}: forward's collectives {fwd}")
            gathers = 2 if freeze else 4
            if bwd != {"tp.allgather": gathers, "tp.reduce_scatter": 2, "tp.allreduce": 1}:
                bad.append(f"{w}: backward's collectives {bwd}")
        grads = model.full_tensors(model.grad_flat)
        trained = [k for k in ref.grads if not any(fnmatch(k, f) for f in freeze)]
        for name in (k for k in trained if k.startswith("h.0.")):
            bad += mismatch(grads[name], ref.grads[name], f"{w} gradient {name}", rtol=F64_RTOL)
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=NPROCS)
def test_sequence_parallel_model_equals_single_process():
    """The whole model (a chunk: embedding, 2 blocks, head) with sequence parallelism, dropout 0.2, float64, two
    micro-batches accumulated: losses and every gradient equal the single process's (1e-10); block and selective
    recompute give bitwise the same losses and gradients; replicated gradients (LayerNorms, biases, wpe) bitwise the
    same on every TP rank; the logits too. Collectives of a forward: the embedding's reduce-scatter, two gathers and two
    reduce-scatters per block, the head's gather, the cross-entropy's three small allreduces."""
    bad = []
    for tp in tp_sizes():
        grid = make_grid(MPI.COMM_WORLD, tp)
        w = f"tp {tp} model"
        model, ref = _sp_pair(grid.tp_comm)
        again = {how: _sp_pair(grid.tp_comm, recompute=how)[0] for how in ("block", "selective")}
        rng = np.random.default_rng(22)
        B, T = 3, 16
        for micro in range(2):
            x, y = rng.integers(0, 65, (B, T)), rng.integers(0, 65, (B, T))
            drop = L.DropoutRNG(3, 1, micro, range(B))
            want = ref.forward(x, y, rng=drop, keep_cache=True)
            ref.backward(loss_scale=0.5, accumulate=micro > 0)
            grid.world.ledger.reset()
            loss = model.forward(x, y, rng=drop, keep_cache=True)
            calls = dict(grid.world.ledger.calls)
            model.backward(loss_scale=0.5, accumulate=micro > 0)
            losses = {}
            for how, m in again.items():
                losses[how] = m.forward(x, y, rng=drop, keep_cache=True)
                m.backward(loss_scale=0.5, accumulate=micro > 0)
            if not abs(loss - want) <= F64_RTOL * abs(want) or set(losses.values()) != {loss}:
                bad.append(f"{w} micro {micro}: loss {loss!r} (recompute {losses}), want {want!r}")
            if calls != {"tp.reduce_scatter": 5, "tp.allgather": 5, "tp.allreduce": 3}:
                bad.append(f"{w}: forward's collectives {calls}")
        grads = model.full_tensors(model.grad_flat)
        for name, g in ref.grads.items():
            bad += mismatch(grads[name], g, f"{w} gradient {name}", rtol=F64_RTOL)
        for how, m in again.items():
            if not np.array_equal(model.grad_flat, m.grad_flat):
                bad.append(f"{w}: {how} recompute's gradients are not bitwise the same")
        replicated = np.concatenate([model.grad_flat[a:b] for a, b in model.replicated_ranges()])
        if len(set(grid.tp_comm.mpi.allgather(crc(replicated)))) != 1:
            bad.append(f"{w}: replicated gradients differ across the TP group")
        bad += mismatch(model.logits(x), ref.logits(x), f"{w} logits", rtol=F64_RTOL)
    check(not bad, "\n".join(bad))
