"""Data and tensor parallelism end to end, under mpiexec with 2 and 4 ranks (mpi-pytest): training on a DP/TP grid,
with and without ZeRO-1, follows the single-process run on the same data; replicas stay bitwise identical; a parallel
checkpoint loads in one process; resume is exact; a wrong layout fails cleanly on every rank.

Each parallel test also trains the single-process reference on every rank (`grid=single_process_grid()`, its own
out_dir), so each rank compares itself with it. Tolerances:

- float64, normwise per tensor 1e-10 (loss and grad norm: relative 1e-10): the parallel run does the same arithmetic as
  the reference except for the order of sums (matmuls over shards plus allreduces, gradient buckets reduced across DP
  ranks), i.e. ~1e-16 relative per step. The largest difference seen is ~5e-13, in the key bias, whose true gradient
  is zero (softmax ignores a per-query constant), so Adam turns rounding noise into a step of lr * noise / eps.
- float32: loss, grad norm and eval losses relative 1e-5 (seen: ~1e-8 and ~2e-7). Parameters: absolute 1e-3 * sum of
  the learning rates used. Adam's step is normalised, so every parameter moves by at most about lr per step whatever
  its gradient; sum(lr) is the scale of all training-induced change. Rounding changes a step by a relative ~1e-7 where
  the gradient is well determined, but where the gradient is itself rounding noise (the key bias again, float32 noise
  ~1e-10) the step is lr * noise / (|noise| + eps), a few 1e-3 of lr; seen: 7e-6 = 1.6e-4 * sum(lr).

Every assertion on the ranks goes through `check` (mpi-pytest's parallel_assert), so all ranks agree on the verdict.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import (
    CLI_TIMEOUT,
    F32_RTOL,
    check,
    compare_runs,
    flip_byte_in,
    replica_checks,
    run_config,
    run_mpi,
    train,
    write_run_config,
)
from mpi4py import MPI

import hpc_llm
from hpc_llm.checkpoint import load_checkpoint
from hpc_llm.parallel.grid import make_grid, single_process_grid
from hpc_llm.runtime.stop import StopRequest
from hpc_llm.train.trainer import VAL_STREAM, Trainer

# name: (ranks, parallel.tp, train.grad_accum, parallel.sequence_parallel)
LAYOUTS = {
    "DP2": (2, 1, 2, False),
    "TP2": (2, 2, 1, False),
    "TP4": (4, 4, 1, False),
    "DP2xTP2": (4, 2, 2, False),
    "DP4": (4, 1, 1, False),
    "TP2-SP": (2, 2, 2, True),
    "DP2xTP2-SP": (4, 2, 2, True),
}


def optimizer_state_checks(tr: Trainer, zero: int) -> list[str]:
    """ZeRO-1 keeps 1/dp of the Adam moments per rank (the ranks' pieces partition the buffer); without it, all."""
    bad = []
    n, dp = tr.model.local_size, tr.grid.dp
    state = tr.opt.m.size + tr.opt.v.size
    if zero and dp > 1:
        total = tr.grid.dp_comm.mpi.allreduce(tr.opt.m.size)
        n_buckets = len(tr.sync.buckets)
        if (
            not tr.sync.zero
            or total != n
            or abs(tr.opt.m.size - n / dp) > n_buckets
            or state != 2 * tr.opt.m.size
        ):
            bad.append(
                f"ZeRO-1 state: {state} elements here ({tr.opt.m.size} per moment, {total} over the DP group) "
                f"for a flat buffer of {n} over dp {dp} ({n_buckets} buckets)"
            )
    elif state != 2 * n:
        bad.append(f"optimizer state {state} elements, expected 2 x {n}")
    return bad


LAYOUT_PARAMS = [
    pytest.param(
        name, zero, marks=pytest.mark.parallel(nprocs=LAYOUTS[name][0]), id=f"{name}-zero{zero}"
    )
    for name in LAYOUTS
    for zero in (0, 1)
]


@pytest.mark.parametrize("layout, zero", LAYOUT_PARAMS)
def test_training_matches_single_process(layout, zero, data_dir, tmp_path, shared_tmp_path):
    """STEPS steps on the grid vs the single-process run, with dropout, float64 (tight) and float32: losses, grad
    norms, evals and parameters; DP replicas bitwise identical; ZeRO-1's optimizer state 1/dp per rank. -SP:
    sequence parallelism (the stream between layers cut along T over the TP group, its dropouts on the slices), with
    selective recompute."""
    ranks, tp, accum, sp = LAYOUTS[layout]
    assert MPI.COMM_WORLD.Get_size() == ranks
    grid = make_grid(MPI.COMM_WORLD, tp)
    bad = []
    for dtype in ("float64", "float32"):
        # dropout masks are a function of the global row, so the grid draws the single process's masks
        common = {"model.dtype": dtype, "train.grad_accum": accum, "model.dropout": 0.1}
        par = train(
            run_config(
                data_dir,
                shared_tmp_path / f"par-{dtype}",
                **common,
                **{"parallel.tp": tp, "parallel.zero": zero, "parallel.sequence_parallel": sp},
                # with sequence parallelism also selective recompute (bitwise the same as none: test_recompute.py)
                **({"train.recompute": "selective"} if sp else {}),
            ),
            grid,
        )
        ref = train(
            run_config(data_dir, tmp_path / f"ref-{dtype}", **common), single_process_grid()
        )
        if (
            par.grid.dp != ranks // tp
            or par.grid.tp != tp
            or len(par.sync.buckets) < 4
            or par.model.sequence_parallel != sp
            or par.model.recompute != ("selective" if sp else "none")
        ):
            bad.append(
                f"layout: dp {par.grid.dp}, tp {par.grid.tp}, {len(par.sync.buckets)} buckets, "
                f"sequence parallel {par.model.sequence_parallel}"
            )
        bad += compare_runs(par, ref, dtype)
        bad += replica_checks(par)
        bad += optimizer_state_checks(par, zero)
    check(not bad, f"{layout} zero {zero}:\n" + "\n".join(bad))


@pytest.mark.parallel(nprocs=4)
def test_parallel_checkpoint_loads_in_one_process(data_dir, shared_tmp_path):
    """A DP2 x TP2 ZeRO-1 run's checkpoint holds the full tensors: hpc_llm.load_model gives a single-process model
    with the same parameters (bitwise) and the same loss (float32, relative 1e-5: only the TP sums' order differs);
    the stored Adam moments are each rank's ZeRO-1 shard, bitwise."""
    grid = make_grid(MPI.COMM_WORLD, 2)
    tr = train(
        run_config(
            data_dir,
            shared_tmp_path / "run",
            **{"train.max_iters": 4, "train.eval_iters": 0, "parallel.tp": 2, "parallel.zero": 1},
        ),
        grid,
    )
    path = tr.summary["checkpoint"]
    bad = []
    if MPI.COMM_WORLD.allgather(path) != [path] * 4:
        bad.append(f"ranks disagree on the checkpoint path: {path}")
    model = hpc_llm.load_model(path)
    full = tr.model.full_tensors(tr.model.flat)
    if model.tp.size != 1 or model.flat.dtype != np.float32:
        bad.append(f"loaded model: tp {model.tp.size}, {model.flat.dtype}")
    for name, p in full.items():
        if not np.array_equal(model.params[name], p):
            bad.append(f"loaded {name} differs from the parallel model's")
    for i in range(2):
        # this DP rank's rows; its TP group shares them
        x, y = tr.batch(tr.val_tokens, i, 0, VAL_STREAM)
        want, got = tr.model.loss(x, y), model.loss(x, y)
        if not (math.isfinite(got) and abs(got - want) <= F32_RTOL * abs(want)):
            bad.append(f"batch {i}: loaded model's loss {got!r}, parallel model's {want!r}")
    saved = load_checkpoint(path)
    layout = saved.state["layout"]
    if layout != {"world": 4, "pp": 1, "dp": 2, "tp": 2, "zero": 1} or saved.state["step"] != 4:
        bad.append(f"checkpoint state: layout {layout}, step {saved.state['step']}")
    for slot in ("m", "v"):
        flat = np.zeros_like(tr.model.flat)
        tr.model.load_flat(flat, saved.optimizer[slot], f"optimizer {slot}")
        mine = np.concatenate([flat[a:b] for a, b in tr.sync.owned])
        if not np.array_equal(mine, getattr(tr.opt, slot)):
            bad.append(
                f"checkpoint optimizer {slot}: this rank's ZeRO-1 shard differs from its Adam state"
            )
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=2)
def test_exact_resume_dp2_zero1(data_dir, shared_tmp_path):
    """DP2 with ZeRO-1, dropout and gradient accumulation: k steps, save, a new Trainer resumes and finishes; losses,
    grad norms, parameters and this rank's Adam moments equal the uninterrupted run's bitwise."""
    grid = make_grid(MPI.COMM_WORLD, 1)
    N, k = 6, 3
    common = {
        "model.dropout": 0.1,
        "train.grad_accum": 2,
        "train.eval_iters": 0,
        "parallel.zero": 1,
    }
    full = train(
        run_config(data_dir, shared_tmp_path / "full", **common, **{"train.max_iters": N}), grid
    )
    first = train(
        run_config(data_dir, shared_tmp_path / "split", **common, **{"train.max_iters": k}), grid
    )
    second = train(
        run_config(data_dir, shared_tmp_path / "split", **common, **{"train.max_iters": N}),
        grid,
        resume=first.summary["checkpoint"],
    )
    bad = []
    if not (second.sync.zero and first.step == k and second.step == N):
        bad.append(f"zero {second.sync.zero}, steps {first.step} and {second.step}")
    if first.metrics.train["loss"] != full.metrics.train["loss"][:k]:
        bad.append(f"first part: {first.metrics.train['loss']} vs {full.metrics.train['loss'][:k]}")
    for key in ("step", "loss", "grad_norm", "lr"):
        if second.metrics.train[key] != full.metrics.train[key]:
            bad.append(
                f"resumed {key}: {second.metrics.train[key]} vs uninterrupted {full.metrics.train[key]}"
            )
    for what, a, b in (
        ("parameters", second.model.flat, full.model.flat),
        ("Adam m", second.opt.m, full.opt.m),
        ("Adam v", second.opt.v, full.opt.v),
    ):
        if not np.array_equal(a, b):
            bad.append(f"resumed {what} differ from the uninterrupted run's")
    if second.opt.t != full.opt.t:
        bad.append("resumed Adam step counter differs")
    bad += replica_checks(second)
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=2)
def test_stop_signal_on_one_rank_stops_every_rank_at_the_same_step(data_dir, shared_tmp_path):
    """SIGUSR1 reaches rank 1 only (a real signal, during step 3): both ranks stop at the same step boundary, write one
    verified checkpoint there and report the signal; no rank waits in a collective the other never enters."""

    class SignalledAtStep3(Trainer):
        def train_step(self):
            if self.step == 2 and self.grid.world.rank == 1:
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().train_step()

    cfg = run_config(
        data_dir, shared_tmp_path / "stop", **{"train.max_iters": 20, "train.eval_iters": 0}
    )
    with StopRequest() as stop:
        tr = SignalledAtStep3(cfg, grid=make_grid(MPI.COMM_WORLD, 1), stop=stop)
        summary = tr.run()
    bad = []
    if summary["stopped_by"] != signal.SIGUSR1 or summary["step"] != 3:
        bad.append(f"summary {summary}")
    saved = load_checkpoint(summary["checkpoint"])
    if saved.state["step"] != 3 or len(saved.metrics["train"]["loss"]) != 3:
        bad.append(
            f"checkpoint at step {saved.state['step']} with {len(saved.metrics['train']['loss'])} losses"
        )
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=2)
@pytest.mark.parametrize(
    "dataset", ["params/h.0.attn.c_attn.weight", "optimizer/v/wte.weight", "params/ln_f.bias"]
)
def test_corrupt_checkpoint_fails_resume_on_every_rank(dataset, data_dir, shared_tmp_path):
    """A flipped byte in one dataset: the rank whose share of the verification holds it finds it (whether it read
    that dataset whole or checksums it separately), and every rank raises the same one-line UserError."""

    from hpc_llm.errors import UserError

    grid = make_grid(MPI.COMM_WORLD, 1)
    cfg = run_config(
        data_dir,
        shared_tmp_path / "run",
        **{"train.max_iters": 2, "train.eval_iters": 0, "parallel.zero": 1},
    )
    path = train(cfg, grid).summary["checkpoint"]
    if MPI.COMM_WORLD.rank == 0:
        flip_byte_in(path, dataset, index=5)
    MPI.COMM_WORLD.Barrier()
    try:
        Trainer(
            run_config(
                data_dir, shared_tmp_path / "run", **{"train.max_iters": 4, "parallel.zero": 1}
            ),
            resume=str(path),
            grid=grid,
        )
        error = None
    except UserError as e:
        error = str(e)
    errors = MPI.COMM_WORLD.allgather(error)
    check(
        error is not None
        and "checksum mismatch" in error
        and f"/{dataset}" in error
        and len(set(errors)) == 1,
        f"errors: {errors}",
    )


