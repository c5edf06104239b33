"""Mixed precision and recomputation, measured (docs/performance.md, "Mixed precision and recomputation").

    python scripts/bench/bench_precision.py quality [--jobs 2]  # shakespeare-char, 2000 iterations: val loss per
                                                                # precision and seed, and nanoGPT's exact setting
                                                                # (model.bias=false)
    python scripts/bench/bench_precision.py speed      # step time: fp32 / +recompute / bf16 / fp16, side by side
    python scripts/bench/bench_precision.py memory     # GPT-2 small: peak RSS per configuration (one process each)

quality runs `hpc-llm train inputs/shakespeare_char.toml` (data: hpc-llm prepare ../shared/data/tinyshakespeare.txt
--tokenizer char --out data/shakespeare_char) once per (precision, seed), one BLAS thread each, `--jobs` at a time,
and reads the final val loss from each run's summary line. The losses are deterministic: the load on the machine
changes only how long it takes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hpc_llm.config import Config
from hpc_llm.config.checks import validated
from hpc_llm.parallel.grid import single_process_grid
from hpc_llm.train.trainer import Trainer

from common import PRESETS, vm_hwm

REPO = Path(__file__).resolve().parents[2]
SEEDS = (1337, 1, 2)


def quality(args) -> dict:
    runs = [(p, s, True) for p in ("fp32", "bf16", "fp16") for s in SEEDS] + [
        ("fp32", s, False) for s in SEEDS
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

    def one(run):
        prec, seed, bias = run
        out = REPO / "runs" / "bench_precision" / f"{prec}-{seed}{'' if bias else '-nobias'}"
        cmd = [
            sys.executable,
            "-m",
            "hpc_llm",
            "train",
            str(REPO / "inputs" / "shakespeare_char.toml"),
            "--set",
            f"train.precision={prec}",
            "--set",
            f"train.seed={seed}",
            "--set",
            f"model.bias={bias}",
            "--set",
            f"train.out_dir={out}",
            "--set",
            "checkpoint.interval=0",
            "--set",
            "train.peak_tflops=1",
        ]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: status {r.returncode}\n{r.stderr[-2000:]}")
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        return {
            "precision": prec,
            "seed": seed,
            "bias": bias,
            "val_loss": summary["val_loss"],
            "train_loss": summary["train_loss"],
            "seconds": time.perf_counter() - t0,
        }

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, runs))
    rows = [
        "| setting | val loss, seeds " + ", ".join(map(str, SEEDS)) + " | mean |",
        "| --- | --- | --- |",
    ]
    for prec, bias in (("fp32", True), ("bf16", True), ("fp16", True), ("fp32", False)):
        vals = [r["val_loss"] for r in results if r["precision"] == prec and r["bias"] == bias]
        name = prec + (
            "" if bias else ", model.bias = false (nanoGPT's exact setting; nanoGPT reports 1.88)"
        )
        rows.append(
            f"| {name} | {', '.join(f'{v:.4f}' for v in vals)} | {statistics.mean(vals):.4f} |"
        )
    print("\n".join(rows))
    return {"runs": results}


def _trainer(name: str, preset: dict, precision: str, recompute: str, seed: int = 0):
    cfg = Config()
    for k, v in preset.items():
        setattr(cfg.model, k, v) if k != "batch" else setattr(cfg.train, "batch_size", v)
    cfg.data.path = str(REPO / "data" / "shakespeare_char")
    cfg.train.precision, cfg.train.recompute, cfg.train.seed = precision, recompute, seed
    cfg.train.peak_tflops, cfg.train.eval_iters = 1.0, 0
    cfg.train.out_dir = f"/tmp/bench_precision/{name}-{os.getpid()}"
    return Trainer(validated(cfg), grid=single_process_grid())


# the shared shapes (6x384's vocabulary 65 is shakespeare-char's, the data it trains on), and GPT-2 small at batch 4
SHAPES = {
    "6x384": PRESETS["6x384"],
    "gpt2-small": PRESETS["gpt2-small"],
    "gpt2-small-b4": {**PRESETS["gpt2-small"], "batch": 4},
}
SETTINGS = {
    "fp32": ("fp32", "none"),
    "fp32+recompute": ("fp32", "block"),
    "fp32+selective": ("fp32", "selective"),
    "bf16": ("bf16", "none"),
    "fp16": ("fp16", "none"),
    "bf16+recompute": ("bf16", "block"),
    "bf16+selective": ("bf16", "selective"),
}


def speed(args) -> dict:
    """Every setting's trainer in one process, one step each in turn (so drifts of the shared machine hit all
    alike), after one warm-up step each; median step times and their ratio to fp32's."""
    preset = SHAPES[args.preset]
    trainers = {name: _trainer(name, preset, *SETTINGS[name]) for name in args.settings}
    times = {name: [] for name in trainers}
    for tr in trainers.values():
        tr.train_step()
    for _ in range(args.steps):
        for name, tr in trainers.items():
            t0 = time.perf_counter()
            tr.train_step()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med.get("fp32", next(iter(med.values())))
    print(
        f"| {args.preset} | "
        + " | ".join(f"{n}: {1000 * m:.0f} ms ({m / base:.2f}x)" for n, m in med.items())
        + " |"
    )
    return {"preset": args.preset, "median_s": med, "steps": times}


def memory(args) -> dict:
    """One process per setting (peak RSS is a high-water mark): the trainer, one step, then its peak RSS."""
    out = {}
    for name in args.settings:
        r = subprocess.run(
            [sys.executable, __file__, "rss", "--preset", args.preset, "--setting", name],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "2"},
        )
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        out[name] = int(r.stdout.strip().splitlines()[-1])
        print(f"| {args.preset} | {name} | peak RSS {out[name] / 2**20:.0f} MiB |", flush=True)
    return {"preset": args.preset, "peak_rss": out}


def rss(args) -> None:
    """One setting's trainer and one step in this fresh process, then its peak RSS in bytes (what memory runs)."""
    tr = _trainer(args.setting, SHAPES[args.preset], *SETTINGS[args.setting])
    tr.train_step()
    print(vm_hwm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--jobs", type=int, default=2)
    sp = sub.add_parser("speed")
    sp.add_argument("--preset", choices=SHAPES, default="6x384")
    sp.add_argument("--steps", type=int, default=5)
    sp.add_argument(
        "--settings",
        nargs="+",
        default=["fp32", "fp32+recompute", "bf16", "fp16"],
        choices=SETTINGS,
    )
    mem = sub.add_parser("memory")
    mem.add_argument("--preset", choices=SHAPES, default="gpt2-small")
    mem.add_argument(
        "--settings", nargs="+", default=["fp32", "bf16", "bf16+recompute"], choices=SETTINGS
    )
    one = sub.add_parser(
        "rss", help="one setting's peak RSS after one step (memory runs it per setting)"
    )
    one.add_argument("--preset", choices=SHAPES, required=True)
    one.add_argument("--setting", choices=SETTINGS, required=True)
    for p in (q, sp, mem):
        p.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.what == "rss":
        return rss(args)
    result = {"quality": quality, "speed": speed, "memory": memory}[args.what](args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
