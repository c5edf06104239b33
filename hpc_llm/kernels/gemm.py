"""The model's matmuls on the host: bf16 products on the CPU's bf16 instructions through oneDNN, else NumPy's BLAS.

With train.precision = bf16 every matmul operand is already rounded to bfloat16 (model/precision.py) and the
products are accumulated in float32. NumPy's BLAS has no bf16 GEMM, so today's path multiplies the rounded values
held in float32 at the float32 rate. oneDNN (the CPU kernel library PyTorch's own bf16 matmuls run on) has
`dnnl_gemm_bf16bf16f32`: bf16 inputs, float32 accumulation and output, on AVX512_BF16 / AMX at about twice the
float32 rate. The arithmetic is the same (exact products of bf16 values, float32 sums); only the order of the sums
inside a GEMM differs, so each entry stays within gamma_K = K u / (1 - K u) (u = 2^-24) of |a| |b| of the exact
product, as the float32 GEMM's does (tests/kernels/test_gemm.py).

`matmul(a, b, out, accumulate, prec)` takes oneDNN when all of these hold: prec is bf16, both operands and out are
float32 NumPy arrays, HPC_LLM_KERNELS is not "numpy", the library loads (HPC_LLM_DNNL_LIB, else the environment's
lib/libdnnl.so.3 from the onednn-cpu-gomp wheel, else the system's libdnnl), the CPU reports avx512_bf16 or amx_bf16,
and the product has at least MIN_MACS multiply-adds per matrix and MIN_SIDE rows and columns. Otherwise NumPy's
matmul, as before.

oneDNN takes its threads from OpenMP (OMP_NUM_THREADS); NumPy's OpenBLAS from OPENBLAS_NUM_THREADS.

float32 products: with the shared thread pool on (kernels/pool.py: several OpenMP threads, HPC_LLM_POOL), those of
POOL_MIN_MACS or more per matrix run on oneDNN's `dnnl_sgemm` (`sgemm_matmul`), whose threads are the pool's; the
summation order inside a GEMM differs from OpenBLAS's, each entry within gamma_K of |a| |b| as any float32 GEMM's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import numpy as np

from hpc_llm.backend import array_module, low_dtype
from hpc_llm.kernels.blas import cpu_flags, set_openblas_threads
from hpc_llm.kernels.cuda import gemm16
from hpc_llm.kernels.dispatch import kernels_choice, numba_available
from hpc_llm.kernels.pool import pool_threads
from hpc_llm.kernels.rounding import _to_bf16, to_low

# a product of fewer multiply-adds per matrix than this stays on BLAS: below it the per-call overhead (the ctypes
# call, the operands' bf16 copies) outweighs the faster arithmetic (measured: scripts/bench/bench_gemm.py)
MIN_MACS = 1 << 22
# ... nor one with fewer rows or columns than this (decoding's few rows): the bf16 copies of the operands, (M + N) K
# elements, would cost more than the M N K products save
MIN_SIDE = 64
# with the shared pool on, a float32 product of fewer multiply-adds per matrix than this stays on OpenBLAS's one
# thread: shakespeare-char's per-head products (2^17-2^18, 48 a step) ran at 69-88 GFLOP/s as oneDNN calls against
# 123-235 on OpenBLAS's batched loop; 6x384's (2^21) at 278-336 against 252-297 (scripts/bench/bench_pool.py)
POOL_MIN_MACS = 1 << 20
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_state: dict = {}


def _load_gemm(name: str = "dnnl_gemm_bf16bf16f32"):
    """oneDNN's GEMM `name` (dnnl_gemm_bf16bf16f32, dnnl_sgemm: the same arguments) from the first oneDNN library
    that loads, or None."""
    paths = [os.environ.get("HPC_LLM_DNNL_LIB"), os.path.join(sys.prefix, "lib", "libdnnl.so.3")]
    paths.append(ctypes.util.find_library("dnnl"))
    for path in paths:
        if not path:
            continue
        try:
            fn = getattr(ctypes.CDLL(path), name)
        except (OSError, AttributeError):
            continue
        i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
        fn.argtypes = [ctypes.c_char, ctypes.c_char, i64, i64, i64, f32, ptr, i64, ptr, i64]
        fn.argtypes += [f32, ptr, i64]
        return fn
    return None


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU's flags include a bf16 dot-product instruction set."""
    return any(f in cpu_flags(cpuinfo) for f in BF16_FLAGS)


