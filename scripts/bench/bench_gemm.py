"""The model's matmuls in float32 on NumPy's BLAS against bf16 on oneDNN (kernels/gemm.py), GFLOP/s per shape at
1 and 2 threads, alternated: each thread count in its own process (OpenBLAS and OpenMP read their thread counts at
load), with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset so OpenBLAS runs the CPU's own kernel.

    python scripts/bench/bench_gemm.py --model mid          # 6 layers, 384 wide, T 256, batch 8
    python scripts/bench/bench_gemm.py --sweep              # square products: kernels/gemm.MIN_MACS's cut-over

The bf16 side includes what the model pays per call: the operands' bf16 copies and the per-matrix calls of a batched
product; "bf16in" is the same product with its operands held as bfloat16 already (no copies). Threads:
OPENBLAS_NUM_THREADS and OMP_NUM_THREADS are both set to the count; OMP_WAIT_POLICY passes through
(`OMP_WAIT_POLICY=passive python ...`: GNU OpenMP's threads sleep after a call, not spin) and is printed."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

# (layers, width, heads, sequence, batch, vocabulary): docs/performance.md's reference shapes
MODELS = {
    "small": (4, 128, 4, 64, 12, 65),
    "mid": (6, 384, 6, 256, 8, 65),
    "gpt2": (12, 768, 12, 1024, 1, 50304),
}


def model_shapes(model: str) -> list[tuple[str, tuple, int, int, int, str]]:
    """(name, batch axes, M, K, N, layout) of one block's and the head's products: layout "nn" a @ b, "nt" a @ b^T
    (the input gradient), "tn" a^T @ b (the weight gradient); the attention's per query block of 128."""
    _, C, H, T, B, V = MODELS[model]
    M, hd, q = B * T, C // H, min(T, 128)
    shapes = []
    for name, n in (("qkv", 3 * C), ("proj", C), ("fc", 4 * C), ("fc_proj", C)):
        k = 4 * C if name == "fc_proj" else C
        shapes += [(f"{name} fwd", (), M, k, n, "nn"), (f"{name} dx", (), M, n, k, "nt")]
        shapes.append((f"{name} dw", (), k, M, n, "tn"))
    shapes += [("att qk^T", (B, H), q, hd, T, "nt"), ("att pv", (B, H), q, T, hd, "nn")]
    shapes += [("head fwd", (), M, C, V, "nt"), ("head dw", (), V, M, C, "tn")]
    return shapes


def operands(batch, M, K, N, layout, rng):
    """Float32 operands of the layout, their values already bf16 (as the model's are)."""
    import ml_dtypes

    def bf(*shape):
        x = rng.standard_normal(batch + shape).astype(ml_dtypes.bfloat16)
        return x.astype(np.float32)

    a = bf(K, M).swapaxes(-1, -2) if layout[0] == "t" else bf(M, K)
    b = bf(N, K).swapaxes(-1, -2) if layout[1] == "t" else bf(K, N)
    return a, b


def measure(shapes, repeats: int) -> list[dict]:
    from hpc_llm.bench.timer import median_time
    from hpc_llm.kernels import gemm

    assert gemm.onednn_gemm() is not None, "oneDNN's bf16 GEMM is not available here"
    rng = np.random.default_rng(0)
    rows = []
    for name, batch, M, K, N, layout in shapes:
        a, b = operands(batch, M, K, N, layout, rng)
        out = np.empty(batch + (M, N), dtype=np.float32)
        flops = 2 * M * K * N * int(np.prod(batch))
        # the same operands held as bfloat16 (the model's kept activations, Precision.gemm_operand): no copies
        a16, b16 = (x.astype(gemm.low_dtype("bf16"), order="K") for x in (a, b))
        times = {"fp32": [], "bf16": [], "bf16in": []}
        for _ in range(2):  # A B A B
            times["fp32"].append(median_time(lambda: np.matmul(a, b, out=out), repeats))
            times["bf16"].append(median_time(lambda: gemm.bf16_matmul(a, b, out), repeats))
            times["bf16in"].append(median_time(lambda: gemm.bf16_matmul(a16, b16, out), repeats))
        row = {"shape": name, "batch": list(batch), "M": M, "K": K, "N": N}
        for k, v in times.items():
            row[f"{k}_gflops"] = round(flops / float(np.median(v)) / 1e9, 1)
        row["bf16_over_fp32"] = round(row["bf16_gflops"] / row["fp32_gflops"], 2)
        row["bf16in_over_fp32"] = round(row["bf16in_gflops"] / row["fp32_gflops"], 2)
        rows.append(row)
    return rows


def sweep_shapes() -> list:
    return [(f"{n}^3", (), n, n, n, "nn") for n in (48, 64, 96, 128, 160, 192, 256, 384)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="mid")
    ap.add_argument("--sweep", action="store_true", help="square products instead of a model's")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    shapes = sweep_shapes() if a.sweep else model_shapes(a.model)
    if a.child is not None:
        print(json.dumps(measure(shapes, a.repeats)))
        return
    for n in a.threads:
        env = own_kernel_env(n)
        argv = [sys.executable, __file__, "--child", str(n), "--repeats", str(a.repeats)]
        argv += ["--sweep"] if a.sweep else ["--model", a.model]
        rows = json.loads(subprocess.run(argv, env=env, check=True, capture_output=True).stdout)
        for row in rows:
            policy = os.environ.get("OMP_WAIT_POLICY", "default")
            print(json.dumps({"threads": n, "omp_wait_policy": policy, **row}))


def own_kernel_env(threads: int) -> dict:
    """This environment for a child process on `threads` threads (OpenBLAS and OpenMP), with OPENBLAS_CORETYPE and
    OPENBLAS_L2_SIZE unset so OpenBLAS runs the CPU's own kernel."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    }
    env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    return env


if __name__ == "__main__":
    main()
