#!/usr/bin/env python
"""Pipeline-parallel benchmark: the bubble per stage, activation memory per stage, throughput beside dp/tp.

    export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
    mpiexec -n 2 python scripts/bench/bench_pipeline.py bubble  # pp 2: gpipe, 1f1b, interleaved, zb-h1 x m 4, 8, 16
    mpiexec -n 4 --oversubscribe python scripts/bench/bench_pipeline.py bubble  # pp 4
    mpiexec -n 2 python scripts/bench/bench_pipeline.py memory --schedule gpipe --m 8   # one configuration per process
    mpiexec -n 2 python scripts/bench/bench_pipeline.py throughput --preset 6x384 --layouts pp2,dp2,tp2
    mpiexec -n 4 --oversubscribe python scripts/bench/bench_pipeline.py throughput --preset 6x384 \\
        --layouts pp2xdp2,dp4,tp2xdp2,pp4:1/2/2/1
    python scripts/bench/bench_pipeline.py all --json out.json   # all of it, each part under its own mpiexec

The real Trainer (Trainer.train_step, the code path of `hpc-llm train`) on random tokens, on a grid from make_grid;
nothing is saved. Per step, after a barrier: the step's wall time (the max over ranks), and per rank the comm ledger
(reset before the step), the time inside every chunk forward/backward (the rank's pipeline compute, timed by wrapping
the chunks' methods) and the time of the whole schedule (run_schedule).

- bubble: per stage, the ledger's pp.* seconds (waits for activations and gradients, and for the sends at the end of the
  step) / step time; 1 - the stage's chunk compute / the pipeline's makespan (barrier to the last rank's end of
  run_schedule: the bubble as the formula counts it, including the last stage's drain, which it spends after its
  schedule, waiting in the tied-embedding allreduce, not in pp.*); 1 - compute / step time (the optimizer, norm and
  embedding allreduce too). Beside them (p-1)/(m+p-1) (interleaved: (p-1)/(v m+p-1); zb-h1: (p-1)/(3m+p-1), its B and
  W each half a backward as long as a forward), schedule_timing.simulate's bubble, and the same event simulation fed
  with each stage's measured median forward/backward (B and W) time per chunk (what the imbalance between stages alone
  explains). scripts/bench/bench_zero_bubble.py sets zb-h1 beside 1F1B in time per stage. Medians over --steps after
  --warmup steps; the JSON also has the last step's timeline (every op's start and end on rank 0's clock) and the
  waits by kind.
- memory: one configuration per process (peak RSS is a high-water mark): ru_maxrss after the steps, and the
  tracemalloc peak of one step above what was allocated before it (NumPy reports its buffers to tracemalloc: this is
  the step's activations, temporaries and message buffers), beside the activations the schedule keeps alive at once
  (schedule.in_flight, with the per-layer sizes of bench_train.activation_bytes).
- throughput: the same model and global batch (train.batch_size sequences x train.grad_accum micro-batches) on
  several layouts: tokens/s (median step), and the ledger's bytes per step summed over ranks, by group prefix (a
  point-to-point message counts at its sender, send_*, and at its receiver, recv_*; a collective its buffer on each
  rank). Layouts alternate step by step unless --sequential (which holds one trainer at a time: GPT-2 small). A
  layout is pp/dp/tp sizes joined by x, with the layers per stage after a colon where they do not split evenly or
  should not: pp2, tp2xdp2, pp4:1/2/2/1, pp2:8/4.

Rank 0 prints Markdown tables and, with --json, writes the rows. Speed is never asserted: the figures go into
docs/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path

from common import PRESETS, random_tokens, vm_hwm

# mpi4py is imported by the parts that run under mpiexec only: the `all` driver launches mpiexec itself and must not
# be an MPI singleton.

BUBBLE_MODEL = dict(n_layer=8, n_head=4, n_embd=256, block_size=128, vocab_size=65)


def median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def layout_of(text: str, world: int) -> dict:
    """'pp2', 'dp2', 'tp2xdp2', 'pp2xdp2', 'pp4:1/2/2/1' (layers per stage) -> {tp, pp, dp, pp_layers}."""
    spec, _, layers = text.partition(":")
    sizes = {"pp": 1, "dp": 1, "tp": 1}
    for part in spec.split("x"):
        m = re.fullmatch(r"(pp|dp|tp)(\d+)", part)
        if not m:
            raise SystemExit(f"layout {text!r}: expected e.g. pp2, dp2, tp2xdp2, pp4:1/2/2/1")
        sizes[m.group(1)] = int(m.group(2))
    if sizes["pp"] * sizes["dp"] * sizes["tp"] != world:
        raise SystemExit(
            f"layout {text!r} needs {sizes['pp'] * sizes['dp'] * sizes['tp']} ranks, not {world}"
        )
    return {
        **sizes,
        "pp_layers": [int(x) for x in layers.split("/")] if layers else [],
        "name": text,
    }


def make_config(
    data: Path,
    out: Path,
    model: dict,
    batch: int,
    m: int,
    pp: int = 1,
    tp: int = 1,
    schedule: str = "1f1b",
    v: int = 1,
    pp_layers=(),
):
    from hpc_llm.config import Config
    from hpc_llm.config.checks import validated

    cfg = Config()
    for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        setattr(cfg.model, k, model[k])
    cfg.data.path = str(data)
    t = cfg.train
    t.batch_size, t.grad_accum = batch, m
    t.out_dir = str(out)
    t.peak_tflops = 1.0  # no peak measurement at start
    t.eval_iters = 0
    par = cfg.parallel
    par.tp, par.pp, par.schedule, par.virtual_stages, par.pp_layers = (
        tp,
        pp,
        schedule,
        v,
        list(pp_layers),
    )
    return validated(cfg)


class Probe:
    """Times this rank's pipeline compute (every chunk forward and backward; where the schedule splits backwards,
    B as "B" and W as "W") and the whole schedule of each step."""

    def __init__(self, trainer):
        self.ops: list[
            tuple[str, int, float, float]
        ] = []  # (kind, chunk, start, end) of the current step
        self.pipe = 0.0
        for k, chunk in enumerate(trainer.model.chunks):
            chunk.forward = self._timed(chunk.forward, "F", k)
            chunk.backward = self._timed(chunk.backward, "B", k)
            chunk.backward_input = self._timed(chunk.backward_input, "B", k)
            chunk.backward_weight = self._timed(chunk.backward_weight, "W", k)
        _PIPE_PROBE[0] = self

    def _timed(self, fn, kind: str, k: int):
        def run(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.ops.append((kind, k, t0, time.perf_counter()))

        return run

    def reset(self) -> None:
        self.ops, self.pipe = [], 0.0


_PIPE_PROBE: list = [None]


def _install_schedule_timer() -> None:
    """Wrap the run_schedule that Trainer.train_step calls, to time the pipeline phase of the step (once)."""
    import hpc_llm.train.trainer as train_mod

    if getattr(train_mod.run_schedule, "_bench_timed", False):
        return
    inner = train_mod.run_schedule

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            if _PIPE_PROBE[0] is not None:
                _PIPE_PROBE[0].pipe = time.perf_counter() - t0

    timed._bench_timed = True
    train_mod.run_schedule = timed


def timed_step(tr, world, probe=None) -> dict:
    """One train_step after a barrier: per rank, its wall time, pipeline phase, compute, ledger; plus the max."""
    from mpi4py import MPI

    ledger = tr.grid.world.ledger
    ledger.reset()
    if probe is not None:
        probe.reset()
    world.Barrier()
    t0 = time.perf_counter()  # CLOCK_MONOTONIC: the same clock in every process of the machine
    t_ref = world.bcast(t0)  # rank 0's start: the timelines of all ranks on one axis
    loss, _, _ = tr.train_step()
    wall = time.perf_counter() - t0
    step = world.allreduce(wall, op=MPI.MAX)
    s = ledger.summary()
    pipe_max = world.allreduce(probe.pipe, op=MPI.MAX) if probe else None
    return {
        "step": step,
        "wall": wall,
        "loss": loss,
        "ledger": s,
        "pipe": probe.pipe if probe else None,
        "pipe_max": pipe_max,
        "ops": [(k, c, b - a) for k, c, a, b in probe.ops] if probe else None,
        "timeline": [(k, c, a - t_ref, b - t_ref) for k, c, a, b in probe.ops] if probe else None,
    }


def prefix_sums(summary: dict, what: str) -> dict:
    out = defaultdict(float)
    for k, v in summary.items():
        out[k.split(".")[0]] += v[what]
    return dict(out)


def simulate_measured(lists, v: int, t_f, t_b, t_w=None):
    """schedule_timing.simulate_lists with a cost per (rank, chunk): t_f[r][c], t_b[r][c] (a whole backward, or B where
    the lists have W ops), t_w[r][c] seconds; no transfer time. -> (makespan, busy per rank)."""
    from hpc_llm.parallel.schedule import Phase
    from hpc_llm.parallel.schedule_timing import simulate_lists

    times = {Phase.FORWARD: t_f, Phase.BACKWARD: t_b, Phase.WEIGHT: t_w}
    timing = simulate_lists(lists, v, cost=lambda r, op, later: times[op.kind][r][op.chunk])
    return timing.makespan, timing.busy


# -- data ------------------------------------------------------------------------------------------------------------


def shared_dir(world, vocab: int, n_tokens: int = 2_000_000) -> Path:

    tmp = tempfile.mkdtemp(prefix="hpc_llm_bench_pp_") if world.rank == 0 else None
    tmp = Path(world.bcast(tmp))
    if world.rank == 0:
        random_tokens(tmp, vocab, n_tokens)
    world.Barrier()
    return tmp


def cleanup(world, tmp: Path) -> None:
    world.Barrier()
    if world.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)


def fmt_stages(xs, scale: float = 100.0, digits: int = 1) -> str:
    return " / ".join(f"{scale * x:.{digits}f}" for x in xs)


def write_json(path, obj) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1) + "\n")


# -- 1. bubble -------------------------------------------------------------------------------------------------------


def stage_summary(tr, steps: list[dict], v: int) -> dict:
    """This rank's medians over the steps: pp wait, compute, pipeline phase and their fractions; each chunk's
    forward and backward time; the last step's ops on one time axis."""
    mine = {k: [] for k in ("pp_wait", "compute", "pipe", "recv_f", "recv_b", "send")}
    fr = {k: [] for k in ("idle", "not_computing", "idle_pipe", "overhead_pipe", "tail_pipe")}
    op_times = defaultdict(list)
    for s in steps:
        led = s["ledger"]
        wait = sum(v_["seconds"] for k, v_ in led.items() if k.startswith("pp."))
        comp = sum(t for _, _, t in s["ops"])
        mine["pp_wait"].append(wait)
        mine["compute"].append(comp)
        mine["pipe"].append(s["pipe"])
        mine["recv_f"].append(led.get("pp.recv_forward", {}).get("seconds", 0.0))
        mine["recv_b"].append(led.get("pp.recv_backward", {}).get("seconds", 0.0))
        sends = ("pp.send_forward", "pp.send_backward")
        mine["send"].append(sum(led.get(k, {}).get("seconds", 0.0) for k in sends))
        fr["idle"].append(wait / s["step"])
        fr["not_computing"].append(1 - comp / s["step"])
        # the pipeline phase: from the barrier to the last rank's end of run_schedule (its makespan)
        fr["idle_pipe"].append(1 - comp / s["pipe_max"])
        # done, others still busy
        fr["tail_pipe"].append((s["pipe_max"] - s["pipe"]) / s["pipe_max"])
        # executor, posting, copies
        fr["overhead_pipe"].append((s["pipe"] - comp - wait) / s["pipe_max"])
        for kind, c, t in s["ops"]:
            op_times[kind, c].append(t)
    stage = {k: median(x) for k, x in {**mine, **fr}.items()}
    stage["t_f"] = [median(op_times["F", c]) for c in range(v)]
    stage["t_b"] = [median(op_times["B", c]) for c in range(v)]
    stage["t_w"] = [median(op_times["W", c]) for c in range(v)]  # nan without W ops
    # the last step's ops on one time axis (ms from rank 0's start, after the barrier): where the waits are
    stage["timeline"] = [
        (op.kind, op.micro, op.chunk, round(1e3 * a, 2), round(1e3 * b, 2))
        for op, (_, _, a, b) in zip(tr.ops, steps[-1]["timeline"])
    ]
    return stage


