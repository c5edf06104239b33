"""ZeRO-2 and ZeRO-3 (parallel/zero.py) under mpiexec: training with gradients (2) and parameters too (3) sharded
over the data-parallel group follows the single-process run on the same data, at dp 2 and 4, with tensor and
pipeline parallelism, sequence parallelism, recompute, bf16 and with the gathered parameters kept from forward to
backward; and a rank holds only what its stage says: 1/dp of the Adam moments, its pieces' gradients, and (ZeRO-3)
its pieces' parameters, the rest of each buffer zero (released) between steps.

Tolerances are test_parallel.py's (derived there): float64 1e-10 relative (the runs differ in the order of sums only:
each micro-batch's unit gradients are reduced, then summed over micro-batches, where the single process sums first);
bf16 is compared with bf16 at the same dp without ZeRO (why: that test's docstring).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    INTERLEAVED,
    check,
    compare_runs,
    full_flat,
    reference_checks,
    replica_checks,
    run_config,
    train,
)
from mpi4py import MPI

from hpc_llm.parallel.grid import make_grid, single_process_grid
from hpc_llm.plan.memory import Bytes, Layout
from hpc_llm.plan.sharding import dp_bytes_per_step
from hpc_llm.train.trainer import Trainer

# name: (ranks, parallel.tp, parallel.pp, parallel.zero, other settings)
CASES = {
    "DP2-zero2": (2, 1, 1, 2, {}),
    "DP2-zero3": (2, 1, 1, 3, {}),
    "DP4-zero3": (4, 1, 1, 3, {"train.grad_accum": 1}),
    "DP2xTP2-zero2": (4, 2, 1, 2, {}),
    "DP2xTP2-zero3-SP-selective": (
        4,
        2,
        1,
        3,
        {"parallel.sequence_parallel": True, "train.recompute": "selective"},
    ),
    "PP2xDP2-zero3": (4, 1, 2, 3, {"train.grad_accum": 4}),
    "PP2xDP2-zero2-interleaved": (4, 1, 2, 2, INTERLEAVED),
    "DP2-zero3-kept-for-backward-block-recompute": (
        2,
        1,
        1,
        3,
        {"parallel.reshard_after_forward": False, "train.recompute": "block"},
    ),
}


def sharding_checks(tr, stage: int) -> list[str]:
    """What a rank holds between steps: Adam moments for its pieces only (together the whole buffer), gradients
    zero outside its pieces, and (ZeRO-3) parameters zero outside them."""
    bad, m, sync = [], tr.model, tr.sync
    n, dp = m.local_size, tr.grid.dp
    if sync.stage != stage or len(sync.buckets) < 3:
        bad.append(f"ZeRO stage {sync.stage} with {len(sync.buckets)} unit buckets")
    total = tr.grid.dp_comm.mpi.allreduce(tr.opt.m.size)
    if total != n or abs(tr.opt.m.size - n / dp) > len(sync.buckets):
        bad.append(f"Adam m: {tr.opt.m.size} here, {total} over dp {dp}, for {n} elements")
    outside = ~covered(sync.owned, n)
    for what, buf, held in (("gradients", m.grad_flat, True), ("parameters", m.flat, stage >= 3)):
        nonzero = int(np.count_nonzero(buf[outside]))
        if held and nonzero:
            bad.append(f"{nonzero} {what} outside this rank's pieces are not zero")
    if stage >= 3 and m.kept != sorted(sync.owned):
        bad.append("ZeRO-3: the model keeps other ranges than the rank owns")
    return bad


def covered(ranges, n: int):
    """A mask of the n elements of a flat buffer: True inside the [start, stop) ranges."""
    mask = np.zeros(n, dtype=bool)
    for a, b in ranges:
        mask[a:b] = True
    return mask


PARAMS = [
    pytest.param(name, marks=pytest.mark.parallel(nprocs=case[0]), id=name)
    for name, case in CASES.items()
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", PARAMS)
def test_zero_matches_single_process(name, data_dir, tmp_path, shared_tmp_path):
    """float64 with dropout, STEPS steps and an eval: losses, grad norms, evals and every parameter equal to the
    single process's to 1e-10; replicas' gathered parameters bitwise equal; the shards as the stage says."""
    ranks, tp, pp, zero, extra = CASES[name]
    assert MPI.COMM_WORLD.Get_size() == ranks
    common = {
        "model.dtype": "float64",
        "model.dropout": 0.1,
        "train.grad_accum": 2,
        **{k: v for k, v in extra.items() if not k.startswith("parallel.")},
    }
    par = train(
        run_config(
            data_dir,
            shared_tmp_path / "par",
            **common,
            **{k: v for k, v in extra.items() if k.startswith("parallel.")},
            **{"parallel.tp": tp, "parallel.pp": pp, "parallel.zero": zero},
        ),
        make_grid(MPI.COMM_WORLD, tp, pp),
    )
    ref = train(run_config(data_dir, tmp_path / "ref", **common), single_process_grid())
    bad = reference_checks(par, ref, name) + replica_checks(par) + sharding_checks(par, zero)
    check(not bad, f"{name}:\n" + "\n".join(bad))


@pytest.mark.timeout(300)
@pytest.mark.parallel(nprocs=2)
@pytest.mark.parametrize("zero", [2, 3])
def test_zero_in_bf16_matches_replicated_bf16(zero, data_dir, shared_tmp_path):
    """train.precision = bf16 at dp 2: ZeRO-3 gathers the compute copy (the rounded weights) and keeps the master
    weights sharded. Against the same dp 2 run without ZeRO, which computes the same rows on each rank: the two
    differ only in the order of the float64 gradient norm's sums, so to the float32 bounds. (Against one process
    bf16 is not comparable so: the key bias's true gradient is zero and bf16's rounding makes it noise of ~1e-6,
    which Adam turns into steps of about +-lr whose sign follows the order of the sums.)"""
    common = {"model.dtype": "float32", "train.precision": "bf16", "model.dropout": 0.1}
    grid = make_grid(MPI.COMM_WORLD, 1)
    par = train(
        run_config(data_dir, shared_tmp_path / "par", **common, **{"parallel.zero": zero}), grid
    )
    ref = train(run_config(data_dir, shared_tmp_path / "ref", **common), grid)
    bad = compare_runs(par, ref, "float32") + sharding_checks(par, zero)
    if zero == 3:  # the compute copy too holds only this rank's pieces between steps
        kept = covered(par.model.kept, par.model.local_size)
        if np.count_nonzero(par.model.compute[~kept]) or par.model.compute is par.model.flat:
            bad.append("the bf16 compute copy holds parameters outside this rank's pieces")
        if not np.array_equal(full_flat(par)[kept], par.model.flat[kept]):
            bad.append("gathered parameters differ from this rank's own pieces")
    check(not bad, "\n".join(bad))


@pytest.mark.timeout(300)
@pytest.mark.parallel(nprocs=4)
@pytest.mark.parametrize(
    "pp, accum, reshard",
    [(1, 2, True), (2, 2, True), (1, 2, False)],
    ids=["dp4", "pp2xdp2", "kept"],
)
def test_planner_counts_the_bytes_each_stage_sends(pp, accum, reshard, data_dir, shared_tmp_path):
    """One step at each ZeRO stage: the data-parallel bytes the ledger records on each rank are the planner's
    (plan/sharding.dp_bytes_per_step, which walks the rank's op list with the hooks' rules), to the byte."""
    bad = []
    for zero in (0, 1, 2, 3):
        tr = Trainer(
            run_config(
                data_dir,
                shared_tmp_path / f"zero{zero}",
                **{
                    "parallel.pp": pp,
                    "parallel.zero": zero,
                    "parallel.reshard_after_forward": reshard,
                    "train.grad_accum": accum,
                },
            ),
            grid=make_grid(MPI.COMM_WORLD, 1, pp),
        )
        ledger = tr.grid.world.ledger
        ledger.reset()
        tr.train_step()
        sent = sum(v["bytes"] for k, v in ledger.summary().items() if k.startswith("dp."))
        lay = Layout.of(tr.cfg, tr.grid.dp)
        want = dp_bytes_per_step(tr.model.specs, tr.plan, lay, Bytes.of(tr.model.dtype.itemsize))
        if sent != want:
            bad.append(f"zero {zero}: the ledger counts {sent} bytes, the planner {want}")
    check(not bad, "\n".join(bad))
