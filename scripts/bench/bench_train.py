#!/usr/bin/env python
"""Training-step benchmark: tokens/s, MFU, the step against its matmuls alone, and peak memory against a budget.

    python scripts/bench/bench_train.py --preset shakespeare-char
    python scripts/bench/bench_train.py --preset gpt2-small --steps 5

Side by side in one process: (1) the float32 matmul peak (2048^3), (2) the full training step (forward, backward,
AdamW) on random tokens, (3) the same step's matmuls alone, replayed with the same shapes and layouts. Reported as
medians of --steps runs. Peak RSS is measured in a fresh child process per preset (nothing else allocated) and put
beside the budget: 16 bytes per parameter (float32 weights, gradients, Adam m and v) plus the activations backward
keeps. Speed is never asserted in tests: run this and record the figures in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from hpc_llm.backend import keep_freed_memory
from hpc_llm.bench.calibrate import matmul_peak_flops
from hpc_llm.bench.timer import median_time
from hpc_llm.config import ModelConfig, TrainConfig
from hpc_llm.kernels import gemm
from hpc_llm.model import attention as SA
from hpc_llm.model import layers
from hpc_llm.model.gpt import GPT
from hpc_llm.optim import AdamW

from common import PRESETS, vm_hwm


def matmul_plan(cfg: ModelConfig, B: int):
    """(a, b) operand pairs of every matmul in one training step, in the model's layouts (transposed views where the
    model uses them), with the attention's query blocks."""
    T, C, H, V = cfg.block_size, cfg.n_embd, cfg.n_head, cfg.padded_vocab
    hd, N = C // H, B * T
    rng = np.random.default_rng(0)
    arr = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    plan = []
    for _ in range(cfg.n_layer):
        for i, o in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)):
            x, w, d = arr(N, i), arr(i, o), arr(N, o)
            plan += [(x, w), (x.T, d), (d, w.T)]  # forward, weight gradient, input gradient
        q, k, v, dy = arr(B, H, T, hd), arr(B, H, T, hd), arr(B, H, T, hd), arr(B, H, T, hd)
        for q0, q1 in SA.query_blocks(T):
            att = arr(B, H, q1 - q0, q1)
            kt = k[:, :, :q1].transpose(0, 1, 3, 2)
            plan += [
                (q[:, :, q0:q1], kt),
                (att, v[:, :, :q1]),  # forward
                (att.transpose(0, 1, 3, 2), dy[:, :, q0:q1]),
                (dy[:, :, q0:q1], v[:, :, :q1].transpose(0, 1, 3, 2)),
                (att, k[:, :, :q1]),
                (att.transpose(0, 1, 3, 2), q[:, :, q0:q1]),
            ]  # backward
    xf, wte, dl = arr(N, C), arr(V, C), arr(N, V)
    plan += [(xf, wte.T), (dl.T, xf), (dl, wte)]  # tied head: logits, wte gradient, input gradient
    return plan


def run_plan(plan) -> None:
    """Each product is dropped at once, so its memory is reused warm: the matmuls' own time, nothing else (on the
    model's own path: kernels/gemm.matmul, OpenBLAS or oneDNN's sgemm with the shared pool on)."""
    for a, b in plan:
        gemm.matmul(a, b)


def plan_flops(plan) -> float:
    return sum(2.0 * np.prod(a.shape[:-1]) * a.shape[-1] * b.shape[-1] for a, b in plan)


def activation_bytes(cfg: ModelConfig, B: int) -> int:
    """What the forward keeps for backward (see GPT.forward's cache), in float32."""
    T, C, H = cfg.block_size, cfg.n_embd, cfg.n_head
    N = B * T
    att = B * H * sum((q1 - q0) * q1 for q0, q1 in SA.query_blocks(T))
    per_layer = (
        N * C  # ln_1 normalised input
        + N * C  # ln_1 output (c_attn input)
        + 3 * N * C  # head-split q, k, v
        + att  # attention probabilities, query blocks
        + N * C  # attention output (c_proj input)
        + N * C
        + N * C  # ln_2 normalised input and output (c_fc input)
        + 3 * 4 * N * C  # c_fc output (GELU input), GELU's tanh, GELU output (c_proj input)
    )
    final = N * C + N * C + N * cfg.padded_vocab  # ln_f normalised input and output, probabilities
    return 4 * (cfg.n_layer * per_layer + final)


def build(p: dict, precision: str = "fp32"):
    cfg = ModelConfig(
        n_layer=p["n_layer"],
        n_head=p["n_head"],
        n_embd=p["n_embd"],
        block_size=p["block_size"],
        vocab_size=p["vocab_size"],
    )
    model = GPT(cfg, seed=0, precision=precision)
    opt = AdamW(model.flat, model.grad_flat, model.decay_ranges(), TrainConfig())
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (p["batch"], cfg.block_size))
    y = rng.integers(0, cfg.vocab_size, (p["batch"], cfg.block_size))

    def step():
        model.forward(x, y, keep_cache=True)
        model.backward()
        opt.step(1e-4)
        model.refresh_compute()

    return cfg, model, opt, step


def measure_rss(name: str) -> dict:
    """Peak RSS of two training steps of a preset, in a fresh process."""
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", name] + sys.argv[1:],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_child(name: str) -> None:
    p = PRESETS[name]
    cfg, model, opt, step = build(p)
    for _ in range(2):
        step()
    peak = vm_hwm()
    print(
        json.dumps(
            {
                "peak_rss": peak,
                "params": model.num_params,
                "activations": activation_bytes(cfg, p["batch"]),
            }
        )
    )