def bubble_row(args, sched: str, p: int, m: int, v: int, steps: list, gathered: list) -> dict:
    """One configuration: the measured idle beside the formula, the schedule's simulation, and the simulation fed
    with the measured forward/backward times."""
    from hpc_llm.parallel.schedule import SPLIT
    from hpc_llm.parallel.schedule import schedule as make_schedule
    from hpc_llm.parallel.schedule_timing import simulate

    lists = [make_schedule(sched, p, r, m, v) for r in range(p)]
    span, busy = simulate_measured(
        lists, v, *([g[k] for g in gathered] for k in ("t_f", "t_b", "t_w"))
    )
    step_ms = 1e3 * median([s["step"] for s in steps])
    row = {
        "pp": p,
        "schedule": sched,
        "v": v,
        "m": m,
        "batch": args.batch,
        # zb-h1 with t_f = t_b = t_w (its B and W each half a backward): (p - 1) / (3 m + p - 1)
        "formula": (p - 1) / ((3 if sched in SPLIT else v) * m + p - 1),
        "simulate": simulate(sched, p, m, v, t_f=1.0, t_b=1.0, t_w=1.0).bubble,
        "simulate_measured": [(span - b) / span for b in busy],
        "simulate_measured_ms": 1e3 * span,
        "step_ms": step_ms,
        "steps_ms": [1e3 * s["step"] for s in steps],
        "loss": steps[-1]["loss"],
        "stages": gathered,
    }
    print(
        f"pp {p} {sched:11s} m {m:2d}: step {step_ms:7.1f} ms, idle (pp wait / step) "
        f"{fmt_stages([g['idle'] for g in gathered])} %, 1 - compute / makespan "
        f"{fmt_stages([g['idle_pipe'] for g in gathered])} %, formula {100 * row['formula']:.1f} %",
        flush=True,
    )
    return row


