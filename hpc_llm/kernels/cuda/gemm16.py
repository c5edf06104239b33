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
    """Whether w is a 2-byte stored weight (the device's compute copy), which matmul16 multiplies."""
    dtype = getattr(w, "dtype", None)
    return dtype is not None and dtype.itemsize == 2


def matmul16(a, w, prec):
    """a (M, K), float32 holding values of prec's format, @ w (K, N) stored in 2 bytes (C- or, as w.T of a stored
    weight, F-contiguous) -> (M, N) float32: one narrowing launch for a and one GEMM."""
    xp = array_module(w)
    assert a.ndim == 2 == w.ndim and a.shape[1] == w.shape[0], f"matmul16: {a.shape} @ {w.shape}"
    a16 = a if a.dtype == w.dtype else device.narrow(xp, xp.ascontiguousarray(a), prec, to_low)
    if xp.__name__ != "cupy":
        # a GEMM for the planner (priced by its shape), with the bytes it reads and writes
        nbytes = a16.nbytes + w.nbytes + 4 * a.shape[0] * w.shape[1]
        with launches.record_kernel("matmul", nbytes):
            return twin(a16, w)
    return _gemm_ex(xp, a16, w, prec)


def twin(a16, w16):
    """matmul16's arithmetic on NumPy: the operands widened (exact; w's memory order kept, so BLAS sees what the
    float32 compute copy gave it) and multiplied in float32."""
    return from_low(a16, np.float32) @ from_low(w16, np.float32)


def _gemm_ex(cupy, a16, w, prec):
    """cublasGemmEx: row-major C (M, N) = A (M, K) W (K, N) as column-major C^T = W^T A^T."""
    from cupy_backends.cuda.libs import cublas

    a16 = cupy.ascontiguousarray(a16)
    M, K = a16.shape
    N = w.shape[1]
    if w.flags.c_contiguous:
        op_w, ld_w = CUBLAS_OP_N, N
    elif w.flags.f_contiguous:
        # w.T of a stored (N, K) weight: its memory is W^T, transposed once more
        op_w, ld_w = CUBLAS_OP_T, K
    else:
        w, op_w, ld_w = cupy.ascontiguousarray(w), CUBLAS_OP_N, N
    out = cupy.empty((M, N), dtype=np.float32)
    # host scalars, float32 for CUBLAS_COMPUTE_32F
    alpha, beta = np.ones(1, np.float32), np.zeros(1, np.float32)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    cublas.setPointerMode(handle, CUBLAS_POINTER_MODE_HOST)
    kind = INPUT_TYPE[prec.name]
    cublas.gemmEx(
        handle, op_w, CUBLAS_OP_N, N, M, K, alpha.ctypes.data, w.data.ptr, kind, ld_w,
        a16.data.ptr, kind, K, beta.ctypes.data, out.data.ptr, CUDA_R_32F, N,
        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT,
    )  # fmt: skip
    return out
