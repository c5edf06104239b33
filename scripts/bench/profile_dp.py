#!/usr/bin/env python
"""Where a data-parallel rank's step goes: the Trainer's step (bench_torch.py's `ours-dp2`) timed, then profiled on
rank 0 with cProfile.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 mpiexec -n 2 python scripts/bench/profile_dp.py \
        [--preset 6x384] [--precision bf16] [--steps 5] [--top 30]

Each rank holds the preset's batch on random tokens (preset_config), as bench_torch.py's ranks do; a step ends with
a barrier, so its time is the slower rank's. Printed by rank 0: the step's median, then under cProfile (over 3
steps, its own cost included; ms per step) the `--top` functions by own time and the data-parallel parts by
cumulative time (the reduction's start and progress, its finish, the norm, AdamW, the compute copy's refresh).
Never a test: record the figures in docs/performance.md.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

from mpi4py import MPI

from hpc_llm.train.trainer import Trainer

from common import PRESETS, preset_config

# the data-parallel step's parts outside forward and backward (cumulative times)
PARTS = ("grad_ready", "finish", "global_grad_norm", "step", "refresh_compute", "run_schedule")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="6x384", choices=sorted(PRESETS))
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    world = MPI.COMM_WORLD
    tmp = world.bcast(tempfile.mkdtemp(prefix="hpc_llm_prof_") if world.rank == 0 else None)
    cfg = preset_config(world, args.preset, Path(tmp), 2_000_000)
    cfg.train.batch_size = PRESETS[args.preset]["batch"] * world.size
    cfg.train.precision = args.precision
    trainer = Trainer(cfg)

    def step():
        trainer.train_step()
        world.Barrier()

    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    prof, n = cProfile.Profile(), 3
    prof.runcall(lambda: [step() for _ in range(n)])
    if world.rank != 0:
        return
    print(
        f"{args.preset} {args.precision}, {world.size} ranks: step median "
        f"{1e3 * statistics.median(times):.1f} ms ({', '.join(f'{1e3 * t:.0f}' for t in times)})"
    )
    rows = [
        (fn, path.rsplit("/", 1)[-1], line, nc / n, 1e3 * tt / n, 1e3 * ct / n)
        for (path, line, fn), (_, nc, tt, ct, _) in pstats.Stats(prof).stats.items()
    ]
    for fn, file, line, calls, own, _ in sorted(rows, key=lambda r: -r[4])[: args.top]:
        print(f"  {own:7.1f} ms/step  {calls:6.0f} calls  {file}:{line}({fn})")
    print("  the data-parallel step's parts (cumulative):")
    for fn, file, line, calls, _, cum in sorted(rows, key=lambda r: -r[5]):
        if fn in PARTS and file in ("data_parallel.py", "optim.py", "gpt.py", "pipeline.py"):
            print(f"  {cum:7.1f} ms/step  {calls:6.0f} calls  {file}:{line}({fn})")


if __name__ == "__main__":
    main()