def onednn_gemm():
    """The oneDNN bf16 GEMM when the library loads and the CPU has the instructions, else None (cached)."""
    if "gemm" not in _state:
        _state["gemm"] = _load_gemm() if cpu_has_bf16() else None
        if _state["gemm"] is not None:
            # oneDNN's OpenMP pool runs the large products from now on; OpenBLAS (the small ones) keeps one thread,
            # so two pools never spin-wait against each other on the same cores (measured at 2 threads each: the
            # products that alternate between them fell to 2-30% of either alone)
            set_openblas_threads(1)
    return _state["gemm"]


def uses_onednn(a, b, prec) -> bool:
    """Whether matmul(a, b, ..., prec) runs on oneDNN's bf16 GEMM (the conditions in the module's docstring)."""
    if prec.name != "bf16" or not (type(a) is np.ndarray and type(b) is np.ndarray):
        return False
    if a.dtype != np.float32 or b.dtype != np.float32 or a.ndim < 2 or b.ndim < 2:
        return False
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    if min(M, N) < MIN_SIDE or M * K * N < MIN_MACS or kernels_choice() == "numpy":
        return False
    return onednn_gemm() is not None


def matmul(a, b, out=None, accumulate: bool = False, prec=None):
    """out = a @ b, or out += a @ b (accumulate); a new array when out is None. Returns out. An operand held in 2
    bytes (a device's: GPT.compute, a kept input): kernels/cuda/gemm16.py."""
    if gemm16.stored_16_bit(a) or gemm16.stored_16_bit(b):
        return gemm16.matmul16(a, b, prec, out, accumulate)
    if prec is not None and uses_onednn(a, b, prec):
        return bf16_matmul(a, b, out, accumulate)
    if (out is None or out.dtype == np.float32) and uses_sgemm(a, b):
        return sgemm_matmul(a, b, out, accumulate)
    if out is None:
        return a @ b
    if accumulate:
        out += a @ b
    else:
        array_module(out).matmul(a, b, out=out)
    return out


def _bf16_operand(x):
    """x (..., R, C), float32 values already bf16 (or rounded to it here), as bf16 bit patterns in a layout
    oneDNN reads: (bits, trans) with bits (..., R, C) row-major (trans "N") or (..., C, R) row-major of x's
    transpose (trans "T", no copy of the transposition)."""
    item = x.itemsize
    if x.strides[-2] == item and x.strides[-1] != item and x.shape[-1] > 1:
        return _bits(np.swapaxes(x, -1, -2)), b"T"
    return _bits(x), b"N"


def _bits(x):
    """x's bf16 values (round to nearest even: exact on values already bf16) as a C-contiguous uint16 array; the
    compiled conversion whenever numba is there (a bf16 run has loaded it already), on arrays of any size."""
    if not numba_available():
        return np.ascontiguousarray(to_low(x, low_dtype("bf16"))).view(np.uint16)
    x = np.ascontiguousarray(x)
    out = np.empty(x.shape, dtype=np.uint16)
    _to_bf16(x.reshape(-1).view(np.uint32), out.reshape(-1))
    return out


def bf16_matmul(a, b, out=None, accumulate: bool = False):
    """out (=|+=) a @ b on oneDNN's bf16 GEMM with float32 accumulation; a (..., M, K), b (..., K, N), leading axes
    broadcast, a product per matrix. out (float32) may be a view whose rows are strided; any other layout is
    computed into a new array first."""
    gemm = onednn_gemm()
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    assert b.shape[-2] == K, f"matmul: {a.shape} @ {b.shape}"
    lead = () if a.ndim == b.ndim == 2 else np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    (abits, ta), (bbits, tb) = _bf16_operand(a), _bf16_operand(b)
    if out is None:
        out, accumulate = np.empty(lead + (M, N), dtype=np.float32), False
    target = out
    if out.strides[-1] != 4 or out.strides[-2] < 4 * N or out.shape != lead + (M, N):
        target = np.empty(lead + (M, N), dtype=np.float32)
        if accumulate:
            target[...] = out
    beta = 1.0 if accumulate else 0.0
    lda, ldb, ldc = abits.shape[-1], bbits.shape[-1], target.strides[-2] // 4
    pa, pb, pc = (_address(x) for x in (abits, bbits, target))
    for oa, ob, oc in zip(*(_offsets(x, lead) for x in (abits, bbits, target))):
        status = gemm(ta, tb, M, N, K, 1.0, pa + oa, lda, pb + ob, ldb, beta, pc + oc, ldc)
        if status != 0:
            raise RuntimeError(f"dnnl_gemm_bf16bf16f32 returned status {status}")
    if target is not out:
        out[...] = target
    return out


