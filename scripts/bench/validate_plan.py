"""Measured vs predicted step time and peak memory per rank for one run (docs/planning.md, validation).

    mpiexec --oversubscribe -n 2 python scripts/bench/validate_plan.py --data /tmp/sc --preset 6x384 --dp 2 \\
        --cluster inputs/clusters/this_machine.toml --out /tmp/validation.jsonl

The real Trainer (hpc_llm.train.Trainer on make_grid(MPI.COMM_WORLD, tp, pp)) runs `--warmup` steps, then `--steps`
timed train_step() calls (each the max over ranks, between barriers; the median is reported, and the median of the
slowest rank's CPU time, which a busy neighbour on a shared machine inflates less), then one more step
under tracemalloc: its peak (every NumPy array the step allocates, the caches included) plus the bytes of the
arrays the trainer held before it (flat buffers, Adam moments and temporaries) is the measured peak per rank, the
largest over ranks. RSS (VmHWM) is printed too; it includes the interpreter and libraries. Each rank's comm ledger
(parallel/comm.py: bytes, seconds and calls per collective) over the timed steps only is `comm_per_rank`, rank 0's
`comm`. The prediction uses the same layout on the cluster file, with ranks-per-device = ranks / cores when
oversubscribed. One JSON line is appended to --out (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import tracemalloc

from hpc_llm.backend import is_releasable
from hpc_llm.config import load_config
from hpc_llm.parallel.grid import make_grid
from hpc_llm.plan.cluster_file import load_cluster
from hpc_llm.plan.compare import run_layout
from hpc_llm.plan.memory import rank_memory
from hpc_llm.plan.predict import PRECISIONS, predict
from hpc_llm.train.trainer import Trainer

from common import PRESETS, model_sets, resident_bytes, vm_hwm


def table(path: str) -> str:
    """The docs' markdown table from the JSON lines of earlier runs."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    out = [
        "| # | shape | ranks | layout | measured ms (wall / CPU) | predicted ms | error vs wall / CPU | "
        "peak MiB measured / predicted | error | load |",
        "|" + " --- |" * 10,
    ]
    for i, r in enumerate(rows, 1):
        lay = r["layout"]
        desc = f"pp{lay['pp']} dp{lay['dp']} tp{lay['tp']}" + (
            f" zero{lay['zero']}" if lay["zero"] else ""
        )
        if lay["pp"] > 1:
            desc += f" {lay['schedule']}" + (f" v{lay['virtual']}" if lay["virtual"] > 1 else "")
        desc += f" m{lay['micro_batches']} b{lay['batch_size']}" + "".join(
            f" {s}" for s in r["sets"]
        )
        w, c, p = 1000 * r["measured_step_s"], 1000 * r["cpu_step_s"], 1000 * r["predicted_step_s"]
        out.append(
            f"| {i} | {r['preset']} | {r['ranks']} | {desc} | {w:.0f} / {c:.0f} | {p:.0f} | "
            f"{100 * (p / w - 1):+.0f}% / {100 * (p / c - 1):+.0f}% | {r['measured_peak_bytes'] / 2**20:.0f} / "
            f"{r['predicted_peak_bytes'] / 2**20:.0f} | {100 * r['memory_error']:+.1f}% | {r['load']:.1f} |"
        )
    return "\n".join(out)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="a prepared data directory (hpc-llm prepare)")
    ap.add_argument("--preset", choices=PRESETS, default="shakespeare-char")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--virtual", type=int, default=1)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        help="extra config overrides (e.g. train.recompute=block)",
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cluster", default="inputs/clusters/this_machine.toml")
    ap.add_argument(
        "--share",
        type=float,
        help="ranks per device for the prediction (default: ranks / the cluster's devices, at least 1; 1 for a "
        "cluster file calibrated with as many ranks busy as this run has)",
    )
    ap.add_argument("--out", default="/tmp/validation.jsonl")
    ap.add_argument(
        "--table", metavar="JSONL", help="print the markdown table of earlier runs and exit"
    )
    return ap.parse_args()


def make_trainer(args, world) -> Trainer:
    sets = model_sets(args.preset) + [
        f"data.path={args.data}",
        f"train.batch_size={args.batch}",
        f"train.grad_accum={args.accum}",
        f"parallel.tp={args.tp}",
        f"parallel.pp={args.pp}",
        f"parallel.zero={args.zero}",
        f"parallel.schedule={args.schedule}",
        f"parallel.virtual_stages={args.virtual}",
        f"parallel.bucket_mb={args.bucket_mb}",
        "train.peak_tflops=1",
        "train.eval_iters=0",
        f"train.out_dir=/tmp/validate_plan_run_{os.getpid()}",
        *args.set,
    ]
    return Trainer(load_config(None, sets), grid=make_grid(world, args.tp, args.pp))


