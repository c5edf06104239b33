"""The collective watchdog's cost on the training step, side by side in one run (docs/reliability.md).

    mpiexec -n 2 python scripts/bench/bench_watchdog.py --data DIR [--preset small|6x384] [--rounds 10] [--steps 10]

One Trainer (dp over the ranks, gradient buckets of 0.05 MiB so a step makes many MPI calls: the worst case for a
per-call cost); rounds alternate `--steps` steps with the watchdog on (parallel.comm_timeout_s = 600: every MPI wait
bracketed by enter/leave, its thread waking every second) and off (comm.py's WATCHDOG replaced by a no-op). Reported:
the median step time of each (each step's time is the max over ranks), the ratio, the MPI calls per step in the
ledger, and the price of one enter/leave pair timed alone (calls x price / step: the overhead without the noise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from mpi4py import MPI

import hpc_llm.parallel.comm as comm
from hpc_llm.config import load_config
from hpc_llm.parallel.grid import make_grid
from hpc_llm.runtime.faults import WATCHDOG
from hpc_llm.train.trainer import Trainer

from common import model_sets

# --preset: the shared shapes, the vocabulary taken from --data
SHAPES = {"small": "shakespeare-char", "6x384": "6x384"}


class NoWatchdog:
    def enter(self, op: str) -> None:
        pass

    def leave(self) -> None:
        pass


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--preset", choices=SHAPES, default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    return ap.parse_args()


def make_trainer(args, world) -> Trainer:
    sets = model_sets(SHAPES[args.preset], vocab=False) + [
        f"data.path={args.data}",
        f"train.batch_size={args.batch}",
        "parallel.bucket_mb=0.05",
        "train.peak_tflops=1",
        "train.eval_iters=0",
        "parallel.comm_timeout_s=600",
        f"train.out_dir=/tmp/bench_watchdog_{world.rank}_{time.time_ns()}",
        f"train.max_iters={10**6}",
    ]
    return Trainer(load_config(None, sets), grid=make_grid(world, 1, 1))


def alternate(args, world, trainer: Trainer) -> tuple[dict, int]:
    """({"on": step seconds, "off": ...}, MPI calls per step in the ledger): rounds of steps with the watchdog on
    and off, the order swapped every round; each step's time is the max over ranks."""
    for _ in range(3):
        trainer.train_step()
    times = {"on": [], "off": []}
    calls = 0
    for r in range(args.rounds):
        for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
            comm.WATCHDOG = WATCHDOG if mode == "on" else NoWatchdog()
            for _ in range(args.steps):
                world.Barrier()
                trainer.grid.world.ledger.reset()
                t0 = time.perf_counter()
                trainer.train_step()
                times[mode].append(world.allreduce(time.perf_counter() - t0, op=MPI.MAX))
                calls = sum(c["calls"] for c in trainer.grid.world.ledger.summary().values())
    comm.WATCHDOG = WATCHDOG
    return times, calls


def per_call_seconds(n: int = 10**6) -> float:
    """The per-call price alone (noise-free): enter + leave, n times."""
    t0 = time.perf_counter()
    for _ in range(n):
        WATCHDOG.enter("bench")
        WATCHDOG.leave()
    return (time.perf_counter() - t0) / n


def main() -> None:
    args = parse_args()
    world = MPI.COMM_WORLD
    times, calls = alternate(args, world, make_trainer(args, world))
    if world.rank == 0:
        per_call = per_call_seconds()
        on, off = statistics.median(times["on"]), statistics.median(times["off"])
        print(
            json.dumps(
                {
                    "preset": args.preset,
                    "ranks": world.size,
                    "steps_each": len(times["on"]),
                    "median_on_ms": 1e3 * on,
                    "median_off_ms": 1e3 * off,
                    "overhead": on / off - 1,
                    "mpi_calls_per_step_in_ledger": calls,
                    "enter_leave_us": 1e6 * per_call,
                    "bound_from_calls": calls * per_call / off,
                }
            )
        )


if __name__ == "__main__":
    main()
