"""16-bit activation transfers (`parallel.act_comm`, Comm.with_wire): the wire's collectives and messages, and the
trainer with them.

- At 2 and 4 ranks, for bf16 and fp16, on values of wide magnitudes (1e-7 to 20: fp16 needs its scale): the 16-bit
  sum-allreduce is bitwise the fp32 sum in rank order of the 16-bit-rounded inputs (each rank's buffer scaled by its
  power of two: compression.scale_for), rounded once (with the owner's scale), the same on every rank; the
  reduce-scatter along an axis is that fp32 sum, not rounded again (it does not travel); the all-gather along an
  axis is every rank's rounded input; an all-gather of the reduce-scatter is the allreduce, bitwise; a message is
  its rounded values. Against the exact (float64) sum S of the rounded inputs, with u = 2^-8 (bf16) or 2^-11
  (fp16) and u32 = 2^-24:
      allreduce      |got - S| <= u |S| + 2 (p - 1) u32 sum_k |x_k| + half a subnormal of the format / scale
  (one rounding of the fp32 sum, whose own error is at most (p - 1) u32 sum_k |x_k|, the factor 2 covering the
  (1 + u) of the bound's second order); the reduce-scatter the second term alone; the all-gather and a message
  |got - x| <= u |x| + half a subnormal (one rounding). The max allreduce and the ledger: the max stays fp32, each
  16-bit collective is counted in its 16-bit words (2 bytes a value, 4 per piece for its scale).
- pp2 and tp2 training runs with act_comm = bf16 under train.precision = bf16, against act_comm = fp32: the ledger's
  pipeline messages and activation allreduces are half the bytes (plus the 4-byte scale per message and per piece),
  the cross-entropy's allreduces untouched in fp32; the losses stay within 2^-10 relative of the fp32-transfer run's
  at every step. That bound is measured, not derived: over these 5 steps, seeds 0-3, pp2 and tp2, the largest
  difference seen was 1.3e-4 (the first step, before any update, <= 1.1e-5), while computing in bf16 instead of fp32
  moves the same losses by up to 3.2e-4; 2^-10 (a quarter of one bf16 rounding) leaves a factor 7.
The watchdog on these paths: tests/runtime/test_faults.py (NEW_PATHS).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check, run_config, train
from mpi4py import MPI

from hpc_llm.backend import low_dtype
from hpc_llm.parallel import wire16
from hpc_llm.parallel.comm import Comm
from hpc_llm.parallel.compression import scale_for
from hpc_llm.parallel.grid import make_grid

U32 = 2.0**-24
UNIT = {"bf16": 2.0**-8, "fp16": 2.0**-11}
HALF_SUBNORMAL = {"bf16": 2.0**-134, "fp16": 2.0**-25}
SHAPE = (4, 8, 12)  # every axis divisible by 2 and 4


def rounded(x, scheme, s=None):
    """x's values as its 16-bit words carry them: scaled by s (the sender's scale_for by default), rounded,
    unscaled; and s."""
    if s is None:
        s = scale_for(scheme, float(np.abs(x).max()) if x.size else 0.0)
    s = np.float32(s)
    return (x * s).astype(low_dtype(scheme)).astype(np.float32) * (np.float32(1) / s), s


def pieces_of(n, p):
    return [n // p + (1 if r < n % p else 0) for r in range(p)]


def rank_order_sum(parts):
    acc = parts[0].copy()
    for part in parts[1:]:
        acc += part
    return acc


def ledger_problems(comm, want: dict, where: str) -> list[str]:
    got = {k: v["bytes"] for k, v in comm.ledger.summary().items()}
    comm.ledger.reset()
    return [] if got == want else [f"{where}: ledger {got}, expected {want}"]


@pytest.mark.parametrize(
    "nprocs",
    [
        pytest.param(2, marks=pytest.mark.parallel(nprocs=2), id="2ranks"),
        pytest.param(4, marks=pytest.mark.parallel(nprocs=4), id="4ranks"),
    ],
)
def test_16bit_collectives_are_fp32_sums_of_rounded_inputs(nprocs):
    world = MPI.COMM_WORLD
    plain = Comm(world, name="tp")
    p, r = plain.size, plain.rank
    assert p == nprocs
    bad = []
    for scheme in ("bf16", "fp16"):
        comm, u = plain.with_wire(scheme), UNIT[scheme]
        rng = np.random.default_rng(100 + r)
        x = (rng.standard_normal(SHAPE) * np.exp(rng.uniform(-16, 3, SHAPE))).astype(np.float32)
        everyone = np.array(world.allgather(x))  # (p, *SHAPE)
        xh, scales = zip(*(rounded(everyone[k], scheme) for k in range(p)))
        xh = np.array(xh)
        s64, abs_sum = xh.astype(np.float64).sum(axis=0), np.abs(xh).astype(np.float64).sum(axis=0)
        sum_err = 2 * (p - 1) * U32 * abs_sum

        # allreduce, in place: each owner's piece of the flat buffer summed in rank order, rounded with its scale
        got = x.copy()
        comm.allreduce_(got)
        flat, want, lo = rank_order_sum(list(xh.reshape(p, -1))), np.empty(x.size, np.float32), 0
        tiny = np.empty(x.size)
        for c in pieces_of(x.size, p):
            want[lo : lo + c], s_o = rounded(flat[lo : lo + c], scheme)
            tiny[lo : lo + c] = HALF_SUBNORMAL[scheme] / float(s_o)
            lo += c
        want = want.reshape(SHAPE)
        if not np.array_equal(got, want):
            bad.append(
                f"{scheme} allreduce: not the rank-order fp32 sum of the rounded inputs, rounded once"
            )
        err = np.abs(got - s64)
        if not np.all(err <= u * np.abs(s64) + sum_err + tiny.reshape(SHAPE)):
            bad.append(
                f"{scheme} allreduce: further from the exact sum than one rounding ({err.max():.3e})"
            )
        if len(set(world.allgather(got.tobytes()))) != 1:
            bad.append(f"{scheme} allreduce: ranks hold different results")
        bad += ledger_problems(
            comm, {f"tp.allreduce_{scheme}": 2 * x.size + 4 * p}, f"{scheme} allreduce"
        )

        # a non-contiguous buffer and pieces of unequal length (1003 values over p ranks)
        odd = (rng.standard_normal((17, 59)) * 10).astype(np.float32).T
        everyone_odd = np.array(world.allgather(np.ascontiguousarray(odd)))
        got_odd = odd.copy(order="F")  # its transpose's memory: not C-contiguous
        comm.allreduce_(got_odd)
        flat = rank_order_sum([rounded(everyone_odd[k].reshape(-1), scheme)[0] for k in range(p)])
        want_odd, lo = np.empty(odd.size, np.float32), 0
        for c in pieces_of(odd.size, p):
            want_odd[lo : lo + c] = rounded(flat[lo : lo + c], scheme)[0]
            lo += c
        if not np.array_equal(got_odd, want_odd.reshape(odd.shape)):
            bad.append(
                f"{scheme} allreduce of a transposed (17, 59): not the rank-order sum rounded once"
            )
        comm.ledger.reset()

        # the max stays fp32 (exact), in the plain ledger entry
        m = x.copy()
        comm.allreduce_(m, op="max")
        if not np.array_equal(m, everyone.max(axis=0)):
            bad.append(f"{scheme}: the max allreduce is not the exact max")
        bad += ledger_problems(comm, {"tp.allreduce": x.nbytes}, f"{scheme} max")

        for axis in range(len(SHAPE)):
            n = SHAPE[axis] // p
            mine = (slice(None),) * axis + (slice(r * n, (r + 1) * n),)
            # reduce-scatter: this rank's slice of the rank-order fp32 sum, not rounded again
            rs = wire16.reduce_scatter_along(comm, x, axis)
            want_rs = rank_order_sum([xh[k][mine] for k in range(p)])
            if rs.dtype != np.float32 or not np.array_equal(rs, want_rs):
                bad.append(
                    f"{scheme} reduce-scatter axis {axis}: not the rank-order fp32 sum of the rounded inputs"
                )
            if not np.all(np.abs(rs - s64[mine]) <= sum_err[mine]):
                bad.append(f"{scheme} reduce-scatter axis {axis}: beyond the fp32 sum's error")
            c = x.size // p
            bad += ledger_problems(
                comm,
                {f"tp.reduce_scatter_{scheme}": p * (2 * c + 4)},
                f"{scheme} reduce-scatter axis {axis}",
            )
            # all-gather: every rank's rounded input, in rank order along the axis
            ag = wire16.allgather_along(comm, x, axis)
            if not np.array_equal(ag, np.concatenate(list(xh), axis=axis)):
                bad.append(f"{scheme} all-gather axis {axis}: not the rounded inputs in rank order")
            full = np.concatenate(list(everyone), axis=axis)
            tiny = np.concatenate(
                [np.full(SHAPE, HALF_SUBNORMAL[scheme] / float(s)) for s in scales], axis=axis
            )
            if not np.all(np.abs(ag - full) <= u * np.abs(full) + tiny):
                bad.append(
                    f"{scheme} all-gather axis {axis}: further from the input than one rounding"
                )
            bad += ledger_problems(
                comm,
                {f"tp.allgather_{scheme}": p * (2 * x.size + 4)},
                f"{scheme} all-gather axis {axis}",
            )
            # the all-gather of the reduce-scatter is the allreduce (fp16: with the same pieces, axis 0)
            if (scheme == "bf16" or axis == 0) and not np.array_equal(
                wire16.allgather_along(comm, rs, axis), want
            ):
                bad.append(f"{scheme} axis {axis}: all-gather(reduce-scatter) is not the allreduce")
            comm.ledger.reset()

        # a message round the ring: the receiver gets the sender's rounded values, in half the bytes
        buf = np.empty_like(x)
        recv = comm.irecv(buf, (r - 1) % p, 7, "recv_forward")
        send = comm.isend(x, (r + 1) % p, 7, "send_forward")
        recv.wait()
        send.wait()
        if not np.array_equal(buf, xh[(r - 1) % p]):
            bad.append(f"{scheme} message: not the sender's rounded values")
        want_bytes = 2 * x.size + 4
        bad += ledger_problems(
            comm,
            {"tp.recv_forward": want_bytes, "tp.send_forward": want_bytes},
            f"{scheme} message",
        )
    if plain.with_wire("fp32") is not plain:
        bad.append("with_wire('fp32') is not the Comm itself")
    check(not bad, "\n".join(bad))


# name: (parallel.pp, parallel.tp, parallel.sequence_parallel)
LAYOUTS = {"pp2": (2, 1, False), "tp2": (1, 2, False), "tp2-sp": (1, 2, True)}
LOSS_RTOL = 2.0**-10  # measured, see the module docstring


@pytest.mark.parallel(nprocs=2)
def test_16bit_transfers_halve_the_bytes_and_keep_the_losses(data_dir, shared_tmp_path):
    bad = []
    for layout, (pp, tp, sp) in LAYOUTS.items():
        runs = {}
        for act in ("fp32", "bf16"):
            cfg = run_config(
                data_dir,
                shared_tmp_path / f"{layout}-{act}",
                **{
                    "parallel.pp": pp,
                    "parallel.tp": tp,
                    "parallel.act_comm": act,
                    "parallel.sequence_parallel": sp,
                    "train.precision": "bf16",
                    "train.grad_accum": 2,
                    "train.eval_iters": 0,
                },
            )
            tr = train(cfg, make_grid(MPI.COMM_WORLD, tp, pp))
            # the last step's (and the closing save's, which uses neither group)
            ledger = tr.grid.world.ledger.summary()
            runs[act] = (np.array(tr.metrics.train["loss"]), ledger)
        (loss32, l32), (loss16, l16) = runs["fp32"], runs["bf16"]
        rel = np.abs(loss16 - loss32) / np.abs(loss32)
        if not np.all(rel <= LOSS_RTOL):
            bad.append(
                f"{layout}: losses {loss16} vs fp32 transfers {loss32} (relative {rel.max():.2e})"
            )
        if layout == "pp2":
            kinds = sorted(k for k in l32 if k.startswith("pp."))
            if not kinds or sorted(k for k in l16 if k.startswith("pp.")) != kinds:
                bad.append(f"pp2: message kinds {kinds} vs {sorted(l16)}")
            for k in kinds:
                b32, n = l32[k]["bytes"], l32[k]["calls"]
                if (l16[k]["bytes"], l16[k]["calls"]) != (b32 // 2 + 4 * n, n):
                    bad.append(
                        f"pp2 {k}: {l16[k]} with bf16, {l32[k]} with fp32: not half (+ 4 bytes a message)"
                    )
        elif sp:
            # the sequence-parallel all-gathers and reduce-scatters: half the bytes + 4 per rank's piece
            for op in ("allgather", "reduce_scatter"):
                b32, n = l32[f"tp.{op}"]["bytes"], l32[f"tp.{op}"]["calls"]
                got, want = l16.get(f"tp.{op}_bf16", {}), (b32 // 2 + 4 * 2 * n, n)
                if n == 0 or (got.get("bytes"), got.get("calls")) != want or f"tp.{op}" in l16:
                    bad.append(f"tp2-sp {op}: {got} with bf16, {l32[f'tp.{op}']} with fp32")
        else:
            p, ce = (
                2,
                l16.get("tp.allreduce", {"bytes": 0, "calls": 0}),
            )  # the cross-entropy's, still fp32
            act_calls = l32["tp.allreduce"]["calls"] - ce["calls"]
            act_bytes = l32["tp.allreduce"]["bytes"] - ce["bytes"]
            got = l16.get("tp.allreduce_bf16", {})
            # two ledger entries per 16-bit allreduce (its alltoallv and its allgatherv), the bytes on the first
            want = {"bytes": act_bytes // 2 + 4 * p * act_calls, "calls": 2 * act_calls}
            if ce["calls"] == 0 or act_calls <= 0 or {k: got.get(k) for k in want} != want:
                bad.append(f"tp2: 16-bit allreduces {got}, expected {want}; fp32 {l32}, bf16 {l16}")
    check(not bad, "\n".join(bad))