def measure(args, world, trainer: Trainer) -> tuple[list, list, dict, int]:
    """(step wall times, step CPU times: each the max over ranks; this rank's collectives in the timed steps, the
    comm ledger's summary; this rank's peak bytes in one more step, what tracemalloc sees plus the buffers held
    across steps)."""
    from mpi4py import MPI  # here: `--table` runs without MPI

    for _ in range(args.warmup):
        trainer.train_step()
    ledger = trainer.grid.world.ledger
    # the timed steps' collectives only: the warmup's first calls open the connections, tracemalloc slows the last
    ledger.reset()
    times, cpu = [], []
    for _ in range(args.steps):
        world.Barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step()
        times.append(world.allreduce(time.perf_counter() - t0, op=MPI.MAX))
        cpu.append(world.allreduce(time.process_time() - c0, op=MPI.MAX))
    comm = ledger.summary()
    m, o = trainer.model, trainer.opt
    buffers = list({id(b): b for b in (m.flat, m.grad_flat, m.compute)}.values())
    # ZeRO-2/3's buffers hold only some pages at a time: their resident bytes, sampled around each part
    paged = [b for b in buffers if is_releasable(b)]
    held = (
        sum(b.nbytes for b in buffers if not is_releasable(b))
        + o.m.nbytes
        + o.v.nbytes
        + sum(a.nbytes + b.nbytes for a, b in o._temps)
    )
    peak = [0]

    def sample():
        """The step's arrays at their peak since the last sample, with the paged buffers as they are now."""
        now = tracemalloc.get_traced_memory()[1] + sum(resident_bytes(b) for b in paged)
        peak[0] = max(peak[0], now)
        tracemalloc.reset_peak()

    tracemalloc.start()
    if trainer.zero is not None:
        sampled(trainer.zero, sample)
    trainer.train_step()
    sample()
    tracemalloc.stop()
    return times, cpu, comm, peak[0] + held


def sampled(hooks, sample) -> None:
    """Sample memory after each gather (before_*) and before each release (after_*): a part's peak is its own
    arrays' peak with its units gathered and its gradients written."""
    for name in ("before_forward", "before_backward"):
        original = getattr(hooks, name)
        setattr(hooks, name, lambda *a, _f=original: (_f(*a), sample()))
    for name in ("after_forward", "after_backward"):
        original = getattr(hooks, name)
        setattr(hooks, name, lambda *a, _f=original: (sample(), _f(*a)))


def validation_row(args, world, trainer: Trainer, times, cpu, peaks, rss, comms) -> dict:
    """The measurements beside the planner's prediction for the same model, layout and cluster."""
    cfg = trainer.cfg
    cl = load_cluster(args.cluster)
    lay = run_layout(cfg, None, world.size)
    share = args.share or max(1.0, world.size / cl.devices)
    pred = predict(cfg.model, lay, cl, getattr(cfg.train, "precision", None), share)
    by = PRECISIONS[pred.precision][1]
    mems = [
        rank_memory(cfg.model, lay, s, by, dp_rank=r).step_peak
        for s in range(lay.pp)
        for r in range(lay.dp)
    ]
    measured = statistics.median(times)
    return {
        "preset": args.preset,
        "ranks": world.size,
        "layout": pred.as_dict()["layout"],
        "sets": args.set,
        "measured_step_s": measured,
        "step_times": times,
        "cpu_step_s": statistics.median(cpu),
        "predicted_step_s": pred.time["step"],
        "time_error": pred.time["step"] / measured - 1,
        "predicted_parts": pred.time,
        "measured_peak_bytes": max(peaks),
        "peaks_per_rank": peaks,
        "predicted_peak_bytes": max(mems),
        "memory_error": max(mems) / max(peaks) - 1,
        "vmhwm_bytes": max(rss),
        "load": os.getloadavg()[0],
        "comm": comms[0],
        "comm_per_rank": comms,
    }


def main() -> None:
    args = parse_args()
    if args.table:
        print(table(args.table))
        return
    from mpi4py import MPI  # here: `--table` runs without MPI

    world = MPI.COMM_WORLD
    trainer = make_trainer(args, world)
    times, cpu, comm, peak = measure(args, world, trainer)
    peaks = world.gather(peak, root=0)
    rss = world.gather(vm_hwm(), root=0)
    comms = world.gather(comm, root=0)
    if world.rank != 0:
        return
    row = validation_row(args, world, trainer, times, cpu, peaks, rss, comms)
    print(
        json.dumps(
            {
                k: v
                for k, v in row.items()
                if k not in ("predicted_parts", "comm", "comm_per_rank", "step_times")
            }
        )
    )
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
