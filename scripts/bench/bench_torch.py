#!/usr/bin/env python
"""Our training step against PyTorch's (eager and torch.compile) on the same cores, alternating in one run.

    python scripts/bench/bench_torch.py --torch-python PATH/TO/venv-with-torch/bin/python [--preset NAME] \
        [--precision bf16] [--rounds 5] [--steps 3]

Three worker processes hold one model each (ours: GPT + AdamW; PyTorch: the same GPT-2 architecture, nanoGPT's
layout, torch.optim.AdamW), built once; the driver asks them in turn for `--steps` timed steps, `--rounds` times, so
each sees the same machine, one at a time; medians over every timed step. bf16: ours rounds the matmul operands
and kept activations (train.precision = "bf16"), PyTorch runs under torch.autocast("cpu", bfloat16). Random
tokens, dropout 0, forward + backward + optimizer step. The torch interpreter is another environment's (CI never
has torch); ours is this one's. Never a test: record the figures in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def ours_worker(p: dict, precision: str):
    from bench_train import build

    from hpc_llm.backend import keep_freed_memory

    keep_freed_memory()
    return build(p, precision)[3]


def torch_worker(p: dict, precision: str, mode: str):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    C, H, T, V = p["n_embd"], p["n_head"], p["block_size"], -(-p["vocab_size"] // 64) * 64

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B = x.shape[0]
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
            self.blocks = nn.ModuleList(Block() for _ in range(p["n_layer"]))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, tgt):
            x = self.wte(idx) + self.wpe(torch.arange(T))
            for b in self.blocks:
                x = b(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.view(-1, V).float(), tgt.view(-1))

    torch.manual_seed(0)
    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if mode == "compile" else model
    idx = torch.randint(0, p["vocab_size"], (p["batch"], T))
    tgt = torch.randint(0, p["vocab_size"], (p["batch"], T))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = fwd(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def worker(kind: str, p: dict, precision: str) -> None:
    """Build, warm up (torch.compile compiles here), then answer each line `N` with N step times (JSON). p: the
    preset's shape (JSON from the driver: the torch environment need not have our dependencies)."""
    step = ours_worker(p, precision) if kind == "ours" else torch_worker(p, precision, kind)
    for _ in range(2):
        step()
    print("ready", flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        print(json.dumps(times), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-python", required=True, help="an interpreter with torch installed")
    ap.add_argument("--preset", action="append", help="repeatable; default: all (common.PRESETS)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per worker per round")
    ap.add_argument("--kinds", default="ours,eager,compile")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, json.loads(args.preset[0]), args.precision)
    from common import PRESETS

    for preset in args.preset or list(PRESETS):
        procs = {}
        for kind in args.kinds.split(","):
            exe = sys.executable if kind == "ours" else args.torch_python
            cmd = [
                exe,
                __file__,
                "--worker",
                kind,
                "--preset",
                json.dumps(PRESETS[preset]),
                "--precision",
                args.precision,
                "--torch-python",
                args.torch_python,
            ]
            procs[kind] = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            assert procs[kind].stdout.readline().strip() == "ready", (
                kind
            )  # one at a time: builds don't overlap
        times = {k: [] for k in procs}
        for _ in range(args.rounds):
            for kind, proc in procs.items():
                proc.stdin.write(f"{args.steps}\n")
                proc.stdin.flush()
                times[kind] += json.loads(proc.stdout.readline())
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
        med = {k: statistics.median(v) for k, v in times.items()}
        line = ", ".join(f"{k} {1e3 * t:.1f} ms" for k, t in med.items())
        ratios = ", ".join(
            f"{k}/ours {t / med['ours']:.2f}x" for k, t in med.items() if k != "ours"
        )
        n = args.rounds * args.steps
        print(
            f"{preset} {args.precision}: {line} ({ratios}; medians of {n} steps each)", flush=True
        )


if __name__ == "__main__":
    main()
