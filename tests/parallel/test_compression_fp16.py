"""fp16 at its edges in the gradient reductions (hpc_llm/parallel/compression.py):

- The 16-bit wire at the top of fp16's range (each rank's bucket, and each owner's sum, at the largest magnitude the
  scale allows), dp 2, 3 and 4, odd buckets, ZeRO-1 off and on: no inf or NaN, bitwise the fp32 sum of the inputs
  rounded with the scale derived from fp16's 65504 (the headroom: one power of two, whatever the rank count); one
  power of two less overflows.
- PowerSGD under fp16 in the trainer (dp 2 and dp 2 x tp 2, ZeRO-1 off and on), the loss scale doubled and, after two
  injected overflows, halved: every step equals a float64 rank-1 PowerSGD step in true gradient units from the code's
  own state, within first-order bounds from float32's unit roundoff; a skipped step leaves the state bitwise as it was.

The parallel tests get their timeouts from conftest.py (thread method in the ranks, signal in the parent).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import check, replica_checks, run_config
from mpi4py import MPI

from hpc_llm.parallel.comm import Comm
from hpc_llm.parallel.compression import scale_for
from hpc_llm.parallel.data_parallel import GradientSync
from hpc_llm.parallel.grid import make_grid
from hpc_llm.train.trainer import Trainer


def world_dp() -> Comm:
    return Comm(MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None, name="dp")


def run_backward(sync: GradientSync, n: int) -> None:
    """What the trainer does: start, grad_ready at decreasing offsets (backward finishes the end first), finish."""
    sync.start(0)
    for offset in range(n, -1, -(n // 7 + 1)):
        sync.grad_ready(max(offset, 0))
    sync.finish(1.0)


# -- the 16-bit wire at the top of fp16's range ------------------------------------------------------------------------

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
