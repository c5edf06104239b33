"""Fine-tuning: pre-train a small model on the stdlib corpus, then fine-tune it on tinyshakespeare (the same
byte tokenizer) in full and with LoRA; val loss after the same number of steps, trainable parameters, optimizer
memory and tokens/s, one process (docs/performance.md, "Fine-tuning (issue 14)").

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python scripts/bench/bench_finetune.py \
        [--out runs/bench_finetune]
        [--pretrain-steps 1500] [--finetune-steps 400] [--repeat 3]
        [--shakespeare ../shared/data/tinyshakespeare.txt]

Runs one job at a time in this process (hpc_llm.train.Trainer), each configured like `hpc-llm train` with `--set`
overrides of inputs/default.toml's model (4 layers x 128, block 128). The fine-tuning runs are repeated --repeat times,
interleaved (full, LoRA, LoRA, full, ...: side by side on a noisy machine); a run's tokens/s is the median over its log
windows (train.log_interval steps each, the first, warm-up, left out), the table's the median over the repeats (their
losses are bitwise the same: the runs are deterministic). Prints a Markdown table and writes results.json under
--out.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hpc_llm.config import load_config
from hpc_llm.train.trainer import Trainer

from common import REPO, SHAKESPEARE

MODEL = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=128"]


def prepare(args, out: Path) -> tuple[Path, Path]:
    """The two corpora, byte tokenizer (`hpc-llm prepare`), once."""
    stdlib, shakespeare = out / "data_stdlib", out / "data_shakespeare"
    cli = [sys.executable, "-m", "hpc_llm", "prepare"]
    if not (stdlib / "meta.json").exists():
        subprocess.run(
            cli + ["--stdlib", "--max-bytes", str(args.stdlib_bytes), "--out", str(stdlib)],
            check=True,
        )
    if not (shakespeare / "meta.json").exists():
        subprocess.run(
            cli + [args.shakespeare, "--tokenizer", "byte", "--out", str(shakespeare)], check=True
        )
    return stdlib, shakespeare


def run(name: str, out: Path, sets: list[str]) -> dict:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(
        REPO / "inputs" / "default.toml",
        MODEL + sets + [f"train.out_dir={run_dir}", "checkpoint.interval=0"],
    )
    t0 = time.perf_counter()
    tr = Trainer(cfg)
    try:
        summary = tr.run()
    finally:
        tr.close()
    wall = time.perf_counter() - t0
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tps = [w["tokens_per_s"] for w in windows if w["kind"] == "train"][1:]
    ev = tr.metrics.eval
    row = {
        "name": name,
        "trainable": tr.model.num_trainable,
        "params": tr.model.num_params,
        "moment_bytes": int(tr.opt.m.nbytes + tr.opt.v.nbytes),
        "tokens_per_s": float(np.median(tps)),
        "tokens_per_s_windows": tps,
        "val_loss_start": ev["val_loss"][0],
        "val_loss": ev["val_loss"][-1],
        "train_loss": ev["train_loss"][-1],
        "eval_steps": ev["step"],
        "val_curve": ev["val_loss"],
        "wall_s": wall,
        "checkpoint": summary["checkpoint"],
    }
    print(
        json.dumps(
            {k: v for k, v in row.items() if k not in ("tokens_per_s_windows", "val_curve")}
        ),
        flush=True,
    )
    return row


def pretrain(args, out: Path, stdlib: Path, shared: list[str]) -> dict:
    n = args.pretrain_steps
    return run(
        "pretrain",
        out,
        shared
        + [
            f"data.path={stdlib}",
            f"train.max_iters={n}",
            f"train.lr_decay_iters={n}",
            f"train.eval_interval={n}",
            "train.warmup_iters=50",
        ],
    )


def finetune(args, out: Path, shakespeare: Path, shared: list[str], base: dict) -> list[dict]:
    """Full and LoRA fine-tuning of the pre-trained base, interleaved --repeat times; their rows."""
    m = args.finetune_steps
    ft = shared + [
        f"data.path={shakespeare}",
        f"train.init_from={base['checkpoint']}",
        f"train.max_iters={m}",
        f"train.lr_decay_iters={m}",
        f"train.eval_interval={max(1, m // 4)}",
        "train.warmup_iters=10",
    ]
    lora = ["train.lr=2e-3", "train.min_lr=2e-4", "model.lora_rank=8", "model.lora_alpha=16"]
    runs = {
        "full": ft + ["train.lr=3e-4", "train.min_lr=3e-5"],
        "lora8-c_attn": ft + lora,
        "lora8-all": ft + lora + ["model.lora_targets=attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"],
    }
    repeats = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, sets in runs.items():
            repeats[name].append(run(name, out, sets))
    rows = []
    for name, rs in repeats.items():
        assert all(r["val_curve"] == rs[0]["val_curve"] for r in rs), f"{name}: repeats differ"
        rows.append(
            {
                **rs[0],
                "tokens_per_s": float(np.median([r["tokens_per_s"] for r in rs])),
                "tokens_per_s_repeats": [r["tokens_per_s"] for r in rs],
            }
        )
    return rows


def print_table(rows: list[dict], base: dict) -> None:
    print(
        f"\nbase model's val loss on shakespeare before fine-tuning: {rows[1]['val_loss_start']:.4f} "
        f"(on stdlib after pre-training: {base['val_loss']:.4f})"
    )
    print(
        "| run | steps | trainable params | Adam moments (bytes) | val loss | val curve | tokens/s (median) | "
        "repeats |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        curve = " / ".join(f"{v:.3f}" for v in r["val_curve"])
        reps = ", ".join(f"{v:.0f}" for v in r.get("tokens_per_s_repeats", [r["tokens_per_s"]]))
        print(
            f"| {r['name']} | {r['eval_steps'][-1]} | {r['trainable']:,} of {r['params']:,} | "
            f"{r['moment_bytes']:,} | {r['val_loss']:.4f} | {curve} | {r['tokens_per_s']:.0f} | {reps} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench_finetune")
    p.add_argument("--shakespeare", default=str(SHAKESPEARE))
    p.add_argument("--stdlib-bytes", type=int, default=4_000_000)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stdlib, shakespeare = prepare(args, out)
    shared = [
        f"train.batch_size={args.batch}",
        "train.eval_iters=10",
        "train.log_interval=25",
        "train.peak_tflops=1",
    ]
    base = pretrain(args, out, stdlib, shared)
    rows = [base] + finetune(args, out, shakespeare, shared, base)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print_table(rows, base)


if __name__ == "__main__":
    main()
