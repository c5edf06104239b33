"""The CPU's unfused attention (SA.attention_forward/backward) against the fused attention's NumPy twin
(kernels/attention.py) on the same inputs: forward and backward, the median of several runs each, alternated.

    OPENBLAS_NUM_THREADS=1 python scripts/bench/bench_attention.py --batch 1 --seq 1024 --heads 6 --head-dim 64

Why the CPU path keeps the unfused loop (docs/planning.md, "Fused attention on the device path")."""

from __future__ import annotations

import argparse
import json

import numpy as np

from hpc_llm.bench.timer import median_time
from hpc_llm.kernels import attention as flash
from hpc_llm.model import attention as SA
from hpc_llm.model.precision import FP32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    C = a.heads * a.head_dim
    qkv = rng.standard_normal((a.batch, a.seq, 3 * C)).astype(np.float32)
    dy = rng.standard_normal((a.batch, a.seq, C)).astype(np.float32)

    def unfused():
        _, cache = SA.attention_forward(qkv.copy(), a.heads)
        SA.attention_backward(dy.copy(), cache, a.heads)

    def twin():
        y, lse = flash.flash_forward(qkv, a.heads, FP32)
        flash.flash_backward(dy, qkv, y, lse, a.heads, FP32)

    times = {"unfused_ms": [], "twin_ms": []}
    for _ in range(2):  # A B A B
        for name, fn in (("unfused_ms", unfused), ("twin_ms", twin)):
            times[name].append(1e3 * median_time(fn, a.repeats))
    out = {k: round(float(np.median(v)), 1) for k, v in times.items()}
    out["twin_over_unfused"] = round(out["twin_ms"] / out["unfused_ms"], 2)
    print(json.dumps({**vars(a), **out}))


if __name__ == "__main__":
    main()
