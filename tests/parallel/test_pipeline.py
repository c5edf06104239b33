"""Pipeline parallelism end to end, under mpiexec (mpi-pytest): pp2, pp4, pp2 x dp2 and pp2 x tp2 (also with sequence
parallelism: the messages between stages are then each TP rank's slice of positions), each with every schedule (1F1B,
interleaved with 2 virtual stages, GPipe, ZB-H1 (B and W apart), ZBV (two chunks per rank in a V, both ends of the
model on stage 0) and 1F1B on an uneven split) and ZeRO-1 off and on (on only where there is data parallelism to shard
over), dropout on, float64: losses, grad norms, evals and every parameter after the run equal the single-process run;
the tied embedding's two copies stay bitwise identical; DP replicas too. A pp2 x dp2 x tp2 ZeRO-1 checkpoint resumes at
pp1, pp4, tp4 and as a V (zbv: other layers on each stage) on the uninterrupted curve, each rank reading only its
stage's hyperslabs, and at the same layout bitwise; the API loads it, and the V's own checkpoint, as one model. The
send depth (PipelineComm's bound on the sends in flight, schedule_timing.send_depth): at pp2 and pp4 with each schedule,
a bounded run equals the unbounded one bitwise, with every send synchronous too (MPI_Issend: complete only once matched,
the worst case the depth was chosen for), and never holds more than the depth per direction across an op; settle()'s
rule itself on stand-in handles. The schedules' shapes are tests/parallel/test_schedule.py's; wrong layouts are
tests/parallel/test_parallel.py's table.

Tolerance 1e-10 relative, as tests/parallel/test_parallel.py derives it: a pipeline does the arithmetic of the single
process, micro-batch by micro-batch in the same order, except that the tied embedding's gradient is summed as
(embedding's share) + (head's share) over the two stages instead of interleaved per micro-batch, and tensor/data
parallelism reorder sums: float64 roundings, ~1e-16 relative per step (seen here: <= 3e-15).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from helpers import (
    F64_RTOL,
    check,
    count_reads,
    crc,
    hyperslab_checks,
    reference_checks,
    replica_checks,
    run_config,
    run_mpi,
    train,
    write_run_config,
)
from mpi4py import MPI

import hpc_llm
from hpc_llm.parallel.grid import make_grid, single_process_grid
from hpc_llm.parallel.pipeline_comm import PipelineComm
from hpc_llm.parallel.schedule_timing import send_depth
from hpc_llm.train.trainer import Trainer

# name: (ranks, parallel.pp, parallel.tp, parallel.sequence_parallel)
LAYOUTS = {
    "PP2": (2, 2, 1, False),
    "PP4": (4, 4, 1, False),
    "PP2xDP2": (4, 2, 1, False),
    "PP2xTP2": (4, 2, 2, False),
    "PP2xTP2-SP": (4, 2, 2, True),
}
N_LAYER, STEPS = 8, 3
COMMON = {
    "model.dtype": "float64",
    "model.dropout": 0.1,
    "model.n_layer": N_LAYER,
    "train.grad_accum": 4,
    "train.max_iters": STEPS,
    "train.eval_interval": STEPS,
}


def schedules(pp: int) -> dict:
    """name: overrides. The uneven split gives the first stage the most layers (as one would for the embedding)."""
    uneven = {2: [5, 3], 4: [3, 2, 2, 1]}[pp]
    return {
        "1f1b": {"parallel.schedule": "1f1b"},
        "interleaved": {"parallel.schedule": "interleaved", "parallel.virtual_stages": 2},
        "gpipe": {"parallel.schedule": "gpipe"},
        "zb-h1": {"parallel.schedule": "zb-h1"},
        "zbv": {"parallel.schedule": "zbv", "parallel.virtual_stages": 2},
        "1f1b-uneven": {"parallel.schedule": "1f1b", "parallel.pp_layers": uneven},
    }


def grid_for(overrides: dict, tp: int, pp: int):
    """The grid a schedule trains on: a V (zbv) holds both ends of the model on stage 0, so no embedding group."""
    return make_grid(MPI.COMM_WORLD, tp, pp, overrides.get("parallel.schedule") == "zbv")


def stage_checks(tr, pp: int, name: str) -> list[str]:
    """The rank holds what its stage should: its layers' blocks (a V: layers of virtual stages s and 2 pp - 1 - s),
    the embedding first and the head last (a V: both on stage 0, one copy, no embedding group); the tied embedding's
    copies are bitwise identical."""
    bad = []
    m, stage, vee = tr.model, tr.grid.pp_rank, tr.plan.v_shape
    held = (stage, 2 * pp - 1 - stage) if vee else tr.plan.chunks
    layers = sorted(i for c in held for i in tr.plan.layers[c])
    blocks = sorted({int(n.split(".")[1]) for n in m.params if n.startswith("h.")})
    head = 0 if vee else pp - 1
    if blocks != layers or m.has_embedding != (stage == 0) or m.has_head != (stage == head):
        bad.append(
            f"{name}: stage {stage} holds blocks {blocks} (plan {layers}), embedding {m.has_embedding}, "
            f"head {m.has_head}"
        )
    if (stage in (0, pp - 1) and not vee) != (tr.grid.emb_comm is not None):
        bad.append(f"{name}: stage {stage} of {pp}, embedding group {tr.grid.emb_comm}")
    if tr.grid.emb_comm is not None:
        crcs = tr.grid.emb_comm.mpi.allgather(crc(m.params["wte.weight"]))
        if len(set(crcs)) != 1:
            bad.append(f"{name}: the tied embedding's copies differ: crc32 {crcs}")
    return bad


def message_checks(tr, name: str) -> list[str]:
    """Every activation and gradient message of the last step and eval is one activation of this rank's rows: (rows,
    T, C), with sequence parallelism (rows, T/tp, C)."""
    m, ledger = tr.model, tr.grid.world.ledger
    T = m.cfg.block_size // (tr.grid.tp if m.sequence_parallel else 1)
    want = tr.cfg.train.batch_size // tr.grid.dp * T * m.cfg.n_embd * m.dtype.itemsize
    kinds = [k for k in ledger.calls if k.startswith(("pp.send_", "pp.recv_"))]
    sizes = {k: ledger.bytes[k] / ledger.calls[k] for k in kinds}
    if not kinds or any(v != want for v in sizes.values()):
        return [f"{name}: message bytes {sizes}, expected {want} each"]
    return []


@pytest.mark.parametrize(
    "layout",
    [pytest.param(n, marks=pytest.mark.parallel(nprocs=LAYOUTS[n][0]), id=n) for n in LAYOUTS],
)
def test_pipeline_matches_single_process(layout, data_dir, tmp_path, shared_tmp_path):
    ranks, pp, tp, sp = LAYOUTS[layout]
    assert MPI.COMM_WORLD.Get_size() == ranks
    ref = train(run_config(data_dir, tmp_path / "ref", **COMMON), single_process_grid())
    bad = []
    for sched, overrides in schedules(pp).items():
        # ZeRO-1 shards over data parallelism: without it, zero = 1 is the zero = 0 run again
        for zero in (0, 1) if ranks > pp * tp else (0,):
            name = f"{layout} {sched} zero{zero}"
            cfg = run_config(
                data_dir,
                shared_tmp_path / f"{sched}-{zero}",
                **{**COMMON, **overrides},
                **{
                    "parallel.pp": pp,
                    "parallel.tp": tp,
                    "parallel.zero": zero,
                    "parallel.sequence_parallel": sp,
                    # with sequence parallelism also selective recompute (bitwise the same as none)
                    "train.recompute": "selective" if sp else "none",
                },
            )
            tr = train(cfg, grid_for(overrides, tp, pp))
            if (tr.grid.pp, tr.grid.tp, tr.grid.dp, tr.sync.zero) != (
                pp,
                tp,
                ranks // (pp * tp),
                bool(zero) and ranks > pp * tp,
            ):
                bad.append(
                    f"{name}: grid pp {tr.grid.pp} tp {tr.grid.tp} dp {tr.grid.dp}, zero {tr.sync.zero}"
                )
            bad += reference_checks(tr, ref, name) + stage_checks(tr, pp, name)
            bad += message_checks(tr, name)
            bad += [f"{name}: {b}" for b in replica_checks(tr)]
    check(not bad, "\n".join(bad))


K, N = 2, 4  # save after K steps, resume to N


@pytest.mark.parallel(nprocs=8)
def test_pp2xdp2xtp2_checkpoint_resumes_under_other_layouts(data_dir, tmp_path, shared_tmp_path):
    world = MPI.COMM_WORLD
    common = {**COMMON, "model.n_layer": 4, "train.grad_accum": 2}

    def config(out, **overrides):
        return run_config(data_dir, out, **{**common, **overrides})

    ref = train(config(tmp_path / "ref", **{"train.max_iters": N}), single_process_grid())
    layout = {"parallel.pp": 2, "parallel.tp": 2, "parallel.zero": 1}
    first = train(
        config(shared_tmp_path / "first", **layout, **{"train.max_iters": K}),
        make_grid(world, 2, 2),
    )
    path = first.summary["checkpoint"]
    bad = []
    if (first.grid.pp, first.grid.dp, first.grid.tp, first.sync.zero, first.step) != (
        2,
        2,
        2,
        True,
        K,
    ):
        bad.append(
            f"first run: pp {first.grid.pp} dp {first.grid.dp} tp {first.grid.tp} zero {first.sync.zero}"
        )
    # the API reads a pipeline's checkpoint as one model: the reference's after K steps (its logits at step K)
    ref_k = train(config(tmp_path / "ref-k", **{"train.max_iters": K}), single_process_grid())
    idx = np.random.default_rng(0).integers(0, 256, (2, 16))
    got, want = hpc_llm.load_model(path, dtype="float64").logits(idx), ref_k.model.logits(idx)
    if not np.max(np.abs(got - want)) <= F64_RTOL * np.max(np.abs(want)):
        bad.append(
            f"load_model of the pp2 checkpoint: logits differ by {np.max(np.abs(got - want)):.3e}"
        )

    # name: (pp, tp, zero, grid factory, out_dir); every 8-rank grid is built, and its Trainer run, on all 8 ranks
    targets = {
        "PP4xDP2": (4, 1, 0, lambda: make_grid(world, 1, 4), shared_tmp_path / "pp4"),
        # the V: stage 0 holds layers 0 and 3 and both ends of the model, stage 1 layers 1 and 2
        "PP2xTP2xDP2-zbv-zero1": (
            2,
            2,
            1,
            lambda: make_grid(world, 2, 2, True),
            shared_tmp_path / "zbv",
        ),
        "TP4xDP2-zero1": (1, 4, 1, lambda: make_grid(world, 4, 1), shared_tmp_path / "tp4"),
        "PP1-single-process": (
            1,
            1,
            0,
            single_process_grid,
            tmp_path / "pp1",
        ),  # each rank its own run
    }
    for name, (pp, tp, zero, grid, out) in targets.items():
        vee = {"parallel.schedule": "zbv", "parallel.virtual_stages": 2} if "zbv" in name else {}
        with count_reads() as read:
            tr = train(
                config(
                    out,
                    **{
                        "train.max_iters": N,
                        "parallel.pp": pp,
                        "parallel.tp": tp,
                        "parallel.zero": zero,
                        **vee,
                    },
                ),
                grid(),
                resume=path,
            )
        bad += [f"{name}: {b}" for b in hyperslab_checks(tr, read)]
        bad += reference_checks(tr, ref, name, slice(K, None))
        if tr.grid.world.size > 1:
            bad += stage_checks(tr, pp, name) if pp > 1 else []
            bad += [f"{name}: {b}" for b in replica_checks(tr)]
        if vee:  # the V's own checkpoint, read as one model: the reference's at step N
            got = hpc_llm.load_model(tr.summary["checkpoint"], dtype="float64").logits(idx)
            want = ref.model.logits(idx)
            if not np.max(np.abs(got - want)) <= F64_RTOL * np.max(np.abs(want)):
                bad.append(
                    f"{name}: load_model of its checkpoint: logits differ from the reference's"
                )

    # the same layout: bitwise the uninterrupted run
    whole = train(
        config(shared_tmp_path / "whole", **layout, **{"train.max_iters": N}),
        make_grid(world, 2, 2),
    )
    again = train(
        config(shared_tmp_path / "again", **layout, **{"train.max_iters": N}),
        make_grid(world, 2, 2),
        resume=path,
    )
    history = ("step", "loss", "lr", "grad_norm")  # (the others are timings)
    if any(again.metrics.train[k] != whole.metrics.train[k] for k in history) or crc(
        again.model.flat
    ) != crc(whole.model.flat):
        bad.append(
            f"same-layout resume is not bitwise: losses {again.metrics.train['loss']} vs "
            f"{whole.metrics.train['loss']}"
        )
    if crc(again.opt.m) != crc(whole.opt.m) or crc(again.opt.v) != crc(whole.opt.v):
        bad.append("same-layout resume: Adam moments differ from the uninterrupted run's")
    check(not bad, "\n".join(bad))


class FakeSend:
    """A send that is delivered when the test says so; records when it was completed."""

    def __init__(self, log, name):
        self.log, self.name, self.delivered = log, name, False

    def test(self):
        return self.delivered

    def wait(self):
        self.log.append(self.name)


@pytest.mark.timeout(30)
def test_settle_completes_delivered_sends_and_waits_for_the_oldest_beyond_the_depth():
    log = []
    comm = SimpleNamespace(
        rank=0, size=2, isend=lambda buf, dest, tag, kind, sync: FakeSend(log, buf)
    )
    pipe = PipelineComm(comm, 1, depth=2)
    for name in ("f0", "f1"):
        pipe.send_forward(name, 0, 0)
        pipe.settle()
    assert log == [] and pipe.held_max == [2, 0]
    pipe.send_backward("b0", 0, 1)  # the other direction has its own depth
    pipe.settle()
    assert log == [] and pipe.held_max == [2, 1]
    pipe.send_forward("f2", 0, 0)
    pipe.settle()  # three forwards in flight: the oldest is waited for
    assert log == ["f0"] and pipe.depth_waits == 1 and pipe.held_max == [2, 1]
    pipe._sends[0][1].delivered = True  # f2 delivered before f1: completed, without a wait
    pipe.send_forward("f3", 0, 0)
    pipe.settle()
    assert log == ["f0", "f2"] and pipe.depth_waits == 1
    pipe.wait_sends()
    assert log == ["f0", "f2", "f1", "f3", "b0"] and pipe._sends == ([], [])


# name: (ranks = parallel.pp)
DEPTH_LAYOUTS = {"PP2": 2, "PP4": 4}


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(n, marks=pytest.mark.parallel(nprocs=DEPTH_LAYOUTS[n]), id=n)
        for n in DEPTH_LAYOUTS
    ],
)
def test_send_depth_changes_nothing_but_the_buffers_held(layout, data_dir, shared_tmp_path):
    """Each schedule three times: unbounded sends, the trainer's depth, and that depth with every send synchronous
    (so a send completes only once its receive is posted: if the depth could deadlock, this run would hang and the
    test time out). The histories and every parameter are bitwise the unbounded run's, and at most the depth of
    sends per direction was held across an op."""
    pp = DEPTH_LAYOUTS[layout]
    bad, waits = [], {}
    for sched, overrides in schedules(pp).items():
        if sched == "1f1b-uneven":
            continue
        runs = {}
        for mode in ("unbounded", "bounded", "synchronous"):
            cfg = run_config(
                data_dir,
                shared_tmp_path / f"{sched}-{mode}",
                **{
                    **overrides,
                    "model.n_layer": N_LAYER,
                    "parallel.pp": pp,
                    "train.grad_accum": 2 * pp,
                    "train.max_iters": 2,
                    "train.eval_interval": 2,
                },
            )
            tr = Trainer(cfg, grid=grid_for(overrides, 1, pp))
            v = cfg.parallel.virtual_stages
            want_depth = send_depth(cfg.parallel.schedule, pp, 2 * pp, v)
            if tr.pipe.depth != want_depth:
                bad.append(f"{sched}: the trainer's depth {tr.pipe.depth}, send_depth {want_depth}")
            if mode == "unbounded":
                tr.pipe.depth = None
            tr.pipe.synchronous = mode == "synchronous"
            tr.run()
            runs[mode] = tr
            if mode != "unbounded" and max(tr.pipe.held_max) > want_depth:
                bad.append(
                    f"{sched} {mode}: held {tr.pipe.held_max} sends across an op, depth {want_depth}"
                )
            waits[sched, mode] = tr.pipe.depth_waits
        ref = runs["unbounded"]
        for mode in ("bounded", "synchronous"):
            tr = runs[mode]
            if any(tr.metrics.train[k] != ref.metrics.train[k] for k in ("loss", "grad_norm")) or (
                tr.metrics.eval != ref.metrics.eval
            ):
                bad.append(f"{sched} {mode}: history differs from the unbounded run's")
            if crc(tr.model.flat) != crc(ref.model.flat):
                bad.append(f"{sched} {mode}: parameters differ from the unbounded run's")
    # the bound was at work somewhere (how often depends on timing: a synchronous send completes when its receiver's
    # MPI library acknowledges it); each schedule's count is in the message on failure
    every = MPI.COMM_WORLD.allreduce(sum(waits[k] for k in waits if k[1] == "synchronous"))
    if every == 0:
        bad.append(f"no depth wait in any synchronous run: {waits}")
    check(not bad, "\n".join(bad))


# rank 1 raises in its third forward of the step (1F1B at pp 2, m 4: F2, while rank 0 waits in a receive)
FAILING_STAGE = """
import sys
from mpi4py import MPI
from hpc_llm.cli import main
from hpc_llm.model.chunk import Chunk
if MPI.COMM_WORLD.rank == 1:
    forward, calls = Chunk.forward, []
    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure in rank 1's third pipeline forward")
        return forward(self, *args, **kwargs)
    Chunk.forward = failing
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_failing_inside_the_pipeline_ends_the_job(data_dir, tmp_path):
    """A stage that raises mid-step, while its neighbour waits for it in a point-to-point receive: the job ends
    (mpiexec's status non-zero, the error on stderr) instead of hanging in the wait; run_mpi fails the test on a
    hang. (A rank that stops without exiting is the watchdog's case: tests/runtime/test_faults.py.)"""
    cfg = write_run_config(tmp_path / "run.toml", data_dir, tmp_path / "out")
    rc, out, err, _ = run_mpi(
        2,
        ["train", str(cfg), "--set", "parallel.pp=2", "--set", "train.grad_accum=4"],
        entry=("-c", FAILING_STAGE),
    )
    assert rc != 0 and "injected failure in rank 1's third pipeline forward" in err, (rc, out, err)
    assert not list((tmp_path / "out").glob("ckpt_*.h5"))  # nothing saved from a failed step
