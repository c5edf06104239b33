"""ZeRO stages side by side: bytes each step moves over the data-parallel group, and the step time, for
parallel.zero = 0, 1, 2, 3 and ZeRO-3 without its prefetch (how much of the gathers the prefetch hides).

    mpiexec -n 2 python scripts/bench/bench_zero.py --preset 6x384 --steps 5

The real Trainer on random tokens (scripts/bench/common.py's), one Trainer per variant on the same model and data,
the variants alternating step by step (the machine's drift hits all alike). Step time: the median over --steps rounds
of the max over ranks. Bytes: the ledger's count of the step's data-parallel collectives (each collective's buffer,
nccl-tests' size S), by kind, on rank 0; beside them the formula in units of the rank's parameters Psi (4 bytes
each): ZeRO-0 an allreduce of Psi; ZeRO-1 a reduce-scatter and an allgather of Psi (2 Psi); ZeRO-2 a reduce-scatter of
Psi per micro-batch and an allgather (m + 1 Psi); ZeRO-3 per micro-batch a gather of every unit in forward and in
backward and a reduce-scatter (3 Psi, 1.5x ZeRO-1 at m = 1), plus the tied wte gathered again for the head in forward,
less wpe, which the embedding's backward does not read. Time in the gathers: the seconds Handle.wait spent in
"dp.allgather_params", from the ledger.
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
from hpc_llm.train.trainer import Trainer

from common import PRESETS, preset_config, resident_bytes

VARIANTS = [("zero0", 0, True), ("zero1", 1, True), ("zero2", 2, True), ("zero3", 3, True)]
VARIANTS.append(("zero3-no-prefetch", 3, False))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="6x384")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=0, help="global batch (default: the preset's)")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--out", default="", help="append one JSON line per variant (rank 0)")
    return ap.parse_args()


def make_trainer(args, world, tmp: Path, zero: int, prefetch: bool) -> Trainer:
    cfg = preset_config(world, args.preset, tmp, 2_000_000)
    cfg.train.batch_size = args.batch or max(cfg.train.batch_size, world.size)
    cfg.train.grad_accum = args.accum
    cfg.train.out_dir = str(tmp / f"run-{zero}-{prefetch}")
    cfg.parallel.zero = zero
    tr = Trainer(validated(cfg))
    if tr.zero is not None:
        tr.zero.prefetch = prefetch
    return tr


def formula(zero: int, m: int, psi: int, wte: int, wpe: int) -> int:
    """The step's data-parallel bytes by the formula (module docstring), psi/wte/wpe in bytes."""
    return {
        0: psi,
        1: 2 * psi,
        2: (m + 1) * psi,
        3: m * (3 * psi + wte - wpe),
    }[zero]


def persistent_per_param(tr: Trainer) -> float:
    """Bytes per parameter of the rank's stage a rank holds between steps: the parameter, gradient and compute
    buffers' resident pages (mincore) and the Adam moments."""
    m, o = tr.model, tr.opt
    buffers = {id(b): b for b in (m.flat, m.grad_flat, m.compute)}.values()
    held = sum(resident_bytes(b) for b in buffers) + o.m.nbytes + o.v.nbytes
    return held / m.local_size


def persistent_formula(zero: int, n: int) -> float:
    """ZeRO's bytes per parameter (Rajbhandari et al.) with this code's fp32 sizes: 4-byte parameters, 4-byte
    gradients, K = 8 (Adam's m and v; the parameters are the fp32 master): 4 + 4 + 8, 4 + 4 + 8/N, 4 + (4 + 8)/N,
    (4 + 4 + 8)/N."""
    return {0: 16, 1: 8 + 8 / n, 2: 4 + 12 / n, 3: 16 / n}[zero]


def main() -> None:
    args = parse_args()
    world = MPI.COMM_WORLD
    tmp = Path(tempfile.mkdtemp(prefix="bench_zero_")) if world.rank == 0 else None
    tmp = Path(world.bcast(str(tmp)))
    trainers = {name: make_trainer(args, world, tmp, z, p) for name, z, p in VARIANTS}
    steps = {name: [] for name in trainers}
    comm = {name: {} for name in trainers}
    for i in range(args.warmup + args.steps):
        for name, tr in trainers.items():
            ledger = tr.grid.world.ledger
            ledger.reset()
            world.Barrier()
            t0 = time.perf_counter()
            tr.train_step()
            dt = world.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            if i >= args.warmup:
                steps[name].append(dt)
                comm[name] = ledger.summary()
    base = float(np.median(steps["zero0"]))
    for name, z, _ in VARIANTS:
        tr = trainers[name]
        m = tr.model
        psi = m.local_size * m.dtype.itemsize
        wte, wpe = (m.spec[n].size * m.dtype.itemsize for n in ("wte.weight", "wpe.weight"))
        dp_bytes = {k: v["bytes"] for k, v in comm[name].items() if k.startswith("dp.")}
        gather_s = comm[name].get("dp.allgather_params", {}).get("seconds", 0.0)
        step = float(np.median(steps[name]))
        row = {
            "preset": args.preset,
            "variant": name,
            "dp": tr.grid.dp,
            "micro_batches": args.accum,
            "step_ms": 1e3 * step,
            "vs_zero0": step / base,
            "dp_bytes": dp_bytes,
            "dp_total": sum(dp_bytes.values()),
            "formula": formula(z, args.accum, psi, wte, wpe),
            "gather_wait_ms": 1e3 * gather_s,
            "persistent_per_param": persistent_per_param(tr),
            "formula_per_param": persistent_formula(z, tr.grid.dp),
            "steps_ms": [1e3 * x for x in steps[name]],
        }
        if world.rank == 0:
            kinds = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in sorted(dp_bytes.items()))
            print(
                f"{args.preset} dp{tr.grid.dp} m{args.accum} {name:>17}: step {row['step_ms']:7.1f} ms "
                f"({row['vs_zero0']:.2f}x zero0), dp {row['dp_total'] / 1e6:.1f} MB (formula "
                f"{row['formula'] / 1e6:.1f}; {kinds}), waiting in gathers {row['gather_wait_ms']:.1f} ms; "
                f"held between steps {row['persistent_per_param']:.2f} B/param (formula "
                f"{row['formula_per_param']:.2f})",
                flush=True,
            )
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