# -- a wrong layout fails cleanly on every rank (serial tests that launch the CLI under mpiexec) ----------------------


BAD_LAYOUTS = [
    # id, ranks, overrides, what the one error line must say
    (
        "tp-not-dividing-n_head",
        2,
        ["parallel.tp=2", "model.n_head=3", "model.n_embd=48"],
        ["parallel.tp=2", "model.n_head=3"],
    ),
    ("tp-not-dividing-ranks", 4, ["parallel.tp=3"], ["parallel.tp=3", "number of ranks (4)"]),
    (
        "batch-not-divisible-by-dp",
        2,
        ["train.batch_size=3"],
        ["train.batch_size=3", "data-parallel size 2"],
    ),
    (
        "missing-data-path",
        2,
        ["data.path={tmp}/no_such_data"],
        ["{tmp}/no_such_data", "does not exist"],
    ),
    (
        "pp-not-dividing-ranks",
        4,
        ["parallel.pp=3", "model.n_layer=3"],
        ["parallel.pp=3", "number of ranks (4)"],
    ),
    (
        "pp-x-tp-not-dividing-ranks",
        4,
        ["parallel.pp=2", "parallel.tp=4"],
        ["parallel.pp=2", "parallel.tp=4"],
    ),
    (
        "pp-not-dividing-layers",
        2,
        ["parallel.pp=2", "model.n_layer=3"],
        ["parallel.pp:", "model.n_layer=3", "parallel.pp_layers", "got 2"],
    ),
    (
        "virtual-stages-not-dividing-layers",
        2,
        [
            "parallel.pp=2",
            "parallel.schedule=interleaved",
            "parallel.virtual_stages=3",
            "train.grad_accum=2",
        ],
        ["parallel.virtual_stages=3", "model.n_layer=2"],
    ),
    (
        "interleaved-fewer-micro-batches-than-stages",
        2,
        [
            "parallel.pp=2",
            "parallel.schedule=interleaved",
            "parallel.virtual_stages=2",
            "model.n_layer=4",
        ],
        ["train.grad_accum", "parallel.pp=2", "got 1"],
    ),
    (
        "virtual-stages-without-interleaving",
        2,
        ["parallel.pp=2", "parallel.virtual_stages=2", "model.n_layer=4"],
        ["parallel.virtual_stages", "interleaved", "got 2"],
    ),
    (
        "pp_layers-not-summing",
        2,
        ["parallel.pp=2", "parallel.pp_layers=[2,1]"],
        ["parallel.pp_layers", "model.n_layer=2", "[2, 1]"],
    ),
    (
        "stage-without-layers",
        2,
        ["parallel.pp=2", "parallel.pp_layers=[2,0]"],
        ["parallel.pp_layers", "at least one layer", "[2, 0]"],
    ),
    (
        "pp_layers-wrong-length",
        2,
        ["parallel.pp=2", "parallel.pp_layers=[2]"],
        ["parallel.pp_layers", "expected 2 entries", "[2]"],
    ),
    ("unknown-precision", 2, ["train.precision=fp8"], ["train.precision", "'fp8'"]),
    (
        "low-precision-with-float64",
        2,
        ["train.precision=bf16", "model.dtype=float64"],
        ["train.precision", "float32 master weights"],
    ),
    (
        "fp16-without-a-scale",
        2,
        ["train.precision=fp16", "train.loss_scale_init=0"],
        ["train.loss_scale_init"],
    ),
    ("unknown-recompute", 2, ["train.recompute=full"], ["train.recompute", "'full'"]),
]


