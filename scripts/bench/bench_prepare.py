#!/usr/bin/env python
"""`hpc-llm prepare` throughput and peak memory per rank (docs/data.md).

    export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
    python scripts/bench/bench_prepare.py --mb 50 --repeats 3              # runs 1 and 2 ranks itself, prints a table

The corpus is --source (default: tinyshakespeare) repeated to --mb MB in one file. Each case is `mpiexec -n N python
scripts/bench/bench_prepare.py --worker ...`: every rank calls data.prepare (the CLI's code path) and reports its wall
time and peak RSS (VmHWM) before and after; rank 0 prints them as JSON. Tokenizers: byte, char, gpt2 (a byte-level
BPE of --vocab-size tokens trained beforehand on the first MB, read from a tokenizer.json: encoding speed alone) and
bpe (training on the whole corpus, then encoding). MB/s = corpus MB / wall seconds, medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpc_llm.data.prepare import prepare
from hpc_llm.data.tokenizer import BPETokenizer
from hpc_llm.parallel.comm import world_comm

from common import SHAKESPEARE, vm_hwm


def worker(args) -> None:
    comm = world_comm()
    kw = {"vocab_size": args.vocab_size} if args.tokenizer == "bpe" else {}
    if args.tokenizer == "gpt2":
        kw = {"tokenizer_dir": args.tokenizer_dir}
    before = vm_hwm()
    comm.barrier()
    t0 = time.perf_counter()
    prepare(
        [args.corpus], args.out, tokenizer=args.tokenizer, memory_mb=args.memory_mb, comm=comm, **kw
    )
    comm.barrier()
    dt = time.perf_counter() - t0
    rows = comm.allgather_objects({"seconds": dt, "hwm_before": before, "hwm_after": vm_hwm()})
    if comm.rank == 0:
        print(json.dumps(rows))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus")
    p.add_argument("--out")
    p.add_argument("--tokenizer-dir")
    p.add_argument("--tokenizer", default="byte")
    p.add_argument("--source", default=str(SHAKESPEARE))
    p.add_argument("--mb", type=int, default=50)
    p.add_argument("--memory-mb", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--tokenizers", default="byte,char,gpt2,bpe")
    return p.parse_args()


def make_inputs(args, tmp: Path) -> tuple[Path, Path]:
    """(corpus: --source repeated to --mb MB, a directory with a BPE tokenizer trained on its first MB)."""
    src = Path(args.source).read_text(encoding="utf-8")
    corpus = tmp / "corpus.txt"
    reps = args.mb * 1_000_000 // len(src.encode("utf-8")) + 1
    corpus.write_text((src * reps)[: args.mb * 1_000_000], encoding="utf-8")
    tokdir = tmp / "tok"
    tokdir.mkdir()
    first = corpus.read_text(encoding="utf-8")[:1_000_000]
    (tokdir / "tokenizer.json").write_text(
        BPETokenizer.train(iter(first.splitlines(True)), args.vocab_size).json
    )
    return corpus, tokdir


def run_workers(args, n: int, tok: str, corpus: Path, tokdir: Path, out: Path) -> list[dict]:
    """One prepare under `mpiexec -n n`: every rank's seconds and VmHWM before and after."""
    mpiexec = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    shutil.rmtree(out, ignore_errors=True)
    cmd = [mpiexec, "--oversubscribe", "-n", str(n), sys.executable, __file__, "--worker"]
    cmd += ["--corpus", str(corpus), "--out", str(out), "--tokenizer", tok]
    cmd += ["--memory-mb", str(args.memory_mb), "--vocab-size", str(args.vocab_size)]
    cmd += ["--tokenizer-dir", str(tokdir)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare."))
    try:
        corpus, tokdir = make_inputs(args, tmp)
        size_mb = corpus.stat().st_size / 1e6
        print(
            f"corpus {size_mb:.1f} MB ({args.source} repeated), --memory-mb {args.memory_mb}, "
            f"BPE vocab {args.vocab_size}, medians of {args.repeats}"
        )
        print(
            "| tokenizer | ranks | MB/s | seconds | peak RSS per rank (MiB, max) | growth during prepare (MiB) |"
        )
        print("|---|---|---|---|---|---|")
        for tok in args.tokenizers.split(","):
            for n in map(int, args.ranks.split(",")):
                runs = [
                    run_workers(args, n, tok, corpus, tokdir, tmp / "out")
                    for _ in range(args.repeats)
                ]
                secs = statistics.median(max(x["seconds"] for x in run) for run in runs)
                peak = statistics.median(max(x["hwm_after"] for x in run) for run in runs) / 2**20
                growth = statistics.median(
                    max(x["hwm_after"] - x["hwm_before"] for x in run) for run in runs
                )
                print(
                    f"| {tok} | {n} | {size_mb / secs:.1f} | {secs:.2f} | {peak:.0f} | "
                    f"{growth / 2**20:.0f} |",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