def bench(name: str, steps: int, peak: float) -> dict:
    p = PRESETS[name]
    cfg, model, opt, step = build(p)
    tokens = p["batch"] * cfg.block_size
    t_step = median_time(step, steps, warmup=2)
    plan = matmul_plan(cfg, p["batch"])
    t_mm = median_time(lambda: run_plan(plan), steps, warmup=2)
    t_fwd = median_time(lambda: model.forward(*_xy(cfg, p["batch"])), steps, warmup=2)
    t_opt = median_time(lambda: opt.step(1e-4), steps, warmup=2)
    flops = model.flops_per_token() * tokens
    return {
        "preset": name,
        "tokens_per_s": tokens / t_step,
        "step_ms": 1e3 * t_step,
        "matmul_ms": 1e3 * t_mm,
        "step_over_matmul": t_step / t_mm,
        "mfu": flops / t_step / peak,
        "forward_ms": 1e3 * t_fwd,
        "adamw_ms": 1e3 * t_opt,
        "flops_per_step": flops,
        "plan_flops": plan_flops(plan),
    }


KERNEL_CHOICES = ("auto", "numba")  # --ab auto: HPC_LLM_KERNELS=auto against numpy


def ab_compare(name: str, what: str, steps: int, precision: str = "fp32") -> dict:
    """The training step with a change on (A) and off (B), alternated step by step in this one process so both see
    the same machine; medians of each and their ratio."""
    p = PRESETS[name]
    cfg, model, opt, step = build(p, precision)
    if what == "malloc":
        on, off = (lambda: keep_freed_memory(True)), (lambda: keep_freed_memory(False))
    elif what in KERNEL_CHOICES:  # compiled kernels (this choice) against the NumPy twins
        on, off = (
            (lambda: os.environ.__setitem__("HPC_LLM_KERNELS", what)),
            (lambda: os.environ.__setitem__("HPC_LLM_KERNELS", "numpy")),
        )
    else:  # attention query blocks vs one dense causal block
        on, off = (
            (lambda: setattr(layers, "ATTN_BLOCK", 128)),
            (lambda: setattr(layers, "ATTN_BLOCK", 1 << 30)),
        )
    times = {"on": [], "off": []}
    for i in range(steps + 1):
        for key, setup in (("on", on), ("off", off)):
            setup()
            step()  # one untimed step after each switch: the change takes effect on fresh allocations
            t0 = time.perf_counter()
            step()
            if i > 0:
                times[key].append(time.perf_counter() - t0)
    on_s, off_s = float(np.median(times["on"])), float(np.median(times["off"]))
    keep_freed_memory(True)
    SA.ATTN_BLOCK = 128
    os.environ.pop("HPC_LLM_KERNELS", None)
    return {
        "preset": name,
        "change": what,
        "on_ms": 1e3 * on_s,
        "off_ms": 1e3 * off_s,
        "speedup": off_s / on_s,
    }


def _xy(cfg, B):
    rng = np.random.default_rng(1)
    return rng.integers(0, cfg.vocab_size, (B, cfg.block_size)), rng.integers(
        0, cfg.vocab_size, (B, cfg.block_size)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--preset", action="append", choices=sorted(PRESETS), help="repeatable; default: all"
    )
    ap.add_argument("--steps", type=int, default=10, help="timed repetitions (median)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (for comparison)",
    )
    ap.add_argument(
        "--attn-block",
        type=int,
        help="attention query-block rows (default: the model's; a value >= T "
        "gives the dense causal attention, for comparison)",
    )
    ap.add_argument(
        "--ab",
        choices=("malloc", "attn-blocks", *KERNEL_CHOICES),
        help="A/B one optimisation, alternating step by step",
    )
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="with --ab: the step's format",
    )
    args = ap.parse_args()
    if args.attn_block:
        SA.ATTN_BLOCK = args.attn_block
    if not args.default_malloc:
        keep_freed_memory()
    if args.rss_child:
        return rss_child(args.rss_child)
    if args.ab:
        for name in args.preset or list(PRESETS):
            r = ab_compare(name, args.ab, args.steps, args.precision)
            print(
                f"{name}: {args.ab} on {r['on_ms']:.1f} ms/step, off {r['off_ms']:.1f} ms/step -> "
                f"{r['speedup']:.2f}x (medians of {args.steps}, alternated in one process)"
            )
        return
    peak = matmul_peak_flops(np, np.float32)
    print(f"float32 matmul peak (2048^3, best of 3): {peak / 1e9:.1f} GFLOP/s")
    for name in args.preset or list(PRESETS):
        r = bench(name, args.steps, peak)
        print(
            f"{name}: {r['tokens_per_s']:.0f} tokens/s, step {r['step_ms']:.1f} ms (forward {r['forward_ms']:.1f}, "
            f"AdamW {r['adamw_ms']:.1f}), matmuls alone {r['matmul_ms']:.1f} ms -> step/matmul "
            f"{r['step_over_matmul']:.2f}x, MFU {100 * r['mfu']:.1f}% of the measured peak"
        )
        if not args.no_rss:
            m = measure_rss(name)
            budget = 16 * m["params"] + m["activations"]
            print(
                f"{name}: peak RSS {m['peak_rss'] / 2**20:.0f} MiB vs budget {budget / 2**20:.0f} MiB "
                f"(16 B x {m['params'] / 1e6:.1f}M params = {16 * m['params'] / 2**20:.0f} MiB + activations "
                f"{m['activations'] / 2**20:.0f} MiB) -> {m['peak_rss'] / budget:.2f}x"
            )


if __name__ == "__main__":
    main()
