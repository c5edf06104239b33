"""The linear layers' GEMMs on a device whose weights' compute copy is stored in 2 bytes (GPT.compute: bfloat16 or
half): 16-bit operands, float32 accumulation and a float32 result, as tensor cores compute them. cuBLAS's GemmEx
takes both operands in one 16-bit type (CUDA_R_16BF / CUDA_R_16F) with CUBLAS_COMPUTE_32F; CuPy has no bfloat16
dtype (device.storage_dtype: uint16 bit patterns), so the call is cuBLAS's on the buffers' addresses, for both
formats alike.

The other operand (an activation or a gradient) arrives as float32 values already in the format (Precision.operand,
keep_use): it is stored in 2 bytes first (device.narrow, exact, one launch). The twin, which the launch-counting
stand-in runs and the gpu tests compare against: both operands widened to float32 (exact) and multiplied in float32,
the same products of the same values as the float32 compute copy's GEMM, bit for bit; cuBLAS sums them in another
order, within gamma_K = K u / (1 - K u) (u = 2^-24) of |a| |w|."""

from __future__ import annotations

import numpy as np

from hpc_llm.backend import array_module
from hpc_llm.kernels.cuda import device, launches
from hpc_llm.kernels.rounding import from_low, to_low

# cuBLAS's enum values (library_types.h: cudaDataType; cublas_api.h: cublasComputeType_t, cublasGemmAlgo_t)
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_POINTER_MODE_HOST = 0
INPUT_TYPE = {"bf16": CUDA_R_16BF, "fp16": CUDA_R_16F}


def stored_16_bit(w) -> bool:
    """Whether w is a device array (CuPy's, or the counting stand-in's) held in 2 bytes (the device's compute copy,
    a kept activation), which matmul16 multiplies; a NumPy bfloat16 array is the CPU's (kernels/gemm.py: oneDNN)."""
    dtype = getattr(w, "dtype", None)
    return type(w) is not np.ndarray and dtype is not None and dtype.itemsize == 2


def matmul16(a, b, prec, out=None, accumulate: bool = False):
    """a (M, K) @ b (K, N), one of them held in 2 bytes, the other float32 holding values of prec's format (stored
    in 2 bytes first: one narrowing launch), each C- or F-contiguous (a transpose view) -> (M, N) float32: a new
    array, or into out (C-contiguous float32), added to it when accumulate. One GEMM."""
    xp = array_module(b if stored_16_bit(b) else a)
    assert a.ndim == 2 == b.ndim and a.shape[1] == b.shape[0], f"matmul16: {a.shape} @ {b.shape}"
    low = b.dtype if stored_16_bit(b) else a.dtype
    a16, b16 = (
        x if x.dtype == low else device.narrow(xp, xp.ascontiguousarray(x), prec, to_low)
        for x in (a, b)
    )
    if xp.__name__ != "cupy":
        # a GEMM for the planner (priced by its shape), with the bytes it reads and writes
        nbytes = a16.nbytes + b16.nbytes + 4 * a.shape[0] * b.shape[1] * (2 if accumulate else 1)
        with launches.record_kernel("matmul", nbytes):
            return twin(a16, b16, out, accumulate)
    return _gemm_ex(xp, a16, b16, prec, out, accumulate)


def twin(a16, b16, out=None, accumulate: bool = False):
    """matmul16's arithmetic on NumPy: the operands widened (exact; their memory order kept, so BLAS sees what the
    float32 operands gave it) and multiplied in float32, as kernels/gemm.matmul writes or adds the product."""
    a, b = from_low(a16, np.float32), from_low(b16, np.float32)
    if out is None:
        return a @ b
    if accumulate:
        out += a @ b
    else:
        np.matmul(a, b, out=out)
    return out


def _layout(cupy, x):
    """(x or a C-contiguous copy, cuBLAS's op and leading dimension for x^T in column-major terms): a C-contiguous
    row-major x is its transpose in column-major memory (op N), an F-contiguous one is x itself (op T)."""
    if x.flags.c_contiguous:
        return x, CUBLAS_OP_N, x.shape[1]
    if x.flags.f_contiguous:
        return x, CUBLAS_OP_T, x.shape[0]
    return cupy.ascontiguousarray(x), CUBLAS_OP_N, x.shape[1]


def _gemm_ex(cupy, a16, b16, prec, out, accumulate: bool):
    """cublasGemmEx: row-major C (M, N) = A (M, K) B (K, N) as column-major C^T = B^T A^T."""
    from cupy_backends.cuda.libs import cublas

    M, K = a16.shape
    N = b16.shape[1]
    b16, op_b, ld_b = _layout(cupy, b16)
    a16, op_a, ld_a = _layout(cupy, a16)
    if out is None:
        out, accumulate = cupy.empty((M, N), dtype=np.float32), False
    assert out.flags.c_contiguous and out.dtype == np.float32 and out.shape == (M, N)
    # host scalars, float32 for CUBLAS_COMPUTE_32F
    alpha, beta = np.ones(1, np.float32), np.full(1, 1.0 if accumulate else 0.0, np.float32)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    cublas.setPointerMode(handle, CUBLAS_POINTER_MODE_HOST)
    kind = INPUT_TYPE[prec.name]
    cublas.gemmEx(
        handle, op_b, op_a, N, M, K, alpha.ctypes.data, b16.data.ptr, kind, ld_b,
        a16.data.ptr, kind, ld_a, beta.ctypes.data, out.data.ptr, CUDA_R_32F, N,
        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT,
    )  # fmt: skip
    return out
