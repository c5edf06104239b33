#!/usr/bin/env python3
"""The compression recipe measured end to end on a prepared corpus (docs/compression.md): a teacher trained here, a
student trained from scratch vs distilled from it (same steps, same batches), and the teacher pruned at 25% and 50%
of its heads and MLP neurons, each before and after a distilled fine-tune, beside int8: parameters, val loss,
generation tokens/s.

    PYTHONPATH=. .venv/bin/python scripts/bench/bench_compression.py --data data/shakespeare_char --out /tmp/comp

Sizes and steps are flags (the defaults fit a shared 2-core CPU in about 20 minutes). Val loss: `hpc-llm eval`'s
evaluate over --eval-batches batches of the val split. Generation: greedy, batch 1, a 16-token prompt and 64 new
tokens, median of 3 runs after a warm-up, float32 and int8 (quantize.py).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

from hpc_llm.api import load_model
from hpc_llm.config import Config, validated
from hpc_llm.data.tokens import TokenData
from hpc_llm.infer.evaluate import evaluate
from hpc_llm.infer.generate import generate
from hpc_llm.tools.prune import Pruning, prune
from hpc_llm.train import train


def run_config(args, out: Path, shape: tuple, steps: int, model_kw=None, **train_kw) -> Config:
    n_layer, n_head, n_embd = shape
    cfg = Config()
    m, t = cfg.model, cfg.train
    m.n_layer, m.n_head, m.n_embd, m.block_size = n_layer, n_head, n_embd, args.block
    for k, v in (model_kw or {}).items():
        setattr(m, k, v)
    cfg.data.path = args.data
    t.batch_size, t.max_iters, t.lr, t.min_lr = args.batch, steps, args.lr, args.lr / 10
    t.warmup_iters, t.lr_decay_iters = min(20, steps // 10), steps
    t.eval_iters, t.eval_interval, t.log_interval = 0, steps, max(1, steps // 4)
    t.out_dir, t.peak_tflops, t.seed = str(out), 1.0, 1337
    for k, v in train_kw.items():
        setattr(t, k, v)
    return validated(cfg)


def measure(path: str, val, args) -> dict:
    """Parameters, val loss and generation tokens/s (float32 and int8) of a checkpoint's model."""
    out = {}
    for q in (None, "int8"):
        model = load_model(path, quantize=q)
        if q is None:
            out["params"] = model.num_params
            out["val_loss"] = evaluate(model, val, 8, args.eval_batches)["loss"]
        prompt = np.asarray(val[:16], dtype=np.int64)[None]
        generate(model, prompt, 8, temperature=0.0)  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            generate(model, prompt, 64, temperature=0.0)
            times.append(time.perf_counter() - t0)
        out["tokens_per_s_int8" if q else "tokens_per_s"] = 64 / statistics.median(times)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--teacher", default="6,6,192", help="n_layer,n_head,n_embd")
    p.add_argument("--student", default="4,4,128")
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument(
        "--teacher-from",
        help="a teacher checkpoint trained before (by this script): measured, not trained",
    )
    p.add_argument("--student-steps", type=int, default=200)
    p.add_argument("--finetune-steps", type=int, default=60)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-batches", type=int, default=20)
    args = p.parse_args()
    out = Path(args.out)
    shape = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    val = TokenData(args.data).split("val")
    rows = {}

    def run(name, cfg):
        t0 = time.perf_counter()
        summary = train(cfg)
        secs = time.perf_counter() - t0
        rows[name] = {**measure(summary["checkpoint"], val, args), "train_s": secs}
        rows[name]["ms_per_step"] = 1000 * secs / cfg.train.max_iters
        print(name, json.dumps(rows[name]), flush=True)
        return summary["checkpoint"]

    if args.teacher_from:
        teacher = args.teacher_from
        rows["teacher"] = measure(teacher, val, args)
        print("teacher", json.dumps(rows["teacher"]), flush=True)
    else:
        cfg = run_config(args, out / "teacher", shape(args.teacher), args.teacher_steps)
        teacher = run("teacher", cfg)
    kd = {"teacher": teacher, "distill_alpha": 0.5, "distill_temperature": 2.0}
    st = shape(args.student)
    run("student-scratch", run_config(args, out / "scratch", st, args.student_steps))
    run("student-distilled", run_config(args, out / "distilled", st, args.student_steps, **kd))
    n_layer, n_head, n_embd = shape(args.teacher)
    for f in (0.25, 0.5):
        path, m = prune(teacher, out / f"pruned{int(100 * f)}.h5", Pruning(f, f), force=True)
        rows[f"pruned-{f:g}"] = measure(str(path), val, args)
        print(f"pruned-{f:g}", json.dumps(rows[f"pruned-{f:g}"]), flush=True)
        widths = {"head_dim": m.head_dim, "n_inner": m.n_inner}
        ft = {**kd, "init_from": str(path), "lr": args.lr / 4}
        cfg = run_config(
            args,
            out / f"ft{int(100 * f)}",
            (n_layer, m.n_head, n_embd),
            args.finetune_steps,
            widths,
            **ft,
        )
        run(f"pruned-{f:g}-finetuned", cfg)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(
        f"{'model':28s} {'params':>9s} {'val loss':>9s} {'tok/s fp32':>11s} {'tok/s int8':>11s} {'ms/step':>8s}"
    )
    for name, r in rows.items():
        ms = r.get("ms_per_step", math.nan)
        print(
            f"{name:28s} {r['params']:9d} {r['val_loss']:9.4f} {r['tokens_per_s']:11.1f} "
            f"{r['tokens_per_s_int8']:11.1f} {ms:8.0f}"
        )


if __name__ == "__main__":
    main()
