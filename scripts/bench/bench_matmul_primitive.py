"""oneDNN's matmul primitive (kernels/onednn_matmul.py) against its GEMM API (kernels/gemm.py's per-matrix calls of
dnnl_gemm_bf16bf16f32 and dnnl_sgemm) on a model's products, GFLOP/s at 1 and 2 threads, alternated A B A B; each
thread count in its own process (OpenMP reads its count at load).

    python scripts/bench/bench_matmul_primitive.py --model mid

bf16: operands held as bfloat16 (the model's), float32 output; fp32: float32 operands. Layouts as the model's:
"nn" a @ b, "nt" a @ b^T, "tn" a^T @ b (transposes as strided views); "+=" accumulates into the output."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_gemm import MODELS, model_shapes, operands, own_kernel_env  # noqa: E402


def measure(shapes, repeats: int) -> list[dict]:
    from hpc_llm.bench.timer import median_time
    from hpc_llm.kernels import gemm

    prims = gemm.onednn_primitives()
    assert prims is not None and gemm.onednn_gemm() is not None, "oneDNN is not available here"
    rng = np.random.default_rng(0)
    rows = []
    for name, batch, M, K, N, layout in shapes:
        a, b = operands(batch, M, K, N, layout, rng)
        a16, b16 = (x.astype(gemm.low_dtype("bf16"), order="K") for x in (a, b))
        u16 = (a16.view(np.uint16), b16.view(np.uint16))
        out = np.zeros(batch + (M, N), dtype=np.float32)
        flops = 2 * M * K * N * int(np.prod(batch))
        for acc in (False, True) if layout == "tn" else (False,):
            api16 = (gemm.onednn_gemm(), "bf16", gemm._bf16_operand, *u16, out, acc)
            api32 = (gemm.onednn_sgemm(), "sgemm", gemm._f32_operand, a, b, out, acc)
            fns = {
                "bf16_gemm": lambda: gemm._gemm_products(*api16),
                "bf16_prim": lambda: prims.run(*u16, out, acc),
                "fp32_sgemm": lambda: gemm._gemm_products(*api32),
                "fp32_prim": lambda: prims.run(a, b, out, acc),
            }
            assert fns["bf16_prim"]() and fns["fp32_prim"](), f"{name}: the primitive refused"
            times = {k: [] for k in fns}
            for _ in range(2):  # A B A B
                for k, fn in fns.items():
                    times[k].append(median_time(fn, repeats))
            row = {
                "shape": name + (" +=" if acc else ""),
                "batch": list(batch),
                "M": M,
                "K": K,
                "N": N,
            }
            for k, v in times.items():
                row[k] = round(flops / float(np.median(v)) / 1e9, 1)
            row["bf16_x"] = round(row["bf16_prim"] / row["bf16_gemm"], 2)
            row["fp32_x"] = round(row["fp32_prim"] / row["fp32_sgemm"], 2)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="mid")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--extra",
        default="768x128x384,256x128x64:tn:8.6",
        help="more products MxKxN[:layout[:batch axes, dot-separated]], comma-separated",
    )
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    shapes = model_shapes(a.model)
    for spec in filter(None, a.extra.split(",")):
        size, layout, batch = (spec.split(":") + ["nn", ""])[:3]
        M, K, N = (int(v) for v in size.split("x"))
        shapes.append((spec, tuple(int(v) for v in batch.split(".") if v), M, K, N, layout))
    if a.child is not None:
        print(json.dumps(measure(shapes, a.repeats)))
        return
    for n in a.threads:
        argv = [sys.executable, __file__, "--child", str(n), "--repeats", str(a.repeats)]
        argv += ["--model", a.model, "--extra", a.extra]
        out = subprocess.run(argv, env=own_kernel_env(n), check=True, capture_output=True).stdout
        for row in json.loads(out):
            print(json.dumps({"threads": n, **row}))


if __name__ == "__main__":
    main()
