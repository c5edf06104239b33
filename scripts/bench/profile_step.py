#!/usr/bin/env python
"""Where a training step's time goes: each matmul shape's GFLOP/s at 1 and 2 BLAS threads, the matmuls against
the whole step, AdamW, and the Python overhead per layer.

    python scripts/bench/profile_step.py [--preset NAME] [--steps 5] [--precision bf16] [--cprofile 15]

Per thread count a child process (OpenBLAS reads OPENBLAS_NUM_THREADS at load) times, for each preset: every
distinct matmul of the step (bench_train.matmul_plan: shapes and transposed layouts as the model has them; attention
matmuls are batched over batch x heads), the whole step, its matmuls replayed alone, AdamW alone, and the step of a
model with the same layers but tiny tensors (n_embd 16, T 8, B 1: what is left is per-call overhead), per layer.
Medians of --steps. --precision: the model's train.precision (the matmul table and the replay stay float32 BLAS
products). --cprofile N: also the step's N functions of most own time under cProfile (ms per step, over --steps
steps; cProfile's own cost included). Never a test: record the figures in docs/performance.md.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
from collections import defaultdict

import numpy as np
from bench_train import build, matmul_plan, run_plan

from hpc_llm.backend import keep_freed_memory
from hpc_llm.bench.timer import median_time
from hpc_llm.kernels import gemm
from hpc_llm.kernels.pool import pool_threads

from common import PRESETS


def gemm_table(plan, steps: int) -> list[dict]:
    """One row per distinct (a shape, b shape, transposed-ness): count per step, GFLOP/s, ms per step."""
    groups = defaultdict(list)
    for a, b in plan:
        groups[(a.shape, b.shape, a.flags.c_contiguous, b.flags.c_contiguous)].append((a, b))
    rows = []
    for (sa, sb, ca, cb), pairs in groups.items():
        a, b = pairs[0]
        t = median_time(lambda: gemm.matmul(a, b), steps, warmup=1)
        flops = 2.0 * np.prod(sa[:-1]) * sa[-1] * sb[-1]
        rows.append(
            dict(
                a=sa,
                b=sb,
                layout=("N" if ca else "T") + ("N" if cb else "T"),
                count=len(pairs),
                gflops=flops / t / 1e9,
                ms_per_step=1e3 * t * len(pairs),
            )
        )
    return sorted(rows, key=lambda r: -r["ms_per_step"])


def profile_rows(step, steps: int, top: int) -> list[dict]:
    """The step's `top` functions by own time under cProfile: ms per step, calls per step."""
    prof = cProfile.Profile()
    prof.runcall(lambda: [step() for _ in range(steps)])
    stats = pstats.Stats(prof).stats
    rows = [
        dict(fn=f"{path.rsplit('/', 1)[-1]}:{line}({fn})", ms=1e3 * tt / steps, calls=nc / steps)
        for (path, line, fn), (_, nc, tt, _, _) in stats.items()
    ]
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def child(name: str, steps: int, precision: str = "fp32", top: int = 0) -> dict:
    keep_freed_memory()
    p = PRESETS[name]
    cfg, model, opt, step = build(p, precision)
    plan = matmul_plan(cfg, p["batch"])
    tiny = dict(p, n_embd=16, n_head=2, block_size=8, batch=1, vocab_size=64)
    step_tiny = build(tiny, precision)[3]
    return dict(
        step_ms=1e3 * median_time(step, steps, warmup=2),
        profile=profile_rows(step, steps, top) if top else [],
        matmul_ms=1e3 * median_time(lambda: run_plan(plan), steps, warmup=1),
        adamw_ms=1e3 * median_time(lambda: opt.step(1e-4), steps, warmup=1),
        overhead_ms_per_layer=1e3 * median_time(step_tiny, steps, warmup=2) / p["n_layer"],
        gemms=gemm_table(plan, steps),
        pool_threads=pool_threads(),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--preset", action="append", choices=sorted(PRESETS), help="repeatable; default: all"
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument(
        "--pool", default="auto", help="HPC_LLM_POOL values to run side by side, e.g. auto,off"
    )
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--cprofile", type=int, default=0, metavar="N")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.precision, args.cprofile)))
        return
    for name in args.preset or list(PRESETS):
        for t, pool in [(t, q) for t in args.threads.split(",") for q in args.pool.split(",")]:
            env = dict(os.environ, OPENBLAS_NUM_THREADS=t, OMP_NUM_THREADS=t, HPC_LLM_POOL=pool)
            cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps)]
            cmd += ["--precision", args.precision, "--cprofile", str(args.cprofile)]
            r = json.loads(
                subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            )
            print(
                f"{name}, {t} thread(s), pool {pool}: step {r['step_ms']:.1f} ms, "
                f"matmuls alone {r['matmul_ms']:.1f} ms ({r['step_ms'] / r['matmul_ms']:.2f}x), "
                f"AdamW {r['adamw_ms']:.1f} ms, per-layer overhead "
                f"{r['overhead_ms_per_layer']:.2f} ms, pool threads {r['pool_threads']}"
            )
            for g in r["gemms"][:8]:
                print(
                    f"    {g['a']} @ {g['b']} {g['layout']} x{g['count']}: {g['gflops']:.0f} GFLOP/s, "
                    f"{g['ms_per_step']:.1f} ms/step"
                )
            for f in r["profile"]:
                print(f"    {f['ms']:7.1f} ms/step  {f['calls']:6.0f} calls  {f['fn']}")


if __name__ == "__main__":
    main()
