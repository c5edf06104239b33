"""Measured vs predicted step time and peak memory per rank for one run (docs/planning.md, validation).

    mpiexec --oversubscribe -n 2 python scripts/validate_plan.py --data /tmp/sc --preset 6x384 --dp 2 \\
        --cluster inputs/clusters/this_machine.toml --out /tmp/validation.jsonl

The real Trainer (hpc_llm.train.Trainer on make_grid(MPI.COMM_WORLD, tp, pp)) runs `--warmup` steps, then `--steps`
timed train_step() calls (each the max over ranks, between barriers; the median is reported, and the median of the
slowest rank's CPU time, which a busy neighbour on a shared machine inflates less), then one more step
under tracemalloc: its peak (every NumPy array the step allocates, the caches included) plus the bytes of the
arrays the trainer held before it (flat buffers, Adam moments and temporaries) is the measured peak per rank, the
largest over ranks. RSS (VmHWM) is printed too; it includes the interpreter and libraries. The prediction uses the
same layout on the cluster file, with ranks-per-device = ranks / cores when oversubscribed. One JSON line is
appended to --out (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import tracemalloc

PRESETS = {
    "shakespeare-char": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65),
    "6x384": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65),
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
}


def vmhwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


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
        desc = f"pp{lay['pp']} dp{lay['dp']} tp{lay['tp']}" + (" zero1" if lay["zero"] else "")
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


def main() -> None:
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
    ap.add_argument("--out", default="/tmp/validation.jsonl")
    ap.add_argument(
        "--table", metavar="JSONL", help="print the markdown table of earlier runs and exit"
    )
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return

    from mpi4py import MPI

    from hpc_llm.config import load_config
    from hpc_llm.parallel.grid import make_grid
    from hpc_llm.train.trainer import Trainer

    world = MPI.COMM_WORLD
    p = PRESETS[args.preset]
    sets = [f"model.{k}={v}" for k, v in p.items()] + [
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
    cfg = load_config(None, sets)
    trainer = Trainer(cfg, grid=make_grid(world, args.tp, args.pp))
    cfg = trainer.cfg  # the resolved config: model.vocab_size from the data if it was 0
    for _ in range(args.warmup):
        trainer.train_step()
    times, cpu = [], []
    for _ in range(args.steps):
        world.Barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step()
        times.append(world.allreduce(time.perf_counter() - t0, op=MPI.MAX))
        cpu.append(world.allreduce(time.process_time() - c0, op=MPI.MAX))
    m, o = trainer.model, trainer.opt
    held = (
        m.flat.nbytes
        + m.grad_flat.nbytes
        + o.m.nbytes
        + o.v.nbytes
        + sum(a.nbytes + b.nbytes for a, b in o._temps)
    )
    tracemalloc.start()
    trainer.train_step()
    peak = tracemalloc.get_traced_memory()[1] + held
    tracemalloc.stop()
    peaks = world.gather(peak, root=0)
    rss = world.gather(vmhwm(), root=0)
    if world.rank != 0:
        return
    from hpc_llm.plan.cluster import load_cluster
    from hpc_llm.plan.compare import run_layout
    from hpc_llm.plan.memory import rank_memory
    from hpc_llm.plan.search import PRECISIONS, predict

    cl = load_cluster(args.cluster)
    lay = run_layout(cfg, None, world.size)
    share = max(1.0, world.size / cl.devices)
    pred = predict(cfg.model, lay, cl, getattr(cfg.train, "precision", None), share)
    by = PRECISIONS[pred.precision][1]
    mems = [
        rank_memory(cfg.model, lay, s, by, dp_rank=r).step_peak
        for s in range(lay.pp)
        for r in range(lay.dp)
    ]
    measured = statistics.median(times)
    row = {
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
        "comm": trainer.grid.world.ledger.summary(),
    }
    print(
        json.dumps(
            {k: v for k, v in row.items() if k not in ("predicted_parts", "comm", "step_times")}
        )
    )
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
