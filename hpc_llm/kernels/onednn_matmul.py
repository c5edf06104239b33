"""oneDNN's matmul primitive through its C API (ctypes): one product of strided operands per call, batched too.

oneDNN's GEMM API (`dnnl_gemm_bf16bf16f32`, `dnnl_sgemm`) runs its older GEMM kernels; the matmul primitive picks
the CPU's best implementation (on AMX, the tile-based "brgemm" kernels PyTorch's bf16 matmuls run on) for the
shapes, strides and data types it is created for. Creating one costs a JIT compile (milliseconds), so each is
kept, keyed by (shapes, strides, data types, accumulate): a step's products repeat the same few keys. Operands are
passed as they lie in memory (a transpose is a stride, a batch a leading dimension, a broadcast one of size 1), so
no copies; out += a @ b is the primitive's sum post-op. float32 products keep float32 arithmetic (fpmath mode
strict: no implicit bf16 down-conversion).

In the oneDNN this runs on (3.2) brgemm takes dense operands only (rows and matrices back to back, or a transpose of
that); other strides (attention's slices of a head's rows, a block of out's rows) get oneDNN's jit GEMM inside the
primitive, a whole batch in one call. A layout only the reference loops take is refused: the caller runs the GEMM
API instead.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

MAX_NDIMS = 12  # DNNL_MAX_NDIMS
ARG_SRC, ARG_DST, ARG_WEIGHTS = 1, 17, 33  # DNNL_ARG_SRC / DST / WEIGHTS
BF16, F32 = 2, 3  # dnnl_data_type_t
CPU, IN_ORDER, FPMATH_STRICT, QUERY_IMPL_INFO = 1, 1, 0, 8
# a training step multiplies a few dozen layouts; shapes that keep changing (growing sequences) would otherwise keep
# a primitive each
MAX_CACHED = 256
_Dims = ctypes.c_int64 * MAX_NDIMS


class _Arg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


class Primitives:
    """oneDNN's engine, stream and the matmul primitives created so far, for the library `lib` (a ctypes.CDLL)."""

    def __init__(self, lib):
        self.lib = lib
        ptr, i32 = ctypes.c_void_p, ctypes.c_int
        lib.dnnl_primitive_execute.argtypes = [ptr, ptr, i32, ptr]
        lib.dnnl_memory_set_data_handle.argtypes = [ptr, ptr]
        lib.dnnl_stream_wait.argtypes = [ptr]
        lib.dnnl_engine_create.argtypes = [ptr, i32, ctypes.c_size_t]
        lib.dnnl_stream_create.argtypes = [ptr, ptr, ctypes.c_uint]
        lib.dnnl_post_ops_append_sum.argtypes = [ptr, ctypes.c_float, ctypes.c_int32, i32]
        self.engine, self.stream = ctypes.c_void_p(), ctypes.c_void_p()
        self._check(lib.dnnl_engine_create(ctypes.byref(self.engine), CPU, 0), "engine_create")
        self._check(
            lib.dnnl_stream_create(ctypes.byref(self.stream), self.engine, IN_ORDER),
            "stream_create",
        )
        self.cache: dict = {}
        # the memory objects of a cached primitive get each call's addresses: one call at a time
        self.lock = threading.RLock()

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"oneDNN {what} returned status {status}")

    def _desc(self, dims, strides, dtype: int):
        md = ctypes.c_void_p()
        status = self.lib.dnnl_memory_desc_create_with_strides(
            ctypes.byref(md), len(dims), _Dims(*dims), dtype, _Dims(*strides)
        )
        return md if status == 0 else None

    def _create(self, layouts, accumulate: bool):
        """(primitive, its three memory objects, its argument array, its implementation's name) for the layouts
        ((dims, strides, dtype) of src, weights, dst), or None where oneDNN does not take them or only with its
        reference implementation."""
        lib = self.lib
        descs = [self._desc(*layout) for layout in layouts]
        attr, post_ops, pd, prim = (ctypes.c_void_p() for _ in range(4))
        try:
            if any(d is None for d in descs):
                return None
            self._check(lib.dnnl_primitive_attr_create(ctypes.byref(attr)), "primitive_attr_create")
            if layouts[0][2] == F32:
                self._check(
                    lib.dnnl_primitive_attr_set_fpmath_mode(attr, FPMATH_STRICT), "set_fpmath_mode"
                )
            if accumulate:
                self._check(lib.dnnl_post_ops_create(ctypes.byref(post_ops)), "post_ops_create")
                self._check(
                    lib.dnnl_post_ops_append_sum(post_ops, 1.0, 0, 0), "post_ops_append_sum"
                )
                self._check(lib.dnnl_primitive_attr_set_post_ops(attr, post_ops), "set_post_ops")
            src, weights, dst = descs
            if lib.dnnl_matmul_primitive_desc_create(
                ctypes.byref(pd), self.engine, src, weights, None, dst, attr
            ):
                return None
            info = ctypes.c_char_p()
            lib.dnnl_primitive_desc_query(pd, QUERY_IMPL_INFO, 0, ctypes.byref(info))
            if (info.value or b"ref").startswith(b"ref"):
                return None  # the reference loops (a batch broadcast against one matrix): far below the GEMM API
            self._check(lib.dnnl_primitive_create(ctypes.byref(prim), pd), "primitive_create")
            mems = [ctypes.c_void_p() for _ in descs]
            for mem, md in zip(mems, descs):
                self._check(
                    lib.dnnl_memory_create(ctypes.byref(mem), md, self.engine, None),
                    "memory_create",
                )
            args = (_Arg * 3)(*(_Arg(k, m) for k, m in zip((ARG_SRC, ARG_WEIGHTS, ARG_DST), mems)))
            return prim, mems, args, (info.value or b"").decode()
        finally:
            for handle, kind in (
                (pd, "primitive_desc"),
                (attr, "primitive_attr"),
                (post_ops, "post_ops"),
            ):
                if handle.value:
                    getattr(lib, f"dnnl_{kind}_destroy")(handle)
            for md in descs:
                if md is not None:
                    lib.dnnl_memory_desc_destroy(md)

    def entry(self, a, b, c, accumulate: bool):
        """The cached primitive for c (=|+=) a @ b on these arrays' shapes, strides and types, or None."""
        key = tuple(p for x in (a, b, c) for p in (x.shape, x.strides, x.dtype)) + (accumulate,)
        if key not in self.cache:
            layouts = _layouts(a, b, c)
            self.cache[key] = None if layouts is None else self._create(layouts, accumulate)
        return self.cache[key]

    def clear(self) -> None:
        """Destroy the cached primitives and their memory objects."""
        with self.lock:
            for found in self.cache.values():
                if found is not None:
                    self.lib.dnnl_primitive_destroy(found[0])
                    for mem in found[1]:
                        self.lib.dnnl_memory_destroy(mem)
            self.cache.clear()

    def run(self, a, b, c, accumulate: bool = False) -> bool:
        """c (=|+=) a @ b, a (..., M, K) and b (..., K, N) uint16 (bf16 bit patterns) or float32 alike, c (..., M, N)
        float32, leading axes broadcast to c's; True when done, False where the primitive does not take these
        layouts (then nothing was written)."""
        lib = self.lib
        with self.lock:
            found = self.entry(a, b, c, accumulate)
            if found is None:
                return False
            prim, mems, args, _ = found
            for mem, x in zip(mems, (a, b, c)):
                lib.dnnl_memory_set_data_handle(mem, x.__array_interface__["data"][0])
            self._check(lib.dnnl_primitive_execute(prim, self.stream, 3, args), "primitive_execute")
            self._check(lib.dnnl_stream_wait(self.stream), "stream_wait")
        return True


def _layouts(a, b, c):
    """((dims, strides in elements, data type) of a, b and c as the matmul primitive reads them, all of c's rank), or
    None where an operand's layout has no such form (a negative or unaligned stride, a broadcast matrix axis)."""
    out = []
    for x in (a, b, c):
        dtype = {np.dtype(np.uint16): BF16, np.dtype(np.float32): F32}.get(x.dtype)
        if dtype is None or (x is c and dtype != F32):
            return None
        pad = c.ndim - x.ndim
        dims, strides = [1] * pad, [0] * pad
        for axis, (n, s) in enumerate(zip(x.shape, x.strides)):
            if s < 0 or s % x.itemsize:
                return None
            if s == 0 and n > 1:
                if axis >= x.ndim - 2:
                    return None
                n = 1  # a broadcast batch axis: size one to oneDNN
            dims.append(n)
            strides.append(s // x.itemsize)
        # an axis of size one gets the stride of a dense outer axis (its stride is never used): brgemm takes that
        span = max(max(n * s for n, s in zip(dims, strides)), 1)
        strides = [span if n == 1 else s for n, s in zip(dims, strides)]
        out.append((dims, strides, dtype))
    if out[0][2] != out[1][2] or c.ndim > MAX_NDIMS:
        return None
    return out