def bubble(args) -> None:
    from mpi4py import MPI

    from hpc_llm.parallel.grid import make_grid
    from hpc_llm.train.trainer import Trainer

    world = MPI.COMM_WORLD
    p = world.size
    model = dict(
        BUBBLE_MODEL,
        n_layer=args.layers,
        n_embd=args.embd,
        n_head=args.heads,
        block_size=args.block,
    )
    tmp = shared_dir(world, model["vocab_size"])
    _install_schedule_timer()
    rows = []
    for sched in args.schedules:
        v = args.virtual if sched == "interleaved" else 1
        for m in args.ms:
            if sched == "interleaved" and m % p:
                continue
            cfg = make_config(tmp, tmp / "run", model, args.batch, m, pp=p, schedule=sched, v=v)
            tr = Trainer(cfg, grid=make_grid(world, 1, p))
            probe = Probe(tr)
            for _ in range(args.warmup):
                timed_step(tr, world, probe)
            steps = [timed_step(tr, world, probe) for _ in range(args.steps)]
            gathered = world.gather(stage_summary(tr, steps, v))
            if world.rank == 0:
                rows.append(bubble_row(args, sched, p, m, v, steps, gathered))
            del tr, probe
            gc.collect()
    if world.rank == 0:
        print()
        print(bubble_table(rows))
        write_json(
            args.json,
            {"part": "bubble", "ranks": p, "model": model, "args": vars(args), "rows": rows},
        )
    cleanup(world, tmp)


