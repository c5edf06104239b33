"""One thread pool or two: float32 GEMMs on OpenBLAS against oneDNN's sgemm (GNU OpenMP), per model shape, and a
GEMM + LayerNorm chain with the LayerNorm serial (OpenBLAS's threads spin meanwhile) against a numba `prange`
LayerNorm on numba's omp layer (the same libgomp pool as oneDNN's).

    python scripts/bench/bench_pool.py --model small --threads 1 2

Each thread count in its own process (OpenBLAS, OpenMP and numba read their counts at load); OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE are unset for the child so OpenBLAS runs the CPU's own kernel. Medians of --repeats, A B A B."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from bench_gemm import MODELS, model_shapes, own_kernel_env

from hpc_llm.bench.timer import median_time


def ln_kernels():
    """(serial, parallel) LayerNorm forward, each called as ln(x, w, b, out): the model's own kernel
    (kernels/layernorm.py), compiled as it is and as its parallel variant (rows split over the pool's threads)."""
    from hpc_llm.kernels.layernorm import _layernorm_forward

    def with_cache(fn):
        cache = {}  # by shape: the xhat and rstd the kernel writes too

        def ln(x, w, b, out):
            if x.shape not in cache:
                cache[x.shape] = np.empty_like(x), np.empty((x.shape[0], 1), x.dtype)
            fn(x, w, b, True, out, *cache[x.shape])

        return ln

    return with_cache(_layernorm_forward.compile()), with_cache(
        _layernorm_forward.compile_parallel()
    )


def operands(batch, M, K, N, layout, rng):
    a = rng.standard_normal(batch + (K, M) if layout[0] == "t" else batch + (M, K), np.float32)
    b = rng.standard_normal(batch + (N, K) if layout[1] == "t" else batch + (K, N), np.float32)
    a = a.swapaxes(-1, -2) if layout[0] == "t" else a
    b = b.swapaxes(-1, -2) if layout[1] == "t" else b
    return a, b


def gemm_rows(shapes, repeats):
    from hpc_llm.kernels import blas, gemm

    nthreads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    rng = np.random.default_rng(0)
    rows = []
    for name, batch, M, K, N, layout in shapes:
        a, b = operands(batch, M, K, N, layout, rng)
        out = np.empty(batch + (M, N), np.float32)
        flops = 2 * M * K * N * int(np.prod(batch))
        t = {"openblas": [], "onednn": []}
        for _ in range(2):
            blas.set_openblas_threads(nthreads)
            t["openblas"].append(median_time(lambda: np.matmul(a, b, out=out), repeats))
            blas.set_openblas_threads(1)
            # OpenBLAS's idle threads spin for 2^28 cycles after a call: let them sleep before oneDNN's run
            time.sleep(0.3)
            t["onednn"].append(median_time(lambda: gemm.sgemm_matmul(a, b, out), repeats))
        row = {"shape": name, "M": M, "K": K, "N": N, "batch": list(batch)}
        for k, v in t.items():
            row[k] = round(flops / float(np.median(v)) / 1e9, 1)
        rows.append(row)
    return rows


def chain_rows(model, repeats, serial, parallel):
    """GEMM (M x C x 4C) -> LN over (M, 4C) -> GEMM (M x 4C x C) -> LN over (M, C), as one block's MLP does."""
    from hpc_llm.kernels import blas, gemm

    _, C, _, T, B, _ = MODELS[model]
    M, rng = B * T, np.random.default_rng(1)
    x = rng.standard_normal((M, C), np.float32)
    w1 = rng.standard_normal((C, 4 * C), np.float32)
    w2 = rng.standard_normal((4 * C, C), np.float32)
    h, h2, y, y2 = (np.empty((M, n), np.float32) for n in (4 * C, 4 * C, C, C))
    g4, b4, g1, b1 = (
        np.ones(4 * C, np.float32),
        np.zeros(4 * C, np.float32),
        np.ones(C, np.float32),
        x[0] * 0,
    )

    def chain(mm, ln):
        def run():
            for _ in range(4):
                mm(x, w1, h)
                ln(h, g4, b4, h2)
                mm(h2, w2, y)
                ln(y, g1, b1, y2)

        return run

    def np_mm(a, b, out):
        np.matmul(a, b, out=out)

    def ln_only(ln):
        def run():
            for _ in range(4):
                ln(h, g4, b4, h2)
                ln(y, g1, b1, y2)

        return run

    nthreads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    kinds = {
        "openblas+serial LN": lambda: chain(np_mm, serial),
        "onednn+prange LN": lambda: chain(gemm.sgemm_matmul, parallel),
        "openblas+prange LN": lambda: chain(np_mm, parallel),
        "serial LN alone": lambda: ln_only(serial),
        "prange LN alone": lambda: ln_only(parallel),
        "openblas GEMMs alone": lambda: chain(np_mm, lambda *a: None),
        "onednn GEMMs alone": lambda: chain(gemm.sgemm_matmul, lambda *a: None),
    }
    t = {k: [] for k in kinds}
    for _ in range(2):
        for k, make in kinds.items():
            # OpenBLAS's own pool is idle (one thread) wherever oneDNN's runs the products
            blas.set_openblas_threads(1 if k.startswith("onednn") else nthreads)
            t[k].append(median_time(make(), repeats, warmup=2))
    return {k: round(1e3 * float(np.median(v)), 2) for k, v in t.items()}


def kernel_rows(model, repeats):
    """Each pool kernel under HPC_LLM_KERNELS=auto (its parallel variant, the pool on) against its NumPy twin, on
    one block's tensors of the model, A B A B in one process."""
    from hpc_llm.kernels import bias_gelu, cross_entropy, dropout_residual, layernorm, softmax

    _, C, H, T, B, V = MODELS[model]
    rng, M, q = np.random.default_rng(2), B * T, min(T, 128)
    x = rng.standard_normal((M, C), np.float32)
    w, h = np.ones(C, np.float32), rng.standard_normal((M, 4 * C), np.float32)
    cache, th = layernorm.layernorm_forward(x, w, w)[1], np.tanh(h)
    att = rng.standard_normal((B * H, q, T), np.float32)
    p = softmax.causal_softmax_(att.copy())
    probs, local = rng.random((M, V), np.float32), rng.integers(0, V, M)
    mine, keep = local >= 0, rng.random(x.shape) >= 0.1
    calls = {
        "layernorm fwd": lambda: layernorm.layernorm_forward(x, w, w),
        "layernorm bwd": lambda: layernorm.layernorm_backward_input(x, cache, w),
        "gelu fwd": lambda: bias_gelu.gelu_forward(h),
        "gelu bwd (+ a copy)": lambda: bias_gelu.gelu_backward(h.copy(), h, th.copy()),
        "dropout+residual": lambda: dropout_residual.dropout_residual_(x.copy(), x, keep, 1.1),
        "causal softmax": lambda: softmax.causal_softmax_(att.copy()),
        "softmax bwd": lambda: softmax.softmax_backward_(att.copy(), p),
        "ce normalise": lambda: cross_entropy.normalize_rows_(probs.copy(), probs[:, 0]),
        "ce bwd": lambda: cross_entropy.cross_entropy_backward_(probs.copy(), local, mine, 0.5),
    }
    rows = {}
    for name, fn in calls.items():
        t = {"auto": [], "numpy": []}
        for _ in range(2):
            for mode in t:
                os.environ["HPC_LLM_KERNELS"] = mode
                t[mode].append(median_time(fn, repeats, warmup=2))
        rows[name] = {k: round(1e6 * float(np.median(v))) for k, v in t.items()}
    os.environ["HPC_LLM_KERNELS"] = "auto"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="small")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        serial, parallel = ln_kernels()
        res = {"chain_ms": chain_rows(a.model, a.repeats, serial, parallel)}
        res["kernels_us"] = kernel_rows(a.model, a.repeats)
        res["gemm_gflops"] = gemm_rows(model_shapes(a.model), a.repeats)
        print(json.dumps(res))
        return
    for n in a.threads:
        env = own_kernel_env(n)
        env.update(NUMBA_NUM_THREADS=str(n), NUMBA_THREADING_LAYER="omp")
        argv = [
            sys.executable,
            __file__,
            "--child",
            "--model",
            a.model,
            "--repeats",
            str(a.repeats),
        ]
        res = json.loads(subprocess.run(argv, env=env, check=True, capture_output=True).stdout)
        print(json.dumps({"model": a.model, "threads": n, **res["chain_ms"]}))
        print(json.dumps({"threads": n, "kernels: auto (pool) / numpy us": res["kernels_us"]}))
        for row in res["gemm_gflops"]:
            print(json.dumps({"threads": n, **row}))


if __name__ == "__main__":
    main()
