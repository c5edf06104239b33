#!/usr/bin/env python
"""The training time a checkpoint save costs, saving in the foreground (checkpoint.async_save false) or in the
background (true), beside the same run without interval saves.

    export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
    mpiexec -n 1 python scripts/bench/bench_save_stall.py --preset 6x384
    mpiexec -n 2 python scripts/bench/bench_save_stall.py --preset 6x384       # DP2, ZeRO-1
    mpiexec -n 1 python scripts/bench/bench_save_stall.py --preset gpt2-small --saves-only

The real Trainer's run() (what `hpc-llm train` does) of --steps steps, three ways in turn, --repeats times: no
interval saves ("none"), saves every --interval steps by the parts writer in the foreground ("sync") and in the
background ("async"); every run ends with the same final foreground save. Stall per save = (run time - the "none"
run's time of the same repeat) / interval saves: everything a save costs the training, the background writer's
competition for the cores included. Also the main thread's time inside Trainer.checkpoint() and settle_save() (the
step boundary's share). Medians over the repeats; all ranks' slowest. --saves-only: saves alone (saves_only).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpc_llm.train.trainer import Trainer

from common import PRESETS, preset_config

MODES = {"none": (0, False), "sync": (None, False), "async": (None, True)}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="6x384")
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--interval", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: under /tmp)")
    ap.add_argument(
        "--saves-only", action="store_true", help="time saves without training between them"
    )
    return ap.parse_args()


def one_run(args, world, tmp: Path, mode: str) -> tuple[float, float]:
    """(wall seconds of run(), seconds the main thread spent in saves' calls), the slowest rank's."""
    cfg = preset_config(world, args.preset, tmp, 200_000)
    interval, background = MODES[mode]
    cfg.train.batch_size = PRESETS[args.preset]["batch"] * world.size
    cfg.train.max_iters, cfg.train.warmup_iters = args.steps, 0
    cfg.train.log_interval = 10**6
    cfg.train.out_dir = str(tmp / mode)
    cfg.parallel.zero = 1
    cfg.checkpoint.interval = args.interval if interval is None else interval
    cfg.checkpoint.writer, cfg.checkpoint.async_save, cfg.checkpoint.keep_last = (
        "parts",
        background,
        2,
    )
    tr = Trainer(cfg)
    inside, depth = [0.0], [0]
    for name in ("checkpoint", "settle_save"):
        original = getattr(tr, name)

        def timed(*a, _fn=original, **k):
            t0 = time.perf_counter()
            depth[0] += 1
            try:
                return _fn(*a, **k)
            finally:
                depth[0] -= 1
                if not depth[0]:  # checkpoint() calls settle_save(): counted once
                    inside[0] += time.perf_counter() - t0

        setattr(tr, name, timed)
    world.Barrier()
    t0 = time.perf_counter()
    tr.run()
    total = time.perf_counter() - t0
    tr.close()
    return world.allreduce(total, op=MPI.MAX), world.allreduce(inside[0], op=MPI.MAX)


def saves_only(args, world, tmp: Path) -> None:
    """No training: each repeat one foreground save, then one background save whose calls on the main thread
    (start, and advance at the boundary after each background round) are timed apart from its background work
    (waited for in between): the stall where the training does not compete with the writer for the CPU (a GPU
    run)."""
    cfg = preset_config(world, args.preset, tmp, 200_000)
    cfg.train.batch_size = PRESETS[args.preset]["batch"] * world.size
    cfg.train.out_dir, cfg.parallel.zero = str(tmp / "saves"), 1
    cfg.checkpoint.writer, cfg.checkpoint.keep_last = "parts", 2
    tr = Trainer(cfg)
    rows = {"sync_s": [], "async_main_thread_s": [], "async_write_s": []}
    for rep in range(args.repeats):
        tr.step = 2 * rep + 1
        world.Barrier()
        t0 = time.perf_counter()
        tr.save()
        t1 = time.perf_counter()
        tr.step += 1
        pending = tr.save(background=True)
        main, waited, path = time.perf_counter() - t1, 0.0, None
        # each round of the save (the parts, then rank 0's master) waited for, then moved on at a "step boundary"
        while path is None:
            t2 = time.perf_counter()
            while not pending.ready():
                time.sleep(0.01)
            t3 = time.perf_counter()
            path = pending.advance() if hasattr(pending, "advance") else pending.finish()
            main, waited = main + time.perf_counter() - t3, waited + t3 - t2
        for key, value in (("sync_s", t1 - t0), ("async_main_thread_s", main)):
            rows[key].append(world.allreduce(value, op=MPI.MAX))
        rows["async_write_s"].append(world.allreduce(waited, op=MPI.MAX))
    tr.close()
    if world.rank == 0:
        med = {k: float(np.median(v)) for k, v in rows.items()}
        print(
            f"{args.preset} on {world.size} ranks, saves only: sync save {med['sync_s']:.3f} s, background "
            f"save's main thread {med['async_main_thread_s']:.3f} s "
            f"({100 * med['async_main_thread_s'] / med['sync_s']:.0f}%), its write {med['async_write_s']:.3f} s"
        )
        print("JSON " + json.dumps({"preset": args.preset, "ranks": world.size, **rows}))


def main() -> None:
    args = parse_args()
    world = MPI.COMM_WORLD
    tmp = tempfile.mkdtemp(prefix="hpc_llm_bench_stall_", dir=args.dir) if world.rank == 0 else None
    tmp = Path(world.bcast(tmp))
    if args.saves_only:
        saves_only(args, world, tmp)
        if world.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    saves = len(range(args.interval, args.steps, args.interval))
    rows = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            rows[mode].append(one_run(args, world, tmp, mode))
            if world.rank == 0:
                shutil.rmtree(tmp / mode)
            world.Barrier()
    if world.rank != 0:
        return
    base = np.array([t for t, _ in rows["none"]])
    out = {"preset": args.preset, "ranks": world.size, "steps": args.steps, "saves": saves}
    for mode in ("sync", "async"):
        total = np.array([t for t, _ in rows[mode]])
        inside = np.array([i for _, i in rows[mode]]) - np.array([i for _, i in rows["none"]])
        out[mode] = {
            "stall_per_save_s": float(np.median((total - base) / saves)),
            "main_thread_per_save_s": float(np.median(inside / saves)),
            "runs_s": total.tolist(),
        }
    out["none_runs_s"] = base.tolist()
    out["async_over_sync"] = out["async"]["stall_per_save_s"] / out["sync"]["stall_per_save_s"]
    print(
        f"{args.preset} on {world.size} ranks, {saves} saves in {args.steps} steps: stall per save "
        f"sync {out['sync']['stall_per_save_s']:.3f} s, async {out['async']['stall_per_save_s']:.3f} s "
        f"({100 * out['async_over_sync']:.0f}%); main thread in saves: sync "
        f"{out['sync']['main_thread_per_save_s']:.3f} s, async {out['async']['main_thread_per_save_s']:.3f} s"
    )
    print("JSON " + json.dumps(out))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
