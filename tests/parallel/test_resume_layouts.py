"""A checkpoint written by one layout resumes under another: a DP2 x TP2 ZeRO-1 run saves after K steps, then TP4,
DP4 (ZeRO-1) and a single process each resume it to N steps and follow the uninterrupted single-process run, each rank
reading only its hyperslabs of the file. The same with sequence parallelism on the saving side, resumed with and
without it, and bitwise at its own layout.

float64, with dropout: the masks are a function of (seed, step, micro-batch, global row), so a change of layout cannot
change them, and every run does the same arithmetic as the reference except for the order of sums (matmuls over TP
shards plus
allreduces, gradient buckets reduced across DP ranks), i.e. ~1e-16 relative per step; 1e-10 relative leaves ample
room (test_parallel.py saw at most ~5e-13). Parameters are compared normwise per tensor (max abs difference against
1e-10 * max |reference|): the key bias has a true gradient of zero, so elementwise relative error there is noise.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    F64_RTOL,
    check,
    count_reads,
    full_flat,
    hyperslab_checks,
    rel_diff,
    replica_checks,
    run_config,
    train,
)
from mpi4py import MPI

from hpc_llm.parallel.grid import make_grid, single_process_grid

K, N = 3, 6
COMMON = {
    "model.dtype": "float64",
    "model.dropout": 0.1,
    "train.grad_accum": 2,
    "train.eval_iters": 0,
}


def compare(tr, ref, name: str) -> list[str]:
    """Steps K+1..N of tr's history (its first K entries came from the checkpoint) and its final parameters."""
    bad = []
    got, want = tr.metrics.train, ref.metrics.train
    if (
        tr.step != N
        or got["step"] != list(range(1, N + 1))
        or want["step"] != list(range(1, N + 1))
    ):
        return [f"{name}: step {tr.step}, history steps {got['step']}, reference {want['step']}"]
    for key in ("loss", "grad_norm"):
        a, b = got[key][K:], want[key][K:]
        if not rel_diff(a, b) <= F64_RTOL:
            bad.append(
                f"{name} {key} after resume: {a} vs reference {b} (relative {rel_diff(a, b):.2e})"
            )
    if got["lr"][K:] != want["lr"][K:]:
        bad.append(f"{name} lr after resume: {got['lr'][K:]} vs reference {want['lr'][K:]}")
    params, ref_params = (
        tr.model.full_tensors(full_flat(tr)),
        ref.model.full_tensors(ref.model.flat),
    )
    for pname, w in ref_params.items():
        g = params[pname]
        if g.dtype != np.float64 or g.shape != w.shape:
            bad.append(f"{name} {pname}: {g.dtype} {g.shape} vs reference {w.dtype} {w.shape}")
            continue
        err, bound = float(np.max(np.abs(g - w))), F64_RTOL * float(np.max(np.abs(w)))
        if not err <= bound:
            bad.append(f"{name} parameter {pname}: max abs difference {err:.3e} > {bound:.3e}")
    return bad


def bitwise_checks(tr, full, name: str) -> list[str]:
    """A run resumed at its own layout against the uninterrupted one: histories, this rank's parameters and Adam
    moments bitwise equal."""
    bad = [
        f"{name} {key}: not bitwise the uninterrupted run's"
        for key in ("loss", "grad_norm", "lr")
        if tr.metrics.train[key] != full.metrics.train[key]
    ]
    for what, a, b in (
        ("parameters", tr.model.flat, full.model.flat),
        ("Adam m", tr.opt.m, full.opt.m),
        ("Adam v", tr.opt.v, full.opt.v),
    ):
        if not np.array_equal(a, b):
            bad.append(f"{name}: {what} not bitwise the uninterrupted run's")
    return bad


