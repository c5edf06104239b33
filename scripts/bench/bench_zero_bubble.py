#!/usr/bin/env python
"""ZB-H1 and ZBV beside 1F1B: the bubble per stage in milliseconds, the measured T_F, T_B, T_W and Qi et al.'s
bubbles (p-1)(T_F + T_B + T_W), (p-1)(T_F + T_B - T_W) and (p-1)(T_F + T_B - 2 T_W) from them, the step time beside
the planner's schedule model (schedule_timing.simulate with those T's), and each stage's activation memory.

    export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
    mpiexec -n 2 python scripts/bench/bench_zero_bubble.py --ms 4,8,16 --json zb_pp2.json
    mpiexec -n 4 --oversubscribe python scripts/bench/bench_zero_bubble.py --ms 4,8,16 --json zb_pp4.json
    python scripts/bench/bench_zero_bubble.py --split-cost 12 --layers 4   # one process: B + W against the backward

bench_pipeline.py's machinery (its model, the real Trainer.train_step on random tokens, its Probe timing every chunk
forward, backward, B and W op, its run_schedule timer): for each m, a 1F1B, a ZB-H1 and a ZBV trainer on pp = the
ranks, their steps in turns (so a slow spell of the shared machine hits all), medians over --steps after --warmup.
Per stage: idle = the pipeline phase's makespan (barrier to the last rank's end of run_schedule) - the stage's op
compute; T_F, T_B, T_W = the stage's median forward, B (Chunk.backward_input) and W (Chunk.backward_weight) of the
ZB-H1 run, and 1F1B's whole backward; the formulas use the mean over stages, and so does the prediction:
schedule_timing.simulate of each schedule with those T's (ZBV's chunks at half of them), the planner's model of the
pipeline phase. Memory, after the timed steps: one more
step of each under tracemalloc, its peak above what existed before it (activations, temporaries, messages), with
schedule.in_flight's micro-batches. Rank 0 prints Markdown tables; nothing is asserted.

--split-cost N (one process, no mpiexec): the whole model of --layers on one chunk, N iterations each of a forward
then Chunk.backward, and of a forward then backward_input + backward_weight, alternating: the medians of the forward,
the unsplit backward, B and W (the first two iterations left out).
"""

from __future__ import annotations

import argparse
import gc
import json
import tracemalloc
from collections import defaultdict

import bench_pipeline as bp

SCHEDULES = ("1f1b", "zb-h1", "zbv")
VIRTUAL = {"zbv": 2}  # model chunks per rank


def stage_times(steps: list[dict]) -> dict:
    """This rank's medians: idle (makespan - compute), compute, step, and each op kind's time (chunk 0)."""
    ops = defaultdict(list)
    idle, compute = [], []
    for s in steps:
        comp = sum(t for _, _, t in s["ops"])
        compute.append(comp)
        idle.append(s["pipe_max"] - comp)
        for kind, _, t in s["ops"]:
            ops[kind].append(t)
    return {
        "idle": bp.median(idle),
        "compute": bp.median(compute),
        "makespan": bp.median([s["pipe_max"] for s in steps]),
        "step": bp.median([s["step"] for s in steps]),
        **{f"t_{k.lower()}": bp.median(ops[k]) for k in "FBW"},
    }


