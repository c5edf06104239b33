#!/usr/bin/env python
"""Parallel training-step benchmark: tokens/s, communication share, overlap of the bucketed allreduce, memory per rank.

    export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
    mpiexec -n 1 python scripts/bench/bench_parallel.py --preset shakespeare-char       # DP1, one BLAS thread
    mpiexec -n 2 python scripts/bench/bench_parallel.py --preset shakespeare-char       # DP2
    mpiexec -n 2 python scripts/bench/bench_parallel.py --preset gpt2-small --tp 2 --steps 3

The real Trainer (same code path as `hpc-llm train`) on random tokens. Per step: wall time (the max over ranks),
exposed communication (time inside collectives and waits, from the comm ledger). After the timed steps, the same
gradient buckets are allreduced again, blocking, to measure what the communication costs when nothing hides it:
hidden = 1 - exposed data-parallel wait / blocking bucket time. Medians over --steps. Rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpc_llm.train.trainer import Trainer

from common import PRESETS, preset_config, vm_hwm


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="shakespeare-char")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    return ap.parse_args()


def make_trainer(args, world, tmp: Path) -> Trainer:
    cfg = preset_config(world, args.preset, tmp, 2_000_000)
    cfg.parallel.tp, cfg.parallel.zero, cfg.parallel.bucket_mb = args.tp, args.zero, args.bucket_mb
    return Trainer(cfg)


def measure(args, world, tr: Trainer) -> tuple[float, float, float, float]:
    """Medians of (step, communication exposed, data-parallel wait, the buckets' allreduce blocking and alone), in
    seconds, each the max over ranks."""
    ledger = tr.grid.world.ledger
    for _ in range(args.warmup):
        tr.train_step()
    steps, exposed, dp_wait = [], [], []
    for _ in range(args.steps):
        ledger.reset()
        world.Barrier()
        t0 = time.perf_counter()
        tr.train_step()
        dt = world.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        s = ledger.summary()
        steps.append(dt)
        exposed.append(world.allreduce(sum(v["seconds"] for v in s.values()), op=MPI.MAX))
        dp_wait.append(
            world.allreduce(
                sum(v["seconds"] for k, v in s.items() if k.startswith("dp.")), op=MPI.MAX
            )
        )
    # the same buckets, blocking and alone: what data-parallel communication costs when nothing hides it
    blocking = []
    dp = tr.grid.dp_comm
    for _ in range(max(3, args.steps // 4)):
        world.Barrier()
        t0 = time.perf_counter()
        for a, b in tr.sync.buckets:
            dp.allreduce_(tr.model.grad_flat[a:b].copy())
        blocking.append(world.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    step, comm, wait, block = (float(np.median(x)) for x in (steps, exposed, dp_wait, blocking))
    return step, comm, wait, block


def report(args, world, tr: Trainer, times, rss: list, opt: list) -> None:
    step, comm, wait, block = times
    out = {
        "preset": args.preset,
        "ranks": world.size,
        "dp": tr.grid.dp,
        "tp": tr.grid.tp,
        "zero": args.zero,
        "tokens_per_s": tr.tokens_per_step / step,
        "step_ms": 1e3 * step,
        "comm_exposed_ms": 1e3 * comm,
        "comm_share": comm / step,
        "dp_wait_ms": 1e3 * wait,
        "dp_blocking_ms": 1e3 * block,
        "dp_hidden": (1 - wait / block) if tr.grid.dp > 1 and block > 0 else None,
        "peak_rss_mib_per_rank": [r / 2**20 for r in rss],
        "optimizer_mib_per_rank": [o / 2**20 for o in opt],
        "buckets": len(tr.sync.buckets),
    }
    print(
        f"{args.preset} on {world.size} ranks (dp {tr.grid.dp} x tp {tr.grid.tp}, zero {args.zero}): "
        f"{out['tokens_per_s']:.0f} tokens/s, step {out['step_ms']:.1f} ms, communication exposed "
        f"{out['comm_exposed_ms']:.1f} ms ({100 * out['comm_share']:.1f}% of the step)"
    )
    if out["dp_hidden"] is not None:
        print(
            f"  data-parallel: wait {out['dp_wait_ms']:.1f} ms in the step vs {out['dp_blocking_ms']:.1f} ms "
            f"blocking -> {100 * out['dp_hidden']:.0f}% hidden behind backward ({out['buckets']} buckets)"
        )
    print(
        f"  per rank: peak RSS {max(out['peak_rss_mib_per_rank']):.0f} MiB, Adam moments "
        f"{max(out['optimizer_mib_per_rank']):.1f} MiB"
    )
    print("JSON " + json.dumps(out))


def main() -> None:
    args = parse_args()
    world = MPI.COMM_WORLD
    tmp = tempfile.mkdtemp(prefix="hpc_llm_bench_") if world.rank == 0 else None
    tr = make_trainer(args, world, Path(world.bcast(tmp)))
    times = measure(args, world, tr)
    rss = world.gather(vm_hwm())
    opt = world.gather(tr.opt.m.nbytes + tr.opt.v.nbytes)
    if world.rank == 0:
        report(args, world, tr, times, rss, opt)


if __name__ == "__main__":
    main()