def bubble_table(rows) -> str:
    lines = [
        "| pp | schedule | m | formula | simulate (t_b = t_w = t_f) | simulate with measured op times, per stage "
        "(mean) | pp wait / step, per stage | 1 - compute / pipeline makespan, per stage (mean) | "
        "1 - compute / step, per stage | step ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        st = r["stages"]
        name = r["schedule"] + (f" (v {r['v']})" if r["v"] > 1 else "")
        sim, idle = r["simulate_measured"], [g["idle_pipe"] for g in st]
        lines.append(
            f"| {r['pp']} | {name} | {r['m']} | {100 * r['formula']:.1f}% | {100 * r['simulate']:.1f}% | "
            f"{fmt_stages(sim)} ({100 * sum(sim) / len(sim):.1f}%) | "
            f"{fmt_stages([g['idle'] for g in st])} | "
            f"{fmt_stages(idle)} ({100 * sum(idle) / len(idle):.1f}%) | "
            f"{fmt_stages([g['not_computing'] for g in st])} | {r['step_ms']:.0f} |"
        )
    return "\n".join(lines)


# -- 2. memory -------------------------------------------------------------------------------------------------------


def expected_activations(model_cfg, plan_layers, ops, p: int, stage: int, rows: int) -> int:
    """Bytes of activations kept for backward at the schedule's worst moment on this stage: the alive (micro, chunk)
    pairs of `ops`, each its chunk's layers x bench_train's per-layer size (+ ln_f and probabilities on the head)."""
    from bench_train import activation_bytes

    from hpc_llm.parallel.schedule import Phase, splits

    frees = (
        Phase.WEIGHT if splits(ops) else Phase.BACKWARD
    )  # kept whole until its W: an upper bound
    final = activation_bytes(dataclasses.replace(model_cfg, n_layer=0), rows)
    per_layer = activation_bytes(dataclasses.replace(model_cfg, n_layer=1), rows) - final
    n_virtual = len(plan_layers)

    def size(chunk: int) -> int:
        vstage = chunk * p + stage
        return len(plan_layers[vstage]) * per_layer + (final if vstage == n_virtual - 1 else 0)

    alive, most, now = set(), 0, 0
    for op in ops:
        if op.kind == Phase.FORWARD:
            alive.add((op.micro, op.chunk))
            now += size(op.chunk)
            most = max(most, now)
        elif op.kind == frees:
            alive.discard((op.micro, op.chunk))
            now -= size(op.chunk)
    return most


def memory(args) -> None:
    from mpi4py import MPI

    from hpc_llm.parallel.grid import make_grid
    from hpc_llm.train.trainer import Trainer

    world = MPI.COMM_WORLD
    p = args.pp or world.size
    v = args.virtual if args.schedule == "interleaved" else 1
    model = dict(
        BUBBLE_MODEL,
        n_layer=args.layers,
        n_embd=args.embd,
        n_head=args.heads,
        block_size=args.block,
    )
    tmp = shared_dir(world, model["vocab_size"])
    cfg = make_config(
        tmp, tmp / "run", model, args.batch, args.m, pp=p, schedule=args.schedule, v=v
    )
    tr = Trainer(cfg, grid=make_grid(world, 1, p))
    gathered = world.gather(stage_memory(args, tr, p, v))
    if world.rank == 0:
        row = {
            "pp": p,
            "schedule": args.schedule,
            "v": v,
            "m": args.m,
            "batch": args.batch,
            "stages": gathered,
        }
        print(memory_table([row]))
        print("JSON " + json.dumps(row))
        write_json(args.json, {"part": "memory", "model": model, "args": vars(args), "rows": [row]})
    cleanup(world, tmp)


def stage_memory(args, tr, p: int, v: int) -> dict:
    """This rank's memory in one step after the warm-up: peaks (tracemalloc, ru_maxrss, VmHWM) beside what the
    schedule keeps in flight and the activations expected of it."""
    from hpc_llm.config import stage_layers
    from hpc_llm.parallel.schedule import in_flight

    cfg = tr.cfg
    for _ in range(args.warmup):
        tr.train_step()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    tr.train_step()
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    rows = tr.rows.stop - tr.rows.start
    layers = stage_layers(cfg.model.n_layer, p * v, cfg.parallel.pp_layers)
    return {
        "stage": tr.grid.pp_rank,
        "ru_maxrss": rss,
        "vm_hwm": vm_hwm(),
        "tracemalloc_step_peak": peak,
        "in_flight": in_flight(tr.ops),
        "expected_activations": expected_activations(
            cfg.model, layers, tr.ops, p, tr.grid.pp_rank, rows
        ),
        "message_bytes": rows * cfg.model.block_size * cfg.model.n_embd * tr.model.dtype.itemsize,
        "state_bytes": 4 * tr.model.flat.nbytes
        if not tr.sync.zero
        else None,  # weights, grads, Adam m, v
        "layers": sum(len(layers[c * p + tr.grid.pp_rank]) for c in range(v)),
    }


def memory_table(rows) -> str:
    mib = 2**20
    lines = [
        "| pp | schedule | m | stage (layers) | micro-batches alive (schedule) | expected kept activations | "
        "tracemalloc peak of one step | peak RSS (ru_maxrss) | weights + grads + Adam |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        name = r["schedule"] + (f" (v {r['v']})" if r["v"] > 1 else "")
        for g in r["stages"]:
            alive = f"{g['in_flight']}" + (" (micro, chunk)s" if r["v"] > 1 else "")
            lines.append(
                f"| {r['pp']} | {name} | {r['m']} | {g['stage']} ({g['layers']}) | {alive} | "
                f"{g['expected_activations'] / mib:.0f} MiB | {g['tracemalloc_step_peak'] / mib:.0f} MiB | "
                f"{g['ru_maxrss'] / mib:.0f} MiB | {g['state_bytes'] / mib:.0f} MiB |"
            )
    return "\n".join(lines)


# -- 3. throughput ---------------------------------------------------------------------------------------------------


def throughput(args) -> None:
    from mpi4py import MPI

    from hpc_llm.parallel.grid import make_grid
    from hpc_llm.train.trainer import Trainer

    world = MPI.COMM_WORLD
    preset = PRESETS[args.preset]
    model = {k: preset[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    batch = args.batch or preset["batch"]
    tmp = shared_dir(world, model["vocab_size"])
    layouts = [layout_of(t, world.size) for t in args.layouts]

    def build(lay):
        cfg = make_config(
            tmp,
            tmp / "run",
            model,
            batch,
            args.m,
            pp=lay["pp"],
            tp=lay["tp"],
            schedule=args.schedule,
            pp_layers=lay["pp_layers"],
        )
        tr = Trainer(cfg, grid=make_grid(world, lay["tp"], lay["pp"]))
        # weights, gradients, Adam m and v of this rank (no ZeRO here): what pp and tp divide and dp does not
        state[lay["name"]] = world.allreduce(4 * tr.model.flat.nbytes, op=MPI.MAX)
        return tr

    state = {}
    results = run_layouts(args, world, build, layouts)
    tokens = batch * args.m * model["block_size"]
    rows = []
    for lay in layouts:
        row = throughput_row(world, results[lay["name"]], tokens)
        if world.rank == 0:
            row.update(preset=args.preset, layout=lay["name"], batch=batch, m=args.m)
            row.update({k: lay[k] for k in ("pp", "dp", "tp", "pp_layers")})
            row.update(schedule=args.schedule if lay["pp"] > 1 else None)
            row["state_bytes_max_rank"] = state[lay["name"]]
            rows.append(row)
    if world.rank == 0:
        print(throughput_table(rows))
        write_json(
            args.json, {"part": "throughput", "model": model, "args": vars(args), "rows": rows}
        )
    cleanup(world, tmp)


def run_layouts(args, world, build, layouts) -> dict:
    """{layout name: timed steps}: the layouts' trainers built once and stepped in turn (the machine's drift hits
    all alike), or with --sequential one after the other (when they do not fit in memory together)."""
    results = {lay["name"]: [] for lay in layouts}
    if args.sequential:
        for lay in layouts:
            tr = build(lay)
            for _ in range(args.warmup):
                timed_step(tr, world)
            results[lay["name"]] = [timed_step(tr, world) for _ in range(args.steps)]
            del tr
            gc.collect()
        return results
    trainers = {lay["name"]: build(lay) for lay in layouts}
    for _ in range(args.warmup):
        for tr in trainers.values():
            timed_step(tr, world)
    for _ in range(args.steps):
        for name, tr in trainers.items():
            results[name].append(timed_step(tr, world))
    return results


def throughput_row(world, steps: list[dict], tokens: int) -> dict:
    """One layout's tokens/s and its communication: bytes by group summed over ranks, exposed seconds per rank
    (on rank 0; an empty dict elsewhere)."""
    step = median([s["step"] for s in steps])
    by_secs = [prefix_sums(s["ledger"], "seconds") for s in steps]
    secs = {k: median([b.get(k, 0.0) for b in by_secs]) for k in set().union(*by_secs)}
    allb = world.gather(prefix_sums(steps[-1]["ledger"], "bytes"))
    alls = world.gather(secs)
    if world.rank != 0:
        return {}
    total = defaultdict(float)
    for b in allb:
        for k, x in b.items():
            total[k] += x
    return {
        "ranks": world.size,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step,
        "step_ms": 1e3 * step,
        "steps_ms": [1e3 * s["step"] for s in steps],
        "loss_first": steps[0]["loss"],
        "bytes_by_group": dict(total),
        "comm_seconds_per_rank": alls,
        "comm_exposed_ms_max_rank": 1e3 * max(sum(s.values()) for s in alls),
    }


def throughput_table(rows) -> str:
    lines = [
        "| model | ranks | layout | global batch (rows x micro-batches) | tokens/s | step ms | loss, first timed "
        "step | pp MB | dp MB | tp MB | emb MB | other MB | time in comm, busiest rank | weights + grads + Adam, "
        "largest rank |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        b = dict(r["bytes_by_group"])
        mb = {k: b.pop(k, 0.0) / 1e6 for k in ("pp", "dp", "tp", "emb")}
        other = sum(b.values()) / 1e6
        name = r["layout"] + (f" ({r['schedule']})" if r["schedule"] else "")
        lines.append(
            f"| {r['preset']} | {r['ranks']} | {name} | {r['batch']} x {r['m']} | {r['tokens_per_s']:,.0f} | "
            f"{r['step_ms']:,.0f} | {r['loss_first']:.4f} | {mb['pp']:.1f} | {mb['dp']:.1f} | "
            f"{mb['tp']:.1f} | {mb['emb']:.1f} | {other:.1f} | {r['comm_exposed_ms_max_rank']:.0f} ms | "
            f"{r.get('state_bytes_max_rank', float('nan')) / 2**20:,.0f} MiB |"
        )
    return "\n".join(lines)


# -- all: every part, each under its own mpiexec ---------------------------------------------------------------------


class Launcher:
    """Runs one part under its own mpiexec (oversubscribed past the cores) and returns its --json; keeps a log of
    the commands with their seconds and the load average before each."""

    def __init__(self, args):
        self.mpiexec = args.mpiexec or shutil.which("mpiexec") or "mpiexec"
        self.out = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
        self.cores = os.cpu_count() or 1
        self.log: list[dict] = []

    def __call__(self, n: int, part: str, *extra: str) -> dict:
        path = self.out / f"{len(self.log):02d}_{part}.json"
        cmd = (
            [self.mpiexec, "-n", str(n)]
            + (["--oversubscribe"] if n > self.cores else [])
            + [sys.executable, str(Path(__file__).resolve()), part, "--json", str(path), *extra]
        )
        t0, load = time.perf_counter(), os.getloadavg()
        print(
            f"$ {' '.join(cmd)}    # load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
            flush=True,
        )
        subprocess.run(cmd, check=True)
        dt = time.perf_counter() - t0
        self.log.append({"cmd": cmd, "seconds": dt, "loadavg_before": load})
        print(f"  ({dt:.0f} s)", flush=True)
        return json.loads(path.read_text())


def throughput_runs(args) -> list[tuple[int, list[str]]]:
    """The throughput parts of `all`: (ranks, arguments)."""
    if args.smoke:
        small = ["--preset", "shakespeare-char", "--batch", "4", "--steps", "2", "--warmup", "1"]
        return [
            (2, [*small, "--m", "2", "--layouts", "pp2,dp2,tp2"]),
            (4, [*small, "--m", "4", "--layouts", "pp2xdp2,dp4,tp2xdp2,pp4:1/1/1/1"]),
        ]
    steps = ["--steps", str(args.steps), "--warmup", "1"]
    gpt2 = ["--preset", "gpt2-small", "--batch", "2", "--m", "2", "--sequential"]
    return [
        (2, ["--preset", "6x384", "--m", "4", *steps, "--layouts", "pp2,dp2,tp2"]),
        (
            2,
            [
                *gpt2,
                "--steps",
                str(args.gpt2_steps),
                "--warmup",
                "1",
                "--layouts",
                "pp2,pp2:8/4,dp2,tp2",
            ],
        ),
        (
            4,
            [
                "--preset",
                "6x384",
                "--m",
                "4",
                *steps,
                "--layouts",
                "pp2xdp2,dp4,tp2xdp2,pp4:1/2/2/1",
            ],
        ),
    ]


def run_all(args) -> None:
    launch = Launcher(args)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    smoke = args.smoke
    tiny = ["--layers", "8", "--embd", "64", "--heads", "2", "--block", "32", "--batch", "2"]
    size = tiny if smoke else []
    steps = ["--steps", "2" if smoke else str(args.steps), "--warmup", "1"]
    ms = "2,4" if smoke else "4,8,16"
    bub = []
    for p in (2, 4):
        bub += launch(p, "bubble", "--ms", ms, *steps, *size)["rows"]
    mem = []
    for p in (2, 4):
        for sched in ("gpipe", "1f1b", "interleaved", "zb-h1"):
            m = "4" if smoke else str(args.memory_m)
            mem += launch(p, "memory", "--schedule", sched, "--m", m, *size)["rows"]
    thr = [
        row for n, extra in throughput_runs(args) for row in launch(n, "throughput", *extra)["rows"]
    ]
    total = time.perf_counter() - t_start
    print("\n## Bubble\n\n" + bubble_table(bub))
    print("\n## Memory\n\n" + memory_table(mem))
    print("\n## Throughput\n\n" + throughput_table(thr))
    print(f"\n{total:.0f} s in all, load average now {os.getloadavg()}")
    write_json(
        args.json,
        {
            "bubble": bub,
            "memory": mem,
            "throughput": thr,
            "runs": launch.log,
            "seconds": total,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
    )
    shutil.rmtree(launch.out, ignore_errors=True)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=BUBBLE_MODEL["n_layer"])
    p.add_argument("--embd", type=int, default=BUBBLE_MODEL["n_embd"])
    p.add_argument("--heads", type=int, default=BUBBLE_MODEL["n_head"])
    p.add_argument("--block", type=int, default=BUBBLE_MODEL["block_size"])
    p.add_argument(
        "--batch", type=int, default=4, help="sequences per micro-batch (train.batch_size)"
    )
    p.add_argument(
        "--virtual", type=int, default=2, help="virtual_stages of the interleaved schedule"
    )
    p.add_argument("--json")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def add_throughput_parser(sub) -> None:
    t = sub.add_parser(
        "throughput", help="tokens/s and bytes per step of several layouts of the same job"
    )
    t.add_argument("--preset", default="6x384")
    t.add_argument("--layouts", type=lambda s: s.split(","), default=["pp2", "dp2", "tp2"])
    t.add_argument("--batch", type=int, default=0, help="train.batch_size (default: the preset's)")
    t.add_argument("--m", type=int, default=4, help="train.grad_accum")
    t.add_argument("--schedule", default="1f1b")
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--warmup", type=int, default=1)
    t.add_argument(
        "--sequential", action="store_true", help="one layout after the other (less memory)"
    )
    t.add_argument("--json")


def add_all_parser(sub) -> None:
    a = sub.add_parser(
        "all", help="every part, each under its own mpiexec (run this without mpiexec)"
    )
    a.add_argument("--steps", type=int, default=4)
    a.add_argument("--gpt2-steps", type=int, default=3)
    a.add_argument("--memory-m", type=int, default=8)
    a.add_argument("--mpiexec")
    a.add_argument(
        "--smoke", action="store_true", help="tiny settings: checks that everything runs"
    )
    a.add_argument("--json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    b = sub.add_parser("bubble", help="idle fraction per stage; pp = the number of ranks")
    add_model_args(b)
    b.add_argument(
        "--schedules",
        type=lambda s: s.split(","),
        default=["gpipe", "1f1b", "interleaved", "zb-h1"],
    )
    b.add_argument("--ms", type=ints, default=[4, 8, 16], help="micro-batches (train.grad_accum)")
    b.add_argument("--steps", type=int, default=4)
    b.add_argument("--warmup", type=int, default=1)
    mm = sub.add_parser(
        "memory", help="one configuration per process: peak RSS, tracemalloc peak of a step"
    )
    add_model_args(mm)
    mm.add_argument("--schedule", default="1f1b")
    mm.add_argument("--m", type=int, default=8)
    mm.add_argument("--pp", type=int, default=0, help="default: the number of ranks")
    mm.add_argument("--warmup", type=int, default=1)
    add_throughput_parser(sub)
    add_all_parser(sub)
    args = ap.parse_args()
    {"bubble": bubble, "memory": memory, "throughput": throughput, "all": run_all}[args.part](args)


if __name__ == "__main__":
    main()
