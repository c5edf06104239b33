#!/usr/bin/env python
"""Checkpoint write and read throughput beside the disk's raw speed, measured in the same run.

    export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
    mpiexec -n 1 python scripts/bench/bench_checkpoint.py --preset gpt2-small
    mpiexec -n 2 python scripts/bench/bench_checkpoint.py --preset gpt2-small            # DP2, ZeRO-1
    mpiexec -n 4 --oversubscribe python scripts/bench/bench_checkpoint.py --preset gpt2-small --tp 2
    mpiexec -n 2 python scripts/bench/bench_checkpoint.py --preset gpt2-small --writer gather,parts   # in turns

The real Trainer (same code path as `hpc-llm train`), parameters and Adam moments of the preset's shape. Each repeat,
in this order: `Trainer.save()` (--writer's: checksums, write, fsync, verify, rename: what a run pays), `dd
if=/dev/zero bs=16M conv=fsync` of the checkpoint's size into the same directory (raw write), the page cache
dropped if this process may (root: /proc/sys/vm/drop_caches; else reads are from memory and the output says so),
`dd of=/dev/null` of the checkpoint's files (raw read; the parts writer's: the master and every part, one after the
other), the cache dropped again, and `Trainer.restore()` (checksums shared by the ranks, then each rank reads its
hyperslabs). Throughput = checkpoint bytes / wall time (the slowest rank). Medians of --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpc_llm.checkpoint import rundir
from hpc_llm.train.startup import choose_writer
from hpc_llm.train.trainer import Trainer

from common import PRESETS, preset_config

BLOCK = 16 << 20


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def dd(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", *args, f"bs={BLOCK}", "status=none"], check=True)
    return time.perf_counter() - t0


def files_of(path: Path) -> list[Path]:
    """The checkpoint's files: its file, and with the parts writer its parts."""
    parts = rundir.parts_of(path)
    return [path] + (sorted(parts.iterdir()) if parts else [])


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in files_of(path))


def timed(world, fn) -> float:
    """Wall time of fn() on every rank, from a common start to the slowest rank's end."""
    world.Barrier()
    t0 = time.perf_counter()
    fn()
    return world.allreduce(time.perf_counter() - t0, op=MPI.MAX)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpt2-small")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--zero", type=int, default=1)
    ap.add_argument(
        "--writer",
        default="auto",
        help="auto, gather, mpio or parts, or several separated by commas: they take turns in each repeat",
    )
    ap.add_argument(
        "--dir", default=None, help="where to write (default: a temporary directory under /tmp)"
    )
    return ap.parse_args()


def make_trainer(args, world, tmp: Path) -> Trainer:
    cfg = preset_config(world, args.preset, tmp, 200_000)
    cfg.train.batch_size = world.size // args.tp
    cfg.parallel.tp, cfg.parallel.zero = args.tp, args.zero
    cfg.checkpoint.keep_last = 1
    cfg.checkpoint.writer = args.writer.split(",")[0]
    tr = Trainer(cfg)
    tr.opt.m[...] = 0.5  # moments as a run has them (nonzero); values do not matter for speed
    tr.opt.v[...] = 0.25
    return tr


def measure(world, tr: Trainer, tmp: Path, repeats: int, writers) -> tuple[dict, dict, bool]:
    """For each writer: seconds of save, dd write, dd read, restore per repeat, and the checkpoint's bytes; whether
    reads were cold. The writers take turns within each repeat, each save beside its own dd (side by side)."""
    rows = {w: {k: [] for k in ("save", "dd_write", "dd_read", "restore")} for w in writers}
    sizes, cold = {}, True
    for rep in range(repeats):
        for j, writer in enumerate(writers):
            tr.step, tr.writer, path, r = rep * len(writers) + j + 1, writer, None, rows[writer]

            def save():
                nonlocal path
                path = tr.save()

            r["save"].append(timed(world, save))
            size = sizes[writer] = world.bcast(checkpoint_bytes(path) if world.rank == 0 else None)
            if world.rank == 0:
                raw = tmp / "dd.bin"
                r["dd_write"].append(
                    dd("if=/dev/zero", f"of={raw}", f"count={-(-size // BLOCK)}", "conv=fsync")
                )
                raw.unlink()
                cold &= drop_caches()
                r["dd_read"].append(sum(dd(f"if={p}", "of=/dev/null") for p in files_of(path)))
                cold &= drop_caches()
            world.Barrier()
            r["restore"].append(timed(world, lambda: tr.restore(path)))
    return rows, sizes, cold


def report(args, world, tr: Trainer, writer: str, rows: dict, size: int, cold: bool) -> None:
    med = {k: float(np.median(v)) for k, v in rows.items()}
    mbs = {k: size / v / 1e6 for k, v in med.items()}
    out = {
        "preset": args.preset,
        "ranks": world.size,
        "dp": tr.grid.dp,
        "tp": tr.grid.tp,
        "zero": args.zero,
        "writer": writer,
        "bytes": size,
        "cold_reads": cold,
        "seconds": rows,
        "median_mb_per_s": mbs,
        "write_vs_dd": mbs["save"] / mbs["dd_write"],
        "read_vs_dd": mbs["restore"] / mbs["dd_read"],
        # the same, repeat by repeat (side by side in time): the machine's drift cancels
        "write_vs_dd_pairwise": float(np.median(np.divide(rows["dd_write"], rows["save"]))),
        "read_vs_dd_pairwise": float(np.median(np.divide(rows["dd_read"], rows["restore"]))),
    }
    print(
        f"{args.preset} checkpoint {size / 1e6:.0f} MB on {world.size} ranks (dp {tr.grid.dp} x tp "
        f"{tr.grid.tp}, zero {args.zero}, {writer} writer), {'cold' if cold else 'WARM (page cache)'} reads:"
    )
    print(
        f"  write: save {mbs['save']:.0f} MB/s vs dd+fsync {mbs['dd_write']:.0f} MB/s = "
        f"{100 * out['write_vs_dd']:.0f}% (median of per-repeat ratios {100 * out['write_vs_dd_pairwise']:.0f}%)"
    )
    print(
        f"  read:  restore {mbs['restore']:.0f} MB/s vs dd {mbs['dd_read']:.0f} MB/s = "
        f"{100 * out['read_vs_dd']:.0f}% (median of per-repeat ratios {100 * out['read_vs_dd_pairwise']:.0f}%)"
    )
    print("JSON " + json.dumps(out))


def main() -> None:
    args = parse_args()
    world = MPI.COMM_WORLD
    tmp = tempfile.mkdtemp(prefix="hpc_llm_bench_ckpt_", dir=args.dir) if world.rank == 0 else None
    tmp = Path(world.bcast(tmp))
    tr = make_trainer(args, world, tmp)
    writers = [choose_writer(tr.cfg, tr.grid) if w == "auto" else w for w in args.writer.split(",")]
    rows, sizes, cold = measure(world, tr, tmp, args.repeats, writers)
    if world.rank == 0:
        for w in writers:
            report(args, world, tr, w, rows[w], sizes[w], cold)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    main()