def step_peak(tr) -> int:
    """The tracemalloc peak of one step above what was allocated before it."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    tr.train_step()
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    return peak


def run_m(args, world, tmp, model, m: int) -> dict:
    """Every schedule at m micro-batches: {schedule: this rank's times and memory}."""
    from hpc_llm.parallel.grid import make_grid
    from hpc_llm.parallel.schedule import V_SHAPED, in_flight
    from hpc_llm.train.trainer import Trainer

    p = world.size
    trainers, probes, steps = {}, {}, {s: [] for s in SCHEDULES}
    for sched in SCHEDULES:
        v = VIRTUAL.get(sched, 1)
        cfg = bp.make_config(tmp, tmp / sched, model, args.batch, m, pp=p, schedule=sched, v=v)
        trainers[sched] = Trainer(cfg, grid=make_grid(world, 1, p, sched in V_SHAPED))
        probes[sched] = bp.Probe(trainers[sched])
    for k in range(args.warmup + args.steps):
        for sched in SCHEDULES:
            bp._PIPE_PROBE[0] = probes[sched]
            step = bp.timed_step(trainers[sched], world, probes[sched])
            if k >= args.warmup:
                steps[sched].append(step)
    out = {}
    for sched in SCHEDULES:
        tr = trainers[sched]
        out[sched] = {
            **stage_times(steps[sched]),
            "peak": step_peak(tr),
            "in_flight": in_flight(tr.ops),
            "loss": steps[sched][-1]["loss"],
        }
    del trainers, probes
    gc.collect()
    return out


def row_of(p: int, m: int, stages: list[dict]) -> dict:
    """One (p, m): per stage every schedule's figures, the formulas and the simulated steps from the mean measured op
    times."""
    from hpc_llm.parallel.schedule_timing import simulate

    zb = [s["zb-h1"] for s in stages]
    t_f, t_b, t_w = (sum(s[k] for s in zb) / p for k in ("t_f", "t_b", "t_w"))
    predicted = {
        n: simulate(n, p, m, VIRTUAL.get(n, 1), t_f=t_f, t_b=t_b, t_w=t_w) for n in SCHEDULES
    }
    return {
        "pp": p,
        "m": m,
        "t_f": t_f,
        "t_b": t_b,
        "t_w": t_w,
        "t_backward_1f1b": sum(s["1f1b"]["t_b"] for s in stages) / p,
        "bubble_1f1b_formula": (p - 1) * (t_f + t_b + t_w),
        "bubble_zb_h1_formula": (p - 1) * (t_f + t_b - t_w),
        "bubble_zb_h2_formula": (p - 1) * (t_f + t_b - 2 * t_w),
        "predicted_makespan": {n: t.makespan for n, t in predicted.items()},
        "predicted_idle": {n: t.idle for n, t in predicted.items()},
        "stages": stages,
    }


def ms(x: float) -> str:
    return f"{1e3 * x:.0f}"


def tables(rows) -> str:
    mib = 2**20
    lines = [
        "| pp | m | T_F / T_B / T_W (ms) | (p-1)(T_F+T_B+T_W) | 1F1B idle per stage | (p-1)(T_F+T_B-T_W) | "
        "ZB-H1 idle per stage | (p-1)(T_F+T_B-2T_W) | ZBV idle per stage | step 1F1B / ZB-H1 / ZBV (ms) | "
        "speed-up ZB-H1, ZBV (predicted) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        st, pm = r["stages"], r["predicted_makespan"]
        a, z, v = (st[0][n]["step"] for n in SCHEDULES)

        def idle(name):
            return " / ".join(ms(s[name]["idle"]) for s in st)

        lines.append(
            f"| {r['pp']} | {r['m']} | {ms(r['t_f'])} / {ms(r['t_b'])} / {ms(r['t_w'])} | "
            f"{ms(r['bubble_1f1b_formula'])} | {idle('1f1b')} | {ms(r['bubble_zb_h1_formula'])} | "
            f"{idle('zb-h1')} | {ms(r['bubble_zb_h2_formula'])} | {idle('zbv')} | "
            f"{ms(a)} / {ms(z)} / {ms(v)} | {a / z:.3f} ({pm['1f1b'] / pm['zb-h1']:.3f}), "
            f"{a / v:.3f} ({pm['1f1b'] / pm['zbv']:.3f}) |"
        )
    lines += [
        "",
        "| pp | m | stage | chunks in flight 1F1B / ZB-H1 / ZBV (ZBV's are half a stage) | step peak 1F1B / "
        "ZB-H1 / ZBV |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        for k, s in enumerate(r["stages"]):
            flights = " / ".join(str(s[n]["in_flight"]) for n in SCHEDULES)
            peaks = " / ".join(f"{s[n]['peak'] / mib:.0f}" for n in SCHEDULES)
            lines.append(f"| {r['pp']} | {r['m']} | {k} | {flights} | {peaks} MiB |")
    return "\n".join(lines)


def split_cost(args, model: dict) -> None:
    import time

    import numpy as np

    from hpc_llm.config import ModelConfig
    from hpc_llm.model.gpt import GPT

    chunk = GPT(ModelConfig(**model, dtype="float32"), seed=0).chunks[0]
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, model["vocab_size"], (args.batch, model["block_size"])) for _ in "xy")
    times = defaultdict(list)
    for it in range(args.split_cost):
        for split in (False, True):
            t0 = time.perf_counter()
            _, cache = chunk.forward(x, y)
            t1 = time.perf_counter()
            times["F"].append(t1 - t0)
            if not split:
                chunk.backward(None, cache, 1.0, accumulate=it > 0)
                times["backward"].append(time.perf_counter() - t1)
                continue
            _, weights = chunk.backward_input(None, cache, 1.0, head_accumulate=it > 0)
            t2 = time.perf_counter()
            chunk.backward_weight(weights, it > 0)
            times["B"].append(t2 - t1)
            times["W"].append(time.perf_counter() - t2)
    med = {k: 1e3 * bp.median(v[2:]) for k, v in times.items()}
    print(
        f"forward {med['F']:.1f} ms, backward {med['backward']:.1f} ms, B {med['B']:.1f} + W {med['W']:.1f} "
        f"= {med['B'] + med['W']:.1f} ms: {(med['B'] + med['W']) / med['backward']:.3f} x the backward"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bp.add_model_args(ap)
    ap.add_argument(
        "--ms", type=bp.ints, default=[4, 8, 16], help="micro-batches (train.grad_accum)"
    )
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--split-cost", type=int, default=0, metavar="N", help="one process: B + W's cost"
    )
    args = ap.parse_args()
    model = dict(
        bp.BUBBLE_MODEL,
        n_layer=args.layers,
        n_embd=args.embd,
        n_head=args.heads,
        block_size=args.block,
    )
    if args.split_cost:
        return split_cost(args, model)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    tmp = bp.shared_dir(world, model["vocab_size"])
    bp._install_schedule_timer()
    rows = []
    for m in args.ms:
        stages = world.gather(run_m(args, world, tmp, model, m))
        if world.rank == 0:
            rows.append(row_of(world.size, m, stages))
            print(tables(rows[-1:]).splitlines()[2], flush=True)
    if world.rank == 0:
        print()
        print(tables(rows))
        print("JSON " + json.dumps({"model": model, "rows": rows}))
        bp.write_json(args.json, {"model": model, "args": vars(args), "rows": rows})
    bp.cleanup(world, tmp)


if __name__ == "__main__":
    main()
