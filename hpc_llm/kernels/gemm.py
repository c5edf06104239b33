"""The model's matmuls on the host: bf16 products on the CPU's bf16 instructions through oneDNN, else NumPy's BLAS.

With train.precision = bf16 every matmul operand is already rounded to bfloat16 (model/precision.py) and the
products are accumulated in float32. NumPy's BLAS has no bf16 GEMM, so today's path multiplies the rounded values
held in float32 at the float32 rate. oneDNN (the CPU kernel library PyTorch's own bf16 matmuls run on) has
`dnnl_gemm_bf16bf16f32`: bf16 inputs, float32 accumulation and output, on AVX512_BF16 / AMX at about twice the
float32 rate. The arithmetic is the same (exact products of bf16 values, float32 sums); only the order of the sums
inside a GEMM differs, so each entry stays within gamma_K = K u / (1 - K u) (u = 2^-24) of |a| |b| of the exact
product, as the float32 GEMM's does (tests/kernels/test_gemm.py).

`matmul(a, b, out, accumulate, prec)` takes oneDNN when all of these hold: prec is bf16, both operands are NumPy
arrays of float32 (values already bf16) or bfloat16 (ml_dtypes), HPC_LLM_KERNELS is not "numpy", the library
loads (HPC_LLM_DNNL_LIB, else the environment's lib/libdnnl.so.3 from the onednn-cpu-gomp wheel, else the system's
libdnnl), the CPU reports avx512_bf16 or amx_bf16, and the product has at least MIN_MACS multiply-adds per matrix
(MIN_MACS_HELD when both operands are bfloat16 arrays: no copies to pay for) and MIN_SIDE rows and columns.
Otherwise NumPy's matmul, as before, a bfloat16 operand widened to float32 first (exact).

Where oneDNN runs, a value can reach it as bf16 bits with no conversion: a bfloat16 array is passed as it is (its
bit patterns, any row stride), and a float32 array whose bf16 bits its owner keeps beside it (`share_bf16_bits`:
the model's weights, GPT.refresh_compute) reads those; any other float32 operand is converted for the call.

oneDNN takes its threads from OpenMP (OMP_NUM_THREADS); NumPy's OpenBLAS from OPENBLAS_NUM_THREADS.

Two ways into oneDNN, chosen per product by a measured rule (`_primitive_first`): its GEMM API (the functions above,
a call per matrix of a batch) and its matmul primitive (kernels/onednn_matmul.py: the AMX "brgemm" kernels on a CPU
with AMX, a batch in one call, transposes as strides). Where the library lacks the primitive, or it refuses a
layout (a negative stride, one only its reference loops take), the GEMM API runs. scripts/bench/
bench_matmul_primitive.py, 6x384's products, the primitive's GFLOP/s over the GEMM API's at 2 threads (1 thread),
two runs:
- bf16, a row-major (NN, NT): 1.0-1.6x (0.91-1.8x; below 1 only with K >= 1152 on one thread) -> primitive;
- bf16, a a transposed view (TN, the weight gradients): 0.68-1.0x, 1.1-1.2x once (0.55-0.86x) -> GEMM API;
- float32 TN: 1.07-1.25x (0.96-1.18x) with M N >= 2^19 (fc's and fc_proj's) -> primitive; smaller ones
  0.89-1.03x (0.92-1.03x) and float32 NN, NT 0.77-1.07x (0.76-1.04x) -> GEMM API;
- batches (attention's per-head products, any layout): bf16 1.9-5.0x (1.5-2.9x), float32 1.35-1.8x (1.1-1.4x)
  -> primitive.
The primitive's results are within gamma_K of |a| |b| as the GEMM API's; they do not depend on the thread count at
1 and 2 threads on the model's shapes (checked bitwise; oneDNN could split K at other shapes or counts), but may on
the operands' strides (a transposed view's leading dimension), so a float32 operand converted to bf16 keeps its
orientation.

float32 products: with the shared thread pool on (kernels/pool.py: several OpenMP threads, HPC_LLM_POOL), those of
POOL_MIN_MACS or more per matrix run on oneDNN's `dnnl_sgemm` (`sgemm_matmul`), whose threads are the pool's; the
summation order inside a GEMM differs from OpenBLAS's, each entry within gamma_K of |a| |b| as any float32 GEMM's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import weakref

import numpy as np
from numpy.lib.stride_tricks import as_strided

from hpc_llm.backend import array_module, low_dtype
from hpc_llm.kernels.blas import cpu_flags, set_openblas_threads
from hpc_llm.kernels.cuda import gemm16
from hpc_llm.kernels.dispatch import kernels_choice
from hpc_llm.kernels.onednn_matmul import Primitives
from hpc_llm.kernels.pool import pool_threads
from hpc_llm.kernels.rounding import bf16_bits, from_low

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
# a bf16 product with both operands bfloat16 arrays already takes oneDNN from this many: attention's per-head
# products (6x384's, a batch of 48 matrices of 2^20-2^21) run 2.0-2.4x NumPy's float32 batched matmul, at 2^17
# (shakespeare-char's) 0.4x (scripts/bench/bench_gemm.py's bf16in column; docs/performance.md)
MIN_MACS_HELD = 1 << 20
# a single float32 product a^T @ b takes the matmul primitive from this many entries out (M N): 6x384's fc weight
# gradients (2^19.2) ran 1.07-1.25x the GEMM API's, the smaller ones 0.89-1.03x (module docstring)
PRIMITIVE_F32_MIN_MN = 1 << 19
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_state: dict = {}
# id(a float32 array) -> (a weak reference to it, its bf16 bit patterns: uint16 of its shape, C-contiguous)
_shared_bits: dict = {}


def _load_library():
    """The first oneDNN library that loads (a ctypes.CDLL with its GEMM API), or None (cached: the GEMM API, sgemm
    and the primitives share it)."""
    if "library" not in _state:
        _state["library"] = None
        paths = [
            os.environ.get("HPC_LLM_DNNL_LIB"),
            os.path.join(sys.prefix, "lib", "libdnnl.so.3"),
        ]
        for path in [*paths, ctypes.util.find_library("dnnl")]:
            try:
                lib = ctypes.CDLL(path) if path else None
            except OSError:
                continue
            if lib is not None and hasattr(lib, "dnnl_sgemm"):
                _state["library"] = lib
                break
    return _state["library"]


def _load_gemm(name: str = "dnnl_gemm_bf16bf16f32"):
    """oneDNN's GEMM `name` (dnnl_gemm_bf16bf16f32, dnnl_sgemm: the same arguments) from the first oneDNN library
    that loads, or None."""
    lib = _load_library()
    fn = getattr(lib, name, None)
    if fn is None:
        return None
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    fn.argtypes = [ctypes.c_char, ctypes.c_char, i64, i64, i64, f32, ptr, i64, ptr, i64]
    fn.argtypes += [f32, ptr, i64]
    return fn


def onednn_primitives():
    """oneDNN's matmul primitives (kernels/onednn_matmul.py) when the library loads and has them, else None
    (cached)."""
    if "primitives" not in _state:
        lib = _load_library()
        _state["primitives"] = None
        if lib is not None and hasattr(lib, "dnnl_matmul_primitive_desc_create"):
            _state["primitives"] = Primitives(lib)
    return _state["primitives"]


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


def reads_bf16(prec) -> bool:
    """Whether prec's products on NumPy arrays take bf16 operands as they are (oneDNN runs them): then a value made
    for a product is best made in bfloat16 (model/precision.py), else in float32."""
    return prec.name == "bf16" and kernels_choice() != "numpy" and onednn_gemm() is not None


def uses_onednn(a, b, prec) -> bool:
    """Whether matmul(a, b, ..., prec) runs on oneDNN's bf16 GEMM (the conditions in the module's docstring)."""
    if prec.name != "bf16" or not (type(a) is np.ndarray and type(b) is np.ndarray):
        return False
    if a.dtype not in (np.float32, prec.low) or b.dtype not in (np.float32, prec.low):
        return False
    if a.ndim < 2 or b.ndim < 2:
        return False
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    held = a.dtype == b.dtype == prec.low
    if not onednn_size(M * K * N, min(M, N), held) or kernels_choice() == "numpy":
        return False
    return onednn_gemm() is not None


def onednn_size(macs: int, side: int, held: bool = False) -> bool:
    """Whether a bf16 product of `macs` multiply-adds per matrix, no side (rows, columns) below `side`, is large
    enough for oneDNN on a CPU where it runs (held: both operands bfloat16 arrays). The one rule: the planner
    prices bf16 products by it too (plan/compute.py)."""
    return side >= MIN_SIDE and macs >= (min(MIN_MACS, MIN_MACS_HELD) if held else MIN_MACS)


def takes_held(prec, macs: int, side: int) -> bool:
    """Whether products of bfloat16 arrays with at least `macs` multiply-adds per matrix and no side below `side`
    run on oneDNN: a caller that makes their operands makes them in bfloat16 then (attention's, model/attention.py)."""
    return onednn_size(macs, side, True) and reads_bf16(prec)


def matmul(a, b, out=None, accumulate: bool = False, prec=None):
    """out = a @ b, or out += a @ b (accumulate); a new array when out is None. Returns out. An operand held in 2
    bytes (a device's: GPT.compute, a kept input): kernels/cuda/gemm16.py."""
    # the host's float32 products (most of a step's calls) skip the checks that cannot hold for them
    host32 = type(a) is np.ndarray and type(b) is np.ndarray and a.dtype == b.dtype == np.float32
    if not host32 or (prec is not None and prec.name == "bf16"):
        if gemm16.stored_16_bit(a) or gemm16.stored_16_bit(b):
            return gemm16.matmul16(a, b, prec, out, accumulate)
        if prec is not None and uses_onednn(a, b, prec):
            return bf16_matmul(a, b, out, accumulate)
        a, b = as_float32(a), as_float32(b)
    if (out is None or out.dtype == np.float32) and uses_sgemm(a, b):
        return sgemm_matmul(a, b, out, accumulate)
    if out is None:
        return a @ b
    if accumulate:
        out += a @ b
    else:
        array_module(out).matmul(a, b, out=out)
    return out


def _is_bf16(x) -> bool:
    return type(x) is np.ndarray and x.dtype.itemsize == 2 and x.dtype.name == "bfloat16"


def as_float32(x):
    """x itself, or a bfloat16 array widened to float32 (exact): what BLAS multiplies. Widened in x's memory order
    (a transpose view stays one): BLAS's summation order can depend on the layout (OpenBLAS's SkylakeX kernels on
    an Intel CPU sum a transposed operand's products in another order), so the product is bitwise the one of the
    same values held in float32 (from_low widens a non-contiguous array by astype, in its order)."""
    return from_low(x, np.float32) if _is_bf16(x) else x


def _transposed(x) -> bool:
    """Whether x's matrices are laid out column by column (a transposed view), not row by row."""
    return x.strides[-2] == x.itemsize and x.strides[-1] != x.itemsize and x.shape[-1] > 1


def share_bf16_bits(values, bits) -> None:
    """Declare `bits` (uint16, C-contiguous, values' shape) the bf16 bit patterns of the float32 array `values`
    (C-contiguous, holding bf16 values), kept equal to them by their owner for as long as `values` lives: a product
    with an operand that is a view of `values` then reads the view's bits, no conversion."""
    assert values.dtype == np.float32 and bits.dtype == np.uint16 and bits.size == values.size
    key = id(values)
    _shared_bits[key] = (weakref.ref(values, lambda _: _shared_bits.pop(key, None)), bits)


def _shared_view(x):
    """x's bits as a uint16 view of the bits shared for the array x is a view of (share_bf16_bits), else None."""
    base = x
    while _shared_bits and isinstance(base, np.ndarray):
        entry = _shared_bits.get(id(base))
        if entry is not None and entry[0]() is base:
            offset = _address(x) - _address(base)
            if offset % 4 or any(s % 4 or s < 0 for s in x.strides):
                return None
            flat = entry[1].reshape(-1)[offset // 4 :]
            return as_strided(flat, x.shape, tuple(s // 2 for s in x.strides), writeable=False)
        base = base.base
    return None


def _bf16_view(x):
    """x (..., R, C), float32 values already bf16 (or rounded to it here) or bfloat16, as bf16 bit patterns: uint16
    of x's shape, a view of a bfloat16 array's or of shared bits (any strides), else a converted copy laid out as x
    is (a transposed view stays a transposed view)."""
    bits = x.view(np.uint16) if _is_bf16(x) else _shared_view(x)
    if bits is None:
        t = _transposed(x)
        bits = np.swapaxes(_bits(np.swapaxes(x, -1, -2)), -1, -2) if t else _bits(x)
    return bits


def _bf16_operand(bits):
    """bf16 bit patterns (..., R, C) (_bf16_view) in a layout oneDNN's GEMM reads: (bits, trans, ld), bits
    (..., R, C) with rows ld elements apart (trans "N") or (..., C, R) the same for the transpose (trans "T", no copy
    of the transposition); leading axes of any strides."""
    R, C = bits.shape[-2:]
    (sr, sc), ahead = bits.strides[-2:], min(bits.strides[:-2], default=0) >= 0
    if ahead and sc == 2 and (R == 1 or sr >= 2 * C):
        return bits, b"N", max(sr // 2, C, 1)
    if ahead and sr == 2 and C > 1 and sc >= 2 * R:
        return np.swapaxes(bits, -1, -2), b"T", max(sc // 2, R, 1)
    bits = np.ascontiguousarray(bits)
    return bits, b"N", max(C, 1)


def _bits(x):
    """x's bf16 values (round to nearest even: exact on values already bf16) as a C-contiguous uint16 array; the
    compiled conversion whenever numba is there (a bf16 run has loaded it already), on arrays of any size."""
    return bf16_bits(np.ascontiguousarray(x), low_dtype("bf16"))


def bf16_matmul(a, b, out=None, accumulate: bool = False):
    """out (=|+=) a @ b on oneDNN with bf16 inputs and float32 accumulation; a (..., M, K), b (..., K, N), leading
    axes broadcast, a product per matrix. out (float32) may be a view whose rows are strided; any other layout is
    computed into a new array first."""
    a, b = _bf16_view(a), _bf16_view(b)
    if _primitive_first(a, b, bf16=True):
        done = _primitive_products(a, b, out, accumulate)
        if done is not None:
            return done
    return _gemm_products(
        onednn_gemm(), "dnnl_gemm_bf16bf16f32", _bf16_operand, a, b, out, accumulate
    )


def _primitive_first(a, b, bf16: bool) -> bool:
    """Whether a @ b is tried on the matmul primitive before the GEMM API (the module docstring's rule): batched
    products always, a single one in bf16 unless a is a transposed view, in float32 only then and with at least
    PRIMITIVE_F32_MIN_MN entries out."""
    if onednn_primitives() is None:
        return False
    if a.ndim > 2 or b.ndim > 2:
        return True
    if bf16:
        return not _transposed(a)
    return _transposed(a) and a.shape[-2] * b.shape[-1] >= PRIMITIVE_F32_MIN_MN


def _primitive_products(a, b, out, accumulate: bool):
    """out (=|+=) a @ b on oneDNN's matmul primitive (operands of any strides: bf16 bit patterns or float32), out as
    bf16_matmul's; None where the primitive does not take these layouts (nothing written then)."""
    lead = () if a.ndim == b.ndim == 2 else np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    shape = lead + (a.shape[-2], b.shape[-1])
    fresh = out is None or out.shape != shape or out.dtype != np.float32
    target = np.empty(shape, dtype=np.float32) if fresh else out
    if fresh and accumulate and out is not None:
        target[...] = out
    if not onednn_primitives().run(a, b, target, accumulate and out is not None):
        return None
    if out is None:
        return target
    if target is not out:
        out[...] = target
    return out


def _gemm_products(gemm, name: str, operand, a, b, out, accumulate: bool):
    """out (=|+=) a @ b through oneDNN's GEMM API `gemm` (a call per matrix; its operands as `operand` lays them
    out: (array, trans, ld)); out as bf16_matmul's."""
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    assert b.shape[-2] == K, f"matmul: {a.shape} @ {b.shape}"
    lead = () if a.ndim == b.ndim == 2 else np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    (a, ta, lda), (b, tb, ldb) = operand(a), operand(b)
    if out is None:
        out, accumulate = np.empty(lead + (M, N), dtype=np.float32), False
    target = out
    if out.strides[-1] != 4 or out.strides[-2] < 4 * N or out.shape != lead + (M, N):
        target = np.empty(lead + (M, N), dtype=np.float32)
        if accumulate:
            target[...] = out
    beta, ldc = (1.0 if accumulate else 0.0), target.strides[-2] // 4
    pa, pb, pc = _address(a), _address(b), _address(target)
    offsets = ((0, 0, 0),) if not lead else zip(*(_offsets(x, lead) for x in (a, b, target)))
    for oa, ob, oc in offsets:
        status = gemm(ta, tb, M, N, K, 1.0, pa + oa, lda, pb + ob, ldb, beta, pc + oc, ldc)
        if status != 0:
            raise RuntimeError(f"{name} returned status {status}")
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
    """out (=|+=) a @ b on oneDNN in float32; a (..., M, K), b (..., K, N) float32, leading axes broadcast, a
    product per matrix. out (float32) may be a view whose rows are strided; any other layout is computed into a new
    array first."""
    if _primitive_first(a, b, bf16=False):
        done = _primitive_products(a, b, out, accumulate)
        if done is not None:
            return done
    return _gemm_products(onednn_sgemm(), "dnnl_sgemm", _f32_operand, a, b, out, accumulate)
