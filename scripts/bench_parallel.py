#!/usr/bin/env python
"""Parallel training-step benchmark: tokens/s, communication share, overlap of the bucketed allreduce, memory per rank.

    export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
    mpiexec -n 1 python scripts/bench_parallel.py --preset shakespeare-char       # DP1, one BLAS thread
    mpiexec -n 2 python scripts/bench_parallel.py --preset shakespeare-char       # DP2
    mpiexec -n 2 python scripts/bench_parallel.py --preset gpt2-small --tp 2 --steps 3

The real Trainer (same code path as `hpc-llm train`) on random tokens. Per step: wall time (the max over ranks),
exposed communication (time inside collectives and waits, from the comm ledger). After the timed steps, the same
gradient buckets are allreduced again, blocking, to measure what the communication costs when nothing hides it:
hidden = 1 - exposed data-parallel wait / blocking bucket time. Medians over --steps. Rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import PRESETS  # noqa: E402

from hpc_llm.config import Config  # noqa: E402
from hpc_llm.data.tokens import FORMAT, FORMAT_VERSION  # noqa: E402
from hpc_llm.train.trainer import Trainer  # noqa: E402


def vm_hwm() -> int:
    return next(
        int(line.split()[1]) * 1024
        for line in open("/proc/self/status")
        if line.startswith("VmHWM:")
    )


def random_tokens(directory: Path, vocab: int, n: int) -> None:
    """A data directory of uniform random tokens (what the benchmark trains on does not matter for speed)."""
    rng = np.random.default_rng(0)
    for split, size in (("train", n), ("val", n // 10)):
        rng.integers(0, vocab, size, dtype=np.uint16).tofile(directory / f"{split}.bin")
    chars = "".join(
        chr(0x100 + i) for i in range(vocab)
    )  # any vocabulary size, below the surrogate code points
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": "char",
        "chars": chars,
        "vocab_size": vocab,
        "n_train": n,
        "n_val": n // 10,
        "n_files": 0,
        "n_skipped": 0,
        "sources": [],
    }
    (directory / "meta.json").write_text(json.dumps(meta))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="shakespeare-char")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    args = ap.parse_args()
    world = MPI.COMM_WORLD
    p = PRESETS[args.preset]
    tmp = tempfile.mkdtemp(prefix="hpc_llm_bench_") if world.rank == 0 else None
    tmp = Path(world.bcast(tmp))
    vocab = p["vocab_size"]
    if world.rank == 0:
        random_tokens(tmp, vocab, 2_000_000)
    world.Barrier()

    cfg = Config()
    for k in ("n_layer", "n_head", "n_embd", "block_size"):
        setattr(cfg.model, k, p[k])
    cfg.model.vocab_size = p["vocab_size"]
    cfg.data.path = str(tmp)
    cfg.train.batch_size = p["batch"]
    cfg.train.out_dir = str(tmp / "run")
    cfg.train.peak_tflops = 1.0
    cfg.train.eval_iters = 0
    cfg.parallel.tp, cfg.parallel.zero, cfg.parallel.bucket_mb = args.tp, args.zero, args.bucket_mb
    tr = Trainer(cfg)
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
    opt_bytes = tr.opt.m.nbytes + tr.opt.v.nbytes
    rss = world.gather(vm_hwm())
    opt = world.gather(opt_bytes)
    if world.rank == 0:
        tokens = tr.tokens_per_step
        out = {
            "preset": args.preset,
            "ranks": world.size,
            "dp": tr.grid.dp,
            "tp": tr.grid.tp,
            "zero": args.zero,
            "tokens_per_s": tokens / step,
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


if __name__ == "__main__":
    main()
