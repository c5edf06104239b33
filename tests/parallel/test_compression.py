"""Compressed data-parallel gradient reductions (`parallel.grad_comm`, hpc_llm/parallel/compression.py).

- 16-bit (bf16, fp16), at 2 and 4 ranks, odd bucket sizes (one bucket smaller than the group, so some ranks own an
  empty piece), ZeRO-1 on and off, buckets started during a simulated backward: the result equals an fp32 reduction
  of the 16-bit-rounded inputs (MPI's own fp32 Allreduce of them) to fp32 rounding, and is bitwise the fp32 sum in
  rank order (rounded once more to the format without ZeRO-1, identical on every rank).
- PowerSGD: with rank >= min(rows, cols) one step gives the exact mean gradient (to rounding); on a fixed gradient,
  error feedback makes the accumulated applied update converge to the accumulated true gradient; the state resumes
  bitwise at the same layout and is reset (one line) on another.
- The trainer with each scheme on DP2 x TP2 (ZeRO-1 on for 16-bit) and PP2 x DP2: replicas bitwise identical, the
  losses close to the uncompressed run's; bad settings: one line, exit 2, on every rank.

The parallel tests get their timeouts from conftest.py (thread method in the ranks, signal in the parent).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from helpers import check, replica_checks, run_config, run_mpi, write_run_config
from mpi4py import MPI

from hpc_llm.config import Config
from hpc_llm.config.checks import validated
from hpc_llm.errors import UserError
from hpc_llm.parallel.comm import Comm
from hpc_llm.parallel.compression import (
    comm_dtype,
    load_powersgd_state,
    powersgd_state,
    scale_for,
    should_compress,
)
from hpc_llm.parallel.data_parallel import GradientSync

U32 = 2.0**-24


def world_dp() -> Comm:
    return Comm(MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None, name="dp")


def run_backward(sync: GradientSync, n: int, step: int = 0, loss_scale: float = 1.0) -> None:
    """What the trainer does: start, grad_ready at decreasing offsets (backward finishes the end first), finish."""
    sync.start(step)
    for offset in range(n, -1, -(n // 7 + 1)):
        sync.grad_ready(max(offset, 0))
    sync.finish(loss_scale)


# -- 16-bit ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nprocs",
    [
        pytest.param(2, marks=pytest.mark.parallel(nprocs=2), id="2ranks"),
        pytest.param(4, marks=pytest.mark.parallel(nprocs=4), id="4ranks"),
    ],
)
def test_16bit_reduction_is_an_fp32_sum_of_rounded_inputs(nprocs):
    comm = world_dp()
    p, r = comm.size, comm.rank
    assert p == nprocs
    bad = []
    n = 1003  # buckets of 167: six of them and one of a single element (fewer elements than ranks)
    for scheme in ("bf16", "fp16"):
        low = comm_dtype(scheme)
        for zero in (False, True):
            rng = np.random.default_rng(100 + r)
            # wide magnitudes
            x = (rng.standard_normal(n) * np.exp(rng.uniform(-12, 3, n))).astype(np.float32)
            # buckets [0, 1) and [1, 168): fp16 subnormals unscaled
            x[:168] = rng.standard_normal(168) * 1e-7
            g = x.copy()
            sync = GradientSync(g, comm, 167, zero, scheme=scheme)
            run_backward(sync, n)
            # the 16-bit-rounded inputs: each rank's bucket scaled by its power of two (scale_for), rounded, unscaled
            everyone = np.array(MPI.COMM_WORLD.allgather(x))  # (p, n)
            rounded = np.empty_like(everyone)
            for a, b in sync.buckets:
                for k in range(p):
                    s_k = np.float32(scale_for(scheme, float(np.abs(everyone[k, a:b]).max())))
                    rounded[k, a:b] = (everyone[k, a:b] * s_k).astype(low).astype(np.float32) * (
                        1 / s_k
                    )
            mpi_sum = rounded[r].copy()
            # an independent fp32 reduction of them
            MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, mpi_sum, op=MPI.SUM)
            in_order = rounded[0].copy()
            for k in range(1, p):
                in_order += rounded[k]
            # two fp32 sums' errors
            bound = 2 * (p - 1) * U32 * np.abs(rounded).sum(axis=0).astype(np.float64)
            where = f"{scheme} zero={zero}"
            err = np.abs(g.astype(np.float64) - mpi_sum)
            if zero:
                for a, b in sync.owned:
                    if not np.array_equal(g[a:b], in_order[a:b]):
                        bad.append(
                            f"{where}: owned piece {a}:{b} is not the fp32 sum in rank order"
                        )
                    if not np.all(err[a:b] <= bound[a:b]):
                        bad.append(
                            f"{where}: {a}:{b} differs from MPI's fp32 sum by up to {err[a:b].max():.3e}"
                        )
            else:
                u = 2.0**-8 if scheme == "bf16" else 2.0**-11
                # each piece rounded by its owner's scale
                for (a, _b), counts in zip(sync.buckets, sync.counts):
                    for j, c in enumerate(counts):
                        lo = a + sum(counts[:j])
                        piece = in_order[lo : lo + c]
                        s_o = np.float32(
                            scale_for(scheme, float(np.abs(piece).max()) if c else 0.0)
                        )
                        want = (piece * s_o).astype(low).astype(np.float32) * (1 / s_o)
                        if not np.array_equal(g[lo : lo + c], want):
                            bad.append(
                                f"{where}: piece {lo}:{lo + c} is not the rank-order sum rounded to {scheme}"
                            )
                        # half a subnormal
                        tiny = (2.0**-133 if scheme == "bf16" else 2.0**-25) / float(s_o)
                        ok = (
                            err[lo : lo + c]
                            <= u * np.abs(mpi_sum[lo : lo + c]) * (1 + 1e-6)
                            + 2 * bound[lo : lo + c]
                            + tiny
                        )
                        if not np.all(ok):
                            bad.append(
                                f"{where}: piece {lo}:{lo + c} is further from MPI's fp32 sum than one "
                                f"{scheme} rounding"
                            )
                if len(set(MPI.COMM_WORLD.allgather(g.tobytes()))) != 1:
                    bad.append(f"{where}: ranks hold different gradients")
            mine = [
                (max(a, 1), min(b, 168))
                for a, b in (sync.owned if zero else [(0, n)])
                if max(a, 1) < min(b, 168)
            ]
            small = max(float(err[a:b].max()) for a, b in mine) / float(
                np.abs(mpi_sum[1:168]).max()
            )
            # a 16-bit rounding of the piece's largest value, even for the tiny ones
            if not small <= 2.0**-8:
                bad.append(
                    f"{where}: the smallest gradients lost precision ({small:.2e} of their largest)"
                )
            before, after = sync.bytes_per_step()
            want_after = 2 * n + 4 * p * len(sync.buckets)  # and each piece's scale
            if (before, after) != (4 * n, want_after):
                bad.append(
                    f"{where}: bytes per step {before} -> {after}, expected {4 * n} -> {want_after}"
                )
            kinds = {k for k in comm.ledger.summary()}
            want_kind = f"dp.{'reduce_scatter' if zero else 'allreduce'}_{scheme}"
            if want_kind not in kinds:
                bad.append(f"{where}: ledger kinds {kinds}")
            comm.ledger.reset()
    check(not bad, "\n".join(bad))


# fp16's largest finite value, and the headroom the wire needs, from the format alone: a piece's largest value scaled
# into [2^(15 - h), 2^(16 - h)) may round up to 2^(16 - h), which must not pass 65504. What travels in 16 bits is one
# rank's piece (phase 1) or an owner's fp32 sum scaled afresh (phase 3), never a sum formed in 16 bits, so the rank
# count adds nothing to it: the p pieces' sum, up to p times a piece, is formed in fp32 and scaled again.
FP16_MAX = float(np.finfo(np.float16).max)
HEADROOM = 16 - int(np.floor(np.log2(FP16_MAX)))  # 1


def derived_scale(maxabs: float, headroom: int = HEADROOM) -> np.float32:
    """The power of two that puts maxabs in [2^(15 - headroom), 2^(16 - headroom)) (1 for zero)."""
    return np.float32(2.0 ** (15 - headroom - np.floor(np.log2(maxabs))) if maxabs else 1.0)


def rounded16(x: np.ndarray, headroom: int = HEADROOM) -> np.ndarray:
    """x as the wire carries it, with the derived scale: scaled, rounded to fp16, widened and unscaled."""
    s = derived_scale(float(np.abs(x).max()), headroom)
    return (x * s).astype(np.float16).astype(np.float32) / s


def top_of_range_buckets(rank: int, p: int, n: int, buckets, counts) -> np.ndarray:
    """A gradient whose buckets sit at the largest magnitudes the scale allows. Even buckets ("phase 1"): every rank's
    largest value is (2 - 2^-23) 2^E, the top of its binade, which its scale rounds up to 2^(16 - h) (2^E: 15, the
    top of fp16's own range, and others); the p ranks' sums reach p 2^(E+1). Odd buckets ("phase 3"): each owner's
    piece has a sum (2 - 2^-12) 2^E (rank 0's (2 - 2^-10) 2^E, exact in fp16, plus rank 1's 1.5 2^(E-11), its own
    bucket's largest), which the owner's scale rounds up to 2^(16 - h)."""
    rng = np.random.default_rng([34, rank])
    x = np.empty(n, np.float32)
    for i, (a, b) in enumerate(buckets):
        e = (15, 15, 3, -20, 30, 15, 15, 15)[i % 8]
        sign = rng.choice([-1.0, 1.0], b - a)
        if i % 2 == 0:
            x[a:b] = sign * rng.uniform(0.01, 1.0, b - a) * 2.0**e
            x[a + (a * 7 + rank) % (b - a)] = -(2 - 2.0**-23) * 2.0**e  # this rank's top
            x[a] = (2 - 2.0**-23) * 2.0**e  # every rank's: the sum p 2^(E+1)
            continue
        tops = [
            a + sum(counts[i][:j]) for j in range(p) if counts[i][j]
        ]  # each owner's first element
        if rank == 0:
            x[a:b] = sign * rng.uniform(0.01, 1.0, b - a) * 2.0**e
            x[tops] = (2 - 2.0**-10) * 2.0**e
        elif rank == 1:
            x[a:b] = sign * rng.uniform(0.01, 1.0, b - a) * 2.0 ** (e - 12)
            x[tops] = 1.5 * 2.0 ** (e - 11)
        else:
            x[a:b] = sign * rng.uniform(0.01, 1.0, b - a) * 2.0 ** (e - 30)
            x[tops] = 0
    return x


@pytest.mark.parametrize(
    "nprocs",
    [
        pytest.param(2, marks=pytest.mark.parallel(nprocs=2), id="2ranks"),
        pytest.param(3, marks=pytest.mark.parallel(nprocs=3), id="3ranks"),
        pytest.param(4, marks=pytest.mark.parallel(nprocs=4), id="4ranks"),
    ],
)
def test_fp16_wire_at_the_top_of_its_range(nprocs):
    """fp16 gradients at the largest magnitudes the scale allows (top_of_range_buckets), 1003 elements in buckets of
    167 (pieces of 55-56 at dp 3, and a last bucket of one element), ZeRO-1 on and off: nothing is inf or NaN, and the
    result is bitwise the fp32 rank-order sum of the inputs as rounded with the derived scale (and, without ZeRO-1,
    that sum rounded with the owner's derived scale). The code's scale is the derived one for every bucket, and one
    power of two less headroom (scale_for's headroom - 1) overflows: each phase-1 bucket's top, each phase-3 sum."""
    comm = world_dp()
    p, r = comm.size, comm.rank
    assert p == nprocs
    n, bucket, bad = 1003, 167, []
    for zero in (False, True):
        probe = GradientSync(np.zeros(n, np.float32), comm, bucket, zero, scheme="fp16")
        x = top_of_range_buckets(r, p, n, probe.buckets, probe.counts)
        g = x.copy()
        sync = GradientSync(g, comm, bucket, zero, scheme="fp16")
        with np.errstate(over="ignore"):
            run_backward(sync, n)
        everyone = np.array(MPI.COMM_WORLD.allgather(x))
        want = np.zeros(n, np.float32)
        for i, (a, b) in enumerate(sync.buckets):
            tops = np.abs(everyone[:, a:b]).max(axis=1)
            if any(scale_for("fp16", float(t)) != derived_scale(float(t)) for t in tops):
                bad.append(f"bucket {a}:{b}: scale_for is not the derived scale")
            rounded = [rounded16(everyone[k, a:b]) for k in range(p)]
            want[a:b] = rounded[0]
            for k in range(1, p):
                want[a:b] += rounded[k]
            # one power of two less headroom: the rounding overflows, in the phase this bucket is built for
            with np.errstate(over="ignore"):
                if i % 2 == 0 and not all(
                    np.isinf(rounded16(everyone[k, a:b], HEADROOM - 1)).any() for k in range(p)
                ):
                    bad.append(f"bucket {a}:{b}: headroom {HEADROOM - 1} does not overflow phase 1")
                lo = a
                for c in sync.counts[i]:
                    if c and i % 2 == 1:
                        s = scale_for("fp16", float(np.abs(want[lo : lo + c]).max()), HEADROOM - 1)
                        if not np.isinf(
                            (want[lo : lo + c] * np.float32(s)).astype(np.float16)
                        ).any():
                            bad.append(
                                f"piece {lo}:{lo + c}: headroom {HEADROOM - 1} does not overflow phase 3"
                            )
                    if c and not zero:
                        want[lo : lo + c] = rounded16(want[lo : lo + c])
                    lo += c
        ranges = sync.owned if zero else [(0, n)]
        for a, b in ranges:
            if not np.isfinite(g[a:b]).all():
                bad.append(f"zero={zero}: {a}:{b} holds inf or NaN")
            elif not np.array_equal(g[a:b], want[a:b]):
                k = a + int(np.argmax(g[a:b] != want[a:b]))
                bad.append(
                    f"zero={zero}: element {k} is {g[k]!r}, the rounded inputs' sum {want[k]!r}"
                )
        if not np.abs(want).max() >= p * 2.0**16:
            bad.append(f"the sums reach only {np.abs(want).max():.3e}")
    check(not bad, "\n".join(bad[:8]))


# -- PowerSGD ----------------------------------------------------------------------------------------------------------


def specs_for(shapes) -> list:
    out, offset = [], 0
    for i, shape in enumerate(shapes):
        out.append(SimpleNamespace(name=f"t{i}", offset=offset, local_shape=shape))
        offset += int(np.prod(shape))
    return out, offset


SHAPES = [(7, 5), (4, 9), (6,), (3, 3), (12, 16)]


@pytest.mark.parallel(nprocs=2)
def test_powersgd_full_rank_is_the_exact_mean():
    """rank >= min(rows, cols) (and every 2-D tensor compressed: min_compression_rate 0): P^ spans the gradient's
    column space, so P^ P^^T sum_i M_i = sum_i M_i, the mean gradient (the loss is scaled by 1/dp)."""
    comm = world_dp()
    bad = []
    for dtype, rtol in ((np.float64, 1e-12), (np.float32, 2e-5)):
        specs, n = specs_for(SHAPES)
        x = np.random.default_rng(7 + comm.rank).standard_normal(n).astype(dtype) / comm.size
        want = x.copy()
        MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, want, op=MPI.SUM)
        g = x.copy()
        sync = GradientSync(
            g,
            comm,
            50,
            False,
            scheme="powersgd",
            specs=specs,
            powersgd_rank=16,
            min_compression_rate=0,
        )
        if len(sync.powersgd.matrices) != 4 or sync.powersgd.plain != [
            (specs[2].offset, specs[2].offset + 6)
        ]:
            bad.append(f"compressed {sync.powersgd.matrices}, plain {sync.powersgd.plain}")
        run_backward(sync, n)
        err = np.max(np.abs(g - want)) / np.max(np.abs(want))
        if not err <= rtol:
            bad.append(
                f"{np.dtype(dtype).name}: relative difference from the mean gradient {err:.2e} > {rtol}"
            )
        if len(set(MPI.COMM_WORLD.allgather(g.tobytes()))) != 1:
            bad.append(f"{np.dtype(dtype).name}: ranks hold different gradients")
        # each rank keeps M_i - A/p (its share's difference from the mean); their sum, what was left out, is zero
        for name, e in sync.powersgd.error.items():
            total = e.copy()
            MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
            if not np.abs(total).max() <= rtol * 10 * np.abs(want).max():
                bad.append(
                    f"{np.dtype(dtype).name} {name}: error feedback left {np.abs(total).max():.2e} in all"
                )
    check(not bad, "\n".join(bad))


@pytest.mark.timeout(30)
def test_compression_rule_is_pytorchs():
    """PyTorch's _should_compress with min_compression_rate 2 and r = min(rank, rows, cols)."""
    assert should_compress(128, 512, 4) and should_compress(384, 1536, 16)
    assert not should_compress(8, 8, 2)  # (8 + 8) * 2 * 2 = 64 >= 64: plain allreduce
    assert should_compress(9, 9, 2)  # 72 < 81
    assert not should_compress(5, 1000, 4)  # r = 4: 1005 * 4 * 2 = 8040 >= 5000
    assert not should_compress(64, 64, 16)  # 128 * 16 * 2 = 4096 >= 4096


@pytest.mark.parallel(nprocs=2)
def test_error_feedback_recovers_the_accumulated_gradient():
    """A fixed gradient (each rank its own full-rank matrix), rank 1: each step applies only a rank-1 piece, but
    the accumulated applied update sum_t A_t = t G - sum_i e_i(t), and the error stays bounded, so
    ||sum_t A_t - t G|| / (t ||G||) falls like 1/t; without the error it would stay at the rank-1 residual."""
    comm = world_dp()
    specs, n = specs_for([(24, 16)])
    x = np.random.default_rng(11 + comm.rank).standard_normal(n) / comm.size
    G = x.copy()
    MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, G, op=MPI.SUM)
    g = np.empty(n)
    sync = GradientSync(g, comm, n, False, scheme="powersgd", specs=specs, powersgd_rank=1)
    applied, rel = np.zeros(n), {}
    for t in range(1, 401):
        g[...] = x
        run_backward(sync, n, step=t)
        applied += g
        if t in (10, 50, 400):
            rel[t] = np.linalg.norm(applied - t * G) / (t * np.linalg.norm(G))
    s = np.linalg.svd(G.reshape(24, 16), compute_uv=False)
    # one rank-1 step's relative error at best
    residual = np.sqrt((s[1:] ** 2).sum() / (s**2).sum())
    # t * rel is ||sum_i e_i(t)|| / ||G||: bounded (seen: 6.7, 10.2, 9.4 at t = 10, 50, 400), so rel falls like 1/t
    check(
        rel[400] < 0.03
        and 400 * rel[400] < 1.5 * 50 * rel[50]
        and rel[50] < rel[10]
        and residual > 0.5,
        f"relative error of the accumulated update {rel}; a rank-1 step alone leaves {residual:.2f}",
    )


@pytest.mark.parallel(nprocs=2)
def test_powersgd_state_resumes_bitwise_and_resets_on_another_layout():
    """Plain steps first (powersgd_start = 2), then PowerSGD with a changing fp16-style loss scale: 3 steps, the state
    through powersgd_state/load_powersgd_state into a new GradientSync, 3 more: the gradients and the state equal the
    uninterrupted run's bitwise. The same state offered at another layout is reset, with the line saying why."""
    comm = world_dp()
    specs, n = specs_for(SHAPES)
    layout = {"pp": 1, "dp": 2, "tp": 1, "dp_rank": comm.rank}

    def make(g):
        return GradientSync(
            g,
            comm,
            40,
            False,
            scheme="powersgd",
            specs=specs,
            powersgd_rank=2,
            powersgd_start=2,
            seed=5,
            min_compression_rate=0,
            layout=layout,
        )

    def grads(step):
        return np.random.default_rng([step, comm.rank]).standard_normal(n).astype(np.float32)

    def steps(sync, g, first, last):
        out = []
        for step in range(first, last):
            scale = 2.0 ** (10 - step)
            g[...] = grads(step) * scale
            run_backward(sync, n, step=step, loss_scale=scale)
            out.append(g.copy())
        return out

    ga, gb, gc = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.float32)
    a = make(ga)
    full = steps(a, ga, 0, 6)
    b = make(gb)
    first = steps(b, gb, 0, 3)
    saved = powersgd_state(b)
    saved = {
        "layout": dict(saved["layout"]),
        "arrays": {k: v.copy() for k, v in saved["arrays"].items()},
    }
    c = make(gc)
    line = load_powersgd_state(c, saved)
    second = steps(c, gc, 3, 6)
    bad = []
    if line is not None:
        bad.append(f"same layout reset: {line}")
    for i, (x, y) in enumerate(zip(first + second, full)):
        if not np.array_equal(x, y):
            bad.append(f"step {i}: resumed gradient differs from the uninterrupted run's")
    for k, v in powersgd_state(a)["arrays"].items():
        if not np.array_equal(v, powersgd_state(c)["arrays"][k]):
            bad.append(f"state {k} differs")
    other = make(np.empty(n, np.float32))
    other.layout = dict(layout, dp=4)
    line = load_powersgd_state(other, saved)
    if not (line and "dp 2 -> 4" in line and "reset" in line):
        bad.append(f"another layout: {line!r}")
    if any(np.any(e) for e in other.powersgd.error.values()):
        bad.append("another layout: error not reset")
    check(not bad, "\n".join(bad))


# -- PowerSGD under fp16, through changes of the loss scale -----------------------------------------------------------

U32_F = 2.0**-24


def powersgd_reference(xs: list, q: np.ndarray):
    """One rank-1 PowerSGD step in float64 on the ranks' gradients plus errors xs (true gradient units) with the
    warm-start Q: (the applied gradient A, the new Q, each rank's new error). P^ by Householder QR, as the code."""
    p = len(xs)
    total = sum(xs)
    phat = np.linalg.qr(total @ q, mode="reduced")[0]
    q_new = total.T @ phat
    a = phat @ q_new.T
    return a, q_new, [x - a / p for x in xs], phat


def powersgd_bounds(xs: list, q: np.ndarray, phat: np.ndarray, q_new: np.ndarray) -> tuple:
    """First-order Frobenius bounds on the float32 code's (A, Q, e_i) from the same inputs, u = 2^-24: X_i = M_i +
    e_i S rounds once; P = sum_i X_i Q: m products and p - 1 additions per entry; P^ = P / ||P|| (rank 1) moves by
    twice P's relative error plus the norm's n terms, its sqrt and the division; Q' = sum_i X_i^T P^: n products,
    p - 1 additions, and P^'s error times ||sum_i X_i||; A = P^ Q'^T rounds once; e_i = X_i - A / p twice more."""
    n, m = xs[0].shape
    p = len(xs)
    sx = sum(np.abs(x) for x in xs)
    total = sum(xs)
    dp_ = (m + p + 1) * U32_F * np.linalg.norm(sx @ np.abs(q)) / np.linalg.norm(total @ q)
    dphat = 2 * dp_ + (n + 3) * U32_F
    dq = (n + p + 1) * U32_F * np.linalg.norm(sx.T @ np.abs(phat)) + np.linalg.norm(total) * dphat
    da = dphat * np.linalg.norm(q_new) + dq + U32_F * np.linalg.norm(q_new)
    de = [U32_F * 2 * np.linalg.norm(x) + da / p + U32_F * np.linalg.norm(q_new) / p for x in xs]
    # the factor 2: second-order terms
    return 2 * da, 2 * dq, [2 * d for d in de]


def powersgd_spy(tr, log: list) -> None:
    """Record each PowerSGD reduction of tr: the loss scale it was given, this rank's gradients (scaled) and state
    before (error in true units, Q), its output and state after, each matrix in float64."""
    ps, g = tr.sync.powersgd, tr.model.grad_flat
    reduce = ps.reduce

    def matrices():
        return {
            name: g[o : o + n * m].reshape(n, m).astype(np.float64)
            for name, o, n, m, _ in ps.matrices
        }

    def state():
        return {k: (ps.error[k].astype(np.float64), ps.q[k].astype(np.float64)) for k in ps.error}

    def spy(loss_scale=1.0):
        rec = {"step": tr.step, "scale_arg": loss_scale, "in": matrices(), "before": state()}
        reduce(loss_scale)
        rec["out"], rec["after"] = matrices(), state()
        log.append(rec)

    ps.reduce = spy


def powersgd_fp16_problems(tr, steps: int) -> tuple[list, list]:
    """Run tr `steps` steps; each PowerSGD step against powersgd_reference from the code's own state before it (in
    true units: the gradients divided by the loss scale the step's backward ran with), within powersgd_bounds; after
    the verdict, the state is the step's if it was applied and bitwise the one before if it was skipped. Returns
    (problems, [(loss scale, applied, compressed)] per step)."""
    log, bad, seen = [], [], []
    powersgd_spy(tr, log)
    dp = tr.grid.dp_comm.mpi
    for _ in range(steps):
        scale, skipped, step = tr.scaler.scale, tr.skipped_steps, tr.step
        tr.train_step()
        applied = tr.skipped_steps == skipped
        rec = log[-1] if log and log[-1]["step"] == step else None
        seen.append((scale, applied, rec is not None))
        if rec is None:
            continue
        if rec["scale_arg"] != scale:
            bad.append(
                f"step {step}: PowerSGD given loss scale {rec['scale_arg']}, the step's is {scale}"
            )
        peers = dp.allgather((rec["in"], {k: v[0] for k, v in rec["before"].items()}))
        me = tr.grid.dp_rank
        for name in rec["in"]:
            xs = [ins[name] / scale + errs[name] for ins, errs in peers]
            q = rec["before"][name][1]
            a, q_new, es, phat = powersgd_reference(xs, q)
            ba, bq, be = powersgd_bounds(xs, q, phat, q_new)
            q_code = rec["after"][name][1]
            sign = 1.0 if np.sum(q_code * q_new) >= 0 else -1.0  # P^ is unique up to its sign
            for what, got, want, bound in (
                ("applied gradient", rec["out"][name] / scale, a, ba),
                # Q = sum_i (M_i + e_i S)^T P^ is in the step's scaled units (only its direction is used next)
                ("Q", sign * q_code / scale, q_new, bq),
                ("error", rec["after"][name][0], es[me], be[me]),
            ):
                err = np.linalg.norm(got - want)
                if not err <= bound:
                    bad.append(f"step {step} {name} {what}: off by {err:.3e}, bound {bound:.3e}")
        settled = {k: (tr.sync.powersgd.error[k], tr.sync.powersgd.q[k]) for k in rec["after"]}
        kept = rec["after"] if applied else rec["before"]
        for k, (e, q) in settled.items():
            if not (np.array_equal(e, kept[k][0]) and np.array_equal(q, kept[k][1])):
                bad.append(
                    f"step {step} ({'applied' if applied else 'skipped'}): {k}'s state is not the "
                    f"{'new' if applied else 'previous'} one"
                )
    return bad, seen


@pytest.mark.parametrize(
    "nprocs",
    [
        pytest.param(2, marks=pytest.mark.parallel(nprocs=2), id="dp2"),
        pytest.param(4, marks=pytest.mark.parallel(nprocs=4), id="dp2tp2"),
    ],
)
def test_powersgd_fp16_through_a_loss_scale_change_equals_float64(
    nprocs, data_dir, shared_tmp_path
):
    """fp16, PowerSGD rank 1 from step 1, loss scale 2^12 doubling after 3 clean steps (hysteresis 2): the scale
    doubles before step 3, two injected overflows (HPC_LLM_FAULT nan at "grad", steps 4 and 5) halve it before
    step 6. Every PowerSGD step equals the float64 reference of the algorithm in true gradient units, from the
    code's own state before it (error feedback and Q), within bounds derived from float32's unit roundoff: an error
    carried into the wrong units (a factor 2 or the loss scale) misses them by orders of magnitude. The skipped
    steps leave the state as it was. dp 2 and dp 2 x tp 2 (each TP rank its own shards), ZeRO-1 off and on."""
    import os

    from hpc_llm.parallel.grid import make_grid
    from hpc_llm.train.trainer import Trainer

    tp = nprocs // 2
    grid = make_grid(MPI.COMM_WORLD, tp)
    bad = []
    for zero in (0, 1):
        # each run its own faults (one fault fires once per process): rank 0's, then rank 1's
        os.environ["HPC_LLM_FAULT"] = f"nan:grad:{zero}:4,nan:grad:{zero}:5"
        try:
            cfg = run_config(
                data_dir,
                shared_tmp_path / f"psgd16-{zero}",
                **{
                    "train.precision": "fp16",
                    "train.loss_scale_init": 2.0**12,
                    "train.loss_scale_window": 3,
                    "train.eval_iters": 0,
                    "parallel.tp": tp,
                    "parallel.zero": zero,
                    "parallel.grad_comm": "powersgd",
                    "parallel.powersgd_rank": 1,
                    "parallel.powersgd_start": 1,
                },
            )
            tr = Trainer(cfg, grid=grid)
            problems, seen = powersgd_fp16_problems(tr, 8)
        finally:
            del os.environ["HPC_LLM_FAULT"]
        bad += [f"zero {zero}: {b}" for b in problems + replica_checks(tr)]
        want = [
            (2.0**12, True, False),
            (2.0**12, True, True),
            (2.0**12, True, True),
            (2.0**13, True, True),
            (2.0**13, False, True),
            (2.0**13, False, True),
            (2.0**12, True, True),
            (2.0**12, True, True),
        ]
        if seen != want:
            bad.append(f"zero {zero}: (scale, applied, compressed) per step {seen}, planned {want}")
    check(not bad, "\n".join(bad[:10]))


# -- the trainer -------------------------------------------------------------------------------------------------------


def _config(data_dir, out, **kw):

    return run_config(data_dir, out, **{"train.max_iters": 4, "train.eval_iters": 0, **kw})


@pytest.mark.parallel(nprocs=4)
def test_trainer_with_each_scheme_on_dp_tp_and_pp(data_dir, shared_tmp_path):
    """DP2 x TP2 and PP2 x DP2, 4 steps: with bf16/fp16 (ZeRO-1 on) and PowerSGD (ZeRO-1 on and off), replicas stay
    bitwise identical (DP and TP, as test_parallel checks) and the losses stay within a few percent of fp32's."""

    from hpc_llm.parallel.grid import make_grid
    from hpc_llm.train.trainer import Trainer

    bad = []
    for name, tp, pp in (("dp2tp2", 2, 1), ("pp2dp2", 1, 2)):
        grid = make_grid(MPI.COMM_WORLD, tp, pp)
        losses = {}
        for scheme, zero in (
            ("fp32", 0),
            ("bf16", 1),
            ("fp16", 0),
            ("powersgd", 0),
            ("powersgd", 1),
        ):
            if pp > 1 and zero:
                continue
            kw = {
                "parallel.tp": tp,
                "parallel.pp": pp,
                "parallel.zero": zero,
                "parallel.grad_comm": scheme,
                "train.grad_accum": 2,
                "parallel.powersgd_start": 1,
            }
            tr = Trainer(
                _config(data_dir, shared_tmp_path / f"{name}-{scheme}-{zero}", **kw), grid=grid
            )
            tr.run()
            losses[scheme, zero] = tr.metrics.train["loss"]
            bad += [f"{name} {scheme} zero {zero}: {b}" for b in replica_checks(tr)]
            if scheme == "powersgd" and not tr.sync.powersgd.matrices:
                bad.append(f"{name}: PowerSGD compressed nothing")
        ref = np.array(losses["fp32", 0])
        for key, got in losses.items():
            if not np.all(np.abs(np.array(got) - ref) <= 0.05 * ref):
                bad.append(f"{name} {key}: losses {got} vs fp32 {ref.tolist()}")
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=2)
def test_powersgd_run_resumes_bitwise_from_its_checkpoint(data_dir, shared_tmp_path):
    """dp2 PowerSGD (rank 2, from step 1), 6 steps, checkpoints every 2: a new trainer resumed from step 4's file
    ends bitwise where the uninterrupted run ends (its error feedback and Q came back from the file, each rank its
    own); a checkpoint without the state would not (checked: resetting them changes the result)."""
    from hpc_llm.checkpoint import checkpoint_path
    from hpc_llm.parallel.grid import make_grid
    from hpc_llm.train.trainer import Trainer

    kw = {
        "parallel.grad_comm": "powersgd",
        "parallel.powersgd_rank": 2,
        "parallel.powersgd_start": 1,
        "train.max_iters": 6,
        "checkpoint.interval": 2,
        "checkpoint.writer": "gather",
    }
    grid = make_grid(MPI.COMM_WORLD, 1)
    full = Trainer(_config(data_dir, shared_tmp_path / "full", **kw), grid=grid)
    full.run()
    resumed = Trainer(_config(data_dir, shared_tmp_path / "resumed", **kw), grid=grid)
    resumed.restore(checkpoint_path(shared_tmp_path / "full", 4))
    restored_state = {k: v.copy() for k, v in resumed.sync.powersgd.state().items()}
    line = getattr(resumed, "powersgd_resume_line", "unset")
    resumed.run()
    reset = Trainer(_config(data_dir, shared_tmp_path / "reset", **kw), grid=grid)
    reset.restore(checkpoint_path(shared_tmp_path / "full", 4))
    reset.sync.powersgd.reset()
    reset.run()
    ok = (
        line is None
        and bool(restored_state)
        and np.array_equal(resumed.model.flat, full.model.flat)
        and not np.array_equal(reset.model.flat, full.model.flat)
    )
    check(
        ok,
        f"line {line!r}; resumed equal {np.array_equal(resumed.model.flat, full.model.flat)}, reset differs "
        f"{not np.array_equal(reset.model.flat, full.model.flat)}",
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"parallel.grad_comm": "int8"}, "parallel.grad_comm"),
        ({"parallel.grad_comm": "powersgd", "parallel.powersgd_rank": 0}, "parallel.powersgd_rank"),
        (
            {"parallel.grad_comm": "bf16", "model.dtype": "float64"},
            "16-bit gradient communication needs float32",
        ),
        ({"parallel.powersgd_start": -1}, "parallel.powersgd_start"),
    ],
)
def test_bad_settings_are_one_line(overrides, expected):
    cfg = Config()
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(UserError) as e:
        validated(cfg)
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.timeout(150)
def test_bad_scheme_fails_cleanly_on_every_rank(data_dir, tmp_path):
    """From the CLI under mpiexec -n 2: exit 2, the same one line on each rank, no traceback, nothing written."""

    cfg = write_run_config(tmp_path / "run.toml", data_dir, tmp_path / "out")
    for overrides, text in (
        (["parallel.grad_comm=fp8"], "parallel.grad_comm"),
        (["parallel.grad_comm=fp16", "model.dtype=float64"], "needs float32 training"),
    ):
        args = ["train", str(cfg)]
        for o in overrides:
            args += ["--set", o]
        rc, out, err, _ = run_mpi(2, args)
        errors = [line for line in err.splitlines() if line.startswith("hpc-llm: error: ")]
        assert rc == 2 and len(errors) == 2 and len(set(errors)) == 1 and text in errors[0], (
            out + err
        )
        assert "Traceback" not in out + err and not (tmp_path / "out").exists(), out + err