@pytest.mark.parallel(nprocs=4)
def test_dp2xtp2_checkpoint_resumes_under_other_layouts(data_dir, tmp_path, shared_tmp_path):
    assert MPI.COMM_WORLD.Get_size() == 4
    ref = train(
        run_config(data_dir, tmp_path / "ref", **COMMON, **{"train.max_iters": N}),
        single_process_grid(),
    )
    first = train(
        run_config(
            data_dir,
            shared_tmp_path / "first",
            **COMMON,
            **{"train.max_iters": K, "parallel.tp": 2, "parallel.zero": 1},
        ),
        make_grid(MPI.COMM_WORLD, 2),
    )
    path = first.summary["checkpoint"]
    bad = []
    if first.grid.dp != 2 or first.grid.tp != 2 or not first.sync.zero or first.step != K:
        bad.append(
            f"first run: dp {first.grid.dp}, tp {first.grid.tp}, zero {first.sync.zero}, step {first.step}"
        )
    if not rel_diff(first.metrics.train["loss"], ref.metrics.train["loss"][:K]) <= F64_RTOL:
        bad.append(
            f"first {K} steps: {first.metrics.train['loss']} vs reference {ref.metrics.train['loss'][:K]}"
        )

    # name: (tp, zero, grid factory, out_dir); every 4-rank grid is built, and its Trainer run, on all 4 ranks
    targets = {
        "TP4": (4, 0, lambda: make_grid(MPI.COMM_WORLD, 4), shared_tmp_path / "tp4"),
        "DP4-zero1": (1, 1, lambda: make_grid(MPI.COMM_WORLD, 1), shared_tmp_path / "dp4"),
        "TP1-single-process": (
            1,
            0,
            single_process_grid,
            tmp_path / "tp1",
        ),  # each rank its own run and out_dir
    }
    for name, (tp, zero, grid, out) in targets.items():
        with count_reads() as read:
            tr = train(
                run_config(
                    data_dir,
                    out,
                    **COMMON,
                    **{"train.max_iters": N, "parallel.tp": tp, "parallel.zero": zero},
                ),
                grid(),
                resume=path,
            )
        bad += [f"{name}: {b}" for b in hyperslab_checks(tr, read)]
        ranks = tr.grid.world.size
        if (ranks, tr.grid.tp, tr.sync.zero) != (
            (1 if name.startswith("TP1") else 4),
            tp,
            bool(zero),
        ):
            bad.append(f"{name}: {ranks} ranks, tp {tr.grid.tp}, zero {tr.sync.zero}")
        bad += compare(tr, ref, name)
        if ranks > 1:
            bad += [f"{name}: {b}" for b in replica_checks(tr)]
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=4)
def test_sequence_parallel_checkpoint_resumes_under_other_layouts(
    data_dir, tmp_path, shared_tmp_path
):
    """A DP2 x TP2 ZeRO-1 run with sequence parallelism saves after K steps (the checkpoint is logical, like any
    other): at the same layout the resumed run ends bitwise equal to the uninterrupted one (losses, grad norms,
    parameters, this rank's Adam moments); DP2 x TP2 without sequence parallelism, TP4 with it and a single process
    each resume it on the single process's curve."""
    assert MPI.COMM_WORLD.Get_size() == 4
    sp = {"parallel.tp": 2, "parallel.zero": 1, "parallel.sequence_parallel": True}
    ref = train(
        run_config(data_dir, tmp_path / "ref", **COMMON, **{"train.max_iters": N}),
        single_process_grid(),
    )
    full = train(
        run_config(data_dir, shared_tmp_path / "full", **COMMON, **sp, **{"train.max_iters": N}),
        make_grid(MPI.COMM_WORLD, 2),
    )
    first = train(
        run_config(data_dir, shared_tmp_path / "first", **COMMON, **sp, **{"train.max_iters": K}),
        make_grid(MPI.COMM_WORLD, 2),
    )
    path = first.summary["checkpoint"]
    bad = []
    if not (first.model.sequence_parallel and first.grid.dp == 2 and first.sync.zero):
        bad.append(f"first run: dp {first.grid.dp}, zero {first.sync.zero}, not sequence parallel")
    bad += compare(full, ref, "uninterrupted DP2xTP2-SP-zero1")

    # name: (overrides, grid factory, out_dir); every 4-rank grid is built, and its Trainer run, on all 4 ranks
    targets = {
        "DP2xTP2-SP-zero1": (sp, lambda: make_grid(MPI.COMM_WORLD, 2), shared_tmp_path / "same"),
        "DP2xTP2-zero1": (
            {**sp, "parallel.sequence_parallel": False},
            lambda: make_grid(MPI.COMM_WORLD, 2),
            shared_tmp_path / "dp2xtp2",
        ),
        "TP4-SP": (
            {"parallel.tp": 4, "parallel.sequence_parallel": True},
            lambda: make_grid(MPI.COMM_WORLD, 4),
            shared_tmp_path / "tp4",
        ),
        "TP1-single-process": ({}, single_process_grid, tmp_path / "tp1"),
    }
    for name, (overrides, grid, out) in targets.items():
        tr = train(
            run_config(data_dir, out, **COMMON, **overrides, **{"train.max_iters": N}),
            grid(),
            resume=path,
        )
        if tr.model.sequence_parallel != overrides.get("parallel.sequence_parallel", False):
            bad.append(f"{name}: sequence parallel {tr.model.sequence_parallel}")
        bad += compare(tr, ref, name)
        if tr.grid.world.size > 1:
            bad += [f"{name}: {b}" for b in replica_checks(tr)]
        if name == "DP2xTP2-SP-zero1":
            bad += bitwise_checks(tr, full, name)
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=4)
def test_zero3_checkpoint_resumes_under_other_layouts(data_dir, tmp_path, shared_tmp_path):
    """A DP4 ZeRO-3 run saves after K steps, each rank writing only the parameter and moment pieces it owns: at the
    same layout the resumed run ends bitwise equal to the uninterrupted one (losses, grad norms, this rank's
    parameter pieces and Adam moments), reading only about 1/dp of the parameters; DP2 x TP2 with ZeRO-1, DP4
    without ZeRO and a single process each resume it on the single process's curve."""
    assert MPI.COMM_WORLD.Get_size() == 4
    z3 = {"parallel.zero": 3}
    ref = train(
        run_config(data_dir, tmp_path / "ref", **COMMON, **{"train.max_iters": N}),
        single_process_grid(),
    )
    full = train(
        run_config(data_dir, shared_tmp_path / "full", **COMMON, **z3, **{"train.max_iters": N}),
        make_grid(MPI.COMM_WORLD, 1),
    )
    first = train(
        run_config(data_dir, shared_tmp_path / "first", **COMMON, **z3, **{"train.max_iters": K}),
        make_grid(MPI.COMM_WORLD, 1),
    )
    path = first.summary["checkpoint"]
    bad = compare(full, ref, "uninterrupted DP4-zero3")
    # name: (overrides, tp, out_dir); every 4-rank grid is built, and its Trainer run, on all 4 ranks
    targets = {
        "DP4-zero3": (z3, 1, shared_tmp_path / "same"),
        "DP2xTP2-zero1": ({"parallel.tp": 2, "parallel.zero": 1}, 2, shared_tmp_path / "dp2xtp2"),
        "DP4-zero0": ({}, 1, shared_tmp_path / "dp4"),
        "TP1-single-process": ({}, None, tmp_path / "tp1"),
    }
    for name, (overrides, tp, out) in targets.items():
        grid = single_process_grid() if tp is None else make_grid(MPI.COMM_WORLD, tp)
        with count_reads() as read:
            tr = train(
                run_config(data_dir, out, **COMMON, **overrides, **{"train.max_iters": N}),
                grid,
                resume=path,
            )
        if tr.sync.stage != overrides.get("parallel.zero", 0) * (tr.grid.dp > 1):
            bad.append(f"{name}: ZeRO stage {tr.sync.stage}")
        bad += [f"{name}: {b}" for b in hyperslab_checks(tr, read)]
        bad += compare(tr, ref, name)
        if tr.grid.world.size > 1:
            bad += [f"{name}: {b}" for b in replica_checks(tr)]
        if name == "DP4-zero3":
            bad += bitwise_checks(tr, full, name)
    check(not bad, "\n".join(bad))