@pytest.mark.parametrize(
    "ranks, overrides, expected", [pytest.param(*case[1:], id=case[0]) for case in BAD_LAYOUTS]
)
def test_wrong_layout_fails_cleanly_on_every_rank(ranks, overrides, expected, data_dir, tmp_path):
    cfg = write_run_config(tmp_path / "run.toml", data_dir, tmp_path / "out")
    args = ["train", str(cfg)]
    for o in overrides:
        args += ["--set", o.format(tmp=tmp_path)]
    rc, out, err, seconds = run_mpi(ranks, args)
    report = f"rc {rc} in {seconds:.1f} s\nstdout:\n{out}\nstderr:\n{err}"
    assert rc == 2, report
    errors = [line for line in err.splitlines() if line.startswith("hpc-llm: error: ")]
    assert len(errors) == ranks, report  # one line per rank
    assert len(set(errors)) == 1, report  # the same verdict everywhere
    for text in expected:
        assert text.format(tmp=tmp_path) in errors[0], report
    assert "Traceback" not in out + err, report
    assert not (tmp_path / "out").exists()  # nothing written before the layout was checked


def test_pipeline_from_the_cli_then_generate(data_dir, tmp_path):
    """`mpiexec -n 2 hpc-llm train --set parallel.pp=2`: the log gives the layout and each stage's layers; the
    checkpoint holds the whole model, which `hpc-llm generate` samples from in one process."""
    cfg = write_run_config(tmp_path / "run.toml", data_dir, tmp_path / "out")
    rc, out, err, _ = run_mpi(
        2, ["train", str(cfg), "--set", "parallel.pp=2", "--set", "train.grad_accum=2"]
    )
    assert rc == 0, out + err
    assert "2 ranks = pp 2 x dp 1 x tp 1" in out, out
    assert (
        "pipeline: 2 stages x 1 virtual, schedule 1f1b, 2 micro-batches; layers per (virtual) stage 0: 0-0, 1: 1-1"
        in out
    ), out
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpc_llm",
            "generate",
            str(tmp_path / "out"),
            "--prompt",
            "the cat",
            "--max-new-tokens",
            "12",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert (
        r.returncode == 0 and r.stdout.startswith("the cat") and len(r.stdout) > len("the cat") + 6
    ), r
