"""Step time with each data-parallel gradient reduction (`parallel.grad_comm`), and the reduction's share of it.

    mpiexec -n 2 python scripts/bench/bench_grad_comm.py --preset 6x384 --steps 5
    mpiexec -n 2 python scripts/bench/bench_grad_comm.py --preset gpt2-small --steps 2 --warmup 1 --batch 2 --block 256

The real Trainer on random tokens (scripts/bench/common.py's), with one GradientSync per scheme (fp32, bf16, fp16,
PowerSGD ranks 1, 4, 16, compressed from the first step) on the same model, the schemes alternating step by step (the
machine's drift then hits all of them alike; the trajectory mixes them, which does not matter for speed). Step time:
the median over --steps rounds of the max over ranks. The
reduction's time: what the trainer spends inside GradientSync.grad_ready and GradientSync.finish (starting and
progressing buckets during backward, waiting for them, the 16-bit rounding and sums, PowerSGD's matmuls and QR and its
allreduces), max over ranks; bytes: GradientSync.bytes_per_step (the ledger's count) per step on one rank.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpc_llm.config.checks import validated
from hpc_llm.parallel.data_parallel import GradientSync
from hpc_llm.train.trainer import Trainer

from common import PRESETS, preset_config

SCHEMES = [
    ("fp32", 0),
    ("bf16", 0),
    ("fp16", 0),
    ("powersgd", 1),
    ("powersgd", 4),
    ("powersgd", 16),
]


def timed(fn, acc: list):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[0] += time.perf_counter() - t0

    return wrapper


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="6x384")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--batch", type=int, default=0, help="global batch (default: the preset's, at least dp)"
    )
    ap.add_argument("--block", type=int, default=0, help="block size (default: the preset's)")
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument(
        "--schemes", default="", help="comma list, e.g. fp32,bf16,powersgd4 (default all)"
    )
    return ap.parse_args()


def make_trainer(args, world, tmp: Path) -> Trainer:
    cfg = preset_config(world, args.preset, tmp, 2_000_000)
    if args.block:
        cfg.model.block_size = args.block
    cfg.train.batch_size = args.batch or max(cfg.train.batch_size, world.size)
    cfg.parallel.bucket_mb = args.bucket_mb
    return Trainer(validated(cfg))


def make_syncs(args, tr: Trainer) -> tuple[dict, dict]:
    """({name: GradientSync}, {name: [seconds]}): one sync per chosen scheme on the same model, as Trainer builds
    its own, with its grad_ready and finish timed into the second."""
    chosen = [
        s
        for s in SCHEMES
        if not args.schemes
        or f"{s[0]}{s[1] if s[0] == 'powersgd' else ''}" in args.schemes.split(",")
    ]
    m = tr.model
    bucket_elems = int(args.bucket_mb * 2**20) // m.dtype.itemsize
    syncs, acc = {}, {}
    for scheme, rank in chosen:
        name = scheme + (f" r={rank}" if scheme == "powersgd" else "")
        sync = GradientSync(
            m.grad_flat,
            tr.grid.dp_comm,
            bucket_elems,
            zero=False,
            scheme=scheme,
            specs=m.specs,
            powersgd_rank=max(rank, 1),
            seed=tr.cfg.train.seed,
        )
        acc[name] = [0.0]
        sync.grad_ready = timed(sync.grad_ready, acc[name])
        sync.finish = timed(sync.finish, acc[name])
        syncs[name] = sync
    return syncs, acc


def run_steps(args, world, tr: Trainer, syncs: dict, acc: dict) -> tuple[dict, dict]:
    """({name: step seconds}, {name: reduction seconds}), each the max over ranks; the schemes alternate step by
    step, so the machine's drift hits all alike."""
    steps = {name: [] for name in syncs}
    red = {name: [] for name in syncs}
    for i in range(args.warmup + args.steps):
        for name, sync in syncs.items():
            tr.sync = sync
            acc[name][0] = 0.0
            world.Barrier()
            t0 = time.perf_counter()
            tr.train_step()
            dt = world.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            r = world.allreduce(acc[name][0], op=MPI.MAX)
            if i >= args.warmup:
                steps[name].append(dt)
                red[name].append(r)
    return steps, red


def report(args, world, tr: Trainer, syncs: dict, steps: dict, red: dict) -> list[dict]:
    rows = []
    for name, sync in syncs.items():
        before, after = sync.bytes_per_step()
        step, r = float(np.median(steps[name])), float(np.median(red[name]))
        row = {
            "preset": args.preset,
            "scheme": name,
            "dp": tr.grid.dp,
            "step_ms": 1e3 * step,
            "reduction_ms": 1e3 * r,
            "share": r / step,
            "bytes": after,
            "fp32_bytes": before,
            "ratio": before / after if after else None,
            "steps_ms": [1e3 * x for x in steps[name]],
            "reduction_ms_all": [1e3 * x for x in red[name]],
            "block_size": tr.cfg.model.block_size,
            "batch": tr.cfg.train.batch_size,
        }
        rows.append(row)
        if world.rank == 0:
            print(
                f"{args.preset} dp{tr.grid.dp} {name:>13}: step {row['step_ms']:8.1f} ms, reduction "
                f"{row['reduction_ms']:7.1f} ms ({100 * row['share']:4.1f}%), {after / 1e6:8.2f} MB/step "
                f"(fp32 {before / 1e6:.2f} MB, {row['ratio']:.2f}x); steps "
                f"{', '.join(f'{1e3 * x:.0f}' for x in steps[name])} ms",
                flush=True,
            )
    return rows


def main() -> None:
    args = parse_args()
    world = MPI.COMM_WORLD
    tmp = Path(world.bcast(tempfile.mkdtemp(prefix="hpc_llm_gc_") if world.rank == 0 else None))
    tr = make_trainer(args, world, tmp)
    syncs, acc = make_syncs(args, tr)
    steps, red = run_steps(args, world, tr, syncs, acc)
    rows = report(args, world, tr, syncs, steps, red)
    tr.close()
    if world.rank == 0:
        print("JSON " + json.dumps(rows))


if __name__ == "__main__":
    main()