def _address(x) -> int:
    return x.__array_interface__["data"][0]


def _offsets(x, lead: tuple) -> list[int]:
    """The byte offset of each of x's matrices in C order over the broadcast leading axes `lead`."""
    dims = (1,) * (len(lead) - x.ndim + 2) + x.shape[:-2]
    strides = (0,) * (len(lead) - x.ndim + 2) + x.strides[:-2]
    offsets = [0]
    for n, d, s in zip(lead, dims, strides):
        step = 0 if d == 1 else s
        offsets = [o + i * step for o in offsets for i in range(n)]
    return offsets


def onednn_sgemm():
    """oneDNN's float32 GEMM (dnnl_sgemm) when the library loads, else None (cached)."""
    if "sgemm" not in _state:
        _state["sgemm"] = _load_gemm("dnnl_sgemm")
    return _state["sgemm"]


def uses_sgemm(a, b) -> bool:
    """Whether matmul(a, b) in float32 runs on oneDNN's sgemm: the shared pool is on (kernels/pool.py), a and b
    are NumPy float32 and each matrix's product has at least POOL_MIN_MACS multiply-adds."""
    if not (type(a) is np.ndarray and type(b) is np.ndarray) or a.ndim < 2 or b.ndim < 2:
        return False
    if a.dtype != np.float32 or b.dtype != np.float32:
        return False
    return a.shape[-2] * a.shape[-1] * b.shape[-1] >= POOL_MIN_MACS and pool_threads() > 0


def _f32_operand(x):
    """(x or a contiguous copy, trans, ld): x (..., R, C) float32 as oneDNN reads it, row-major ("N": rows ld
    apart) or the row-major transpose ("T": x's columns ld apart), without a copy where its strides allow."""
    R, C = x.shape[-2], x.shape[-1]
    s0, s1 = x.strides[-2], x.strides[-1]
    if R > 1 and C > 1 and s0 % 4 == 0 and s1 % 4 == 0:
        if s1 == 4 and s0 >= 4 * C:
            return x, b"N", s0 // 4
        if s0 == 4 and s1 >= 4 * R:
            return x, b"T", s1 // 4
    x = np.ascontiguousarray(x)
    return x, b"N", max(1, C)


def sgemm_matmul(a, b, out=None, accumulate: bool = False):
    """out (=|+=) a @ b on oneDNN's float32 GEMM; a (..., M, K), b (..., K, N) float32, leading axes broadcast, a
    call per matrix. out (float32) may be a view whose rows are strided; any other layout is computed into a new
    array first."""
    gemm = onednn_sgemm()
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    assert b.shape[-2] == K, f"matmul: {a.shape} @ {b.shape}"
    lead = () if a.ndim == b.ndim == 2 else np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    (a, ta, lda), (b, tb, ldb) = _f32_operand(a), _f32_operand(b)
    if out is None:
        out, accumulate = np.empty(lead + (M, N), dtype=np.float32), False
    target = out
    if out.strides[-1] != 4 or out.strides[-2] < 4 * N or out.shape != lead + (M, N):
        target = np.empty(lead + (M, N), dtype=np.float32)
        if accumulate:
            target[...] = out
    beta, ldc = (1.0 if accumulate else 0.0), target.strides[-2] // 4
    pa, pb, pc = (_address(x) for x in (a, b, target))
    for oa, ob, oc in zip(*(_offsets(x, lead) for x in (a, b, target))):
        status = gemm(ta, tb, M, N, K, 1.0, pa + oa, lda, pb + ob, ldb, beta, pc + oc, ldc)
        if status != 0:
            raise RuntimeError(f"dnnl_sgemm returned status {status}")
    if target is not out:
        out[...] = target
    return out
