"""The array module: NumPy on CPU nodes, CuPy on GPU nodes; and the NumPy dtypes of the 16-bit formats.

Model code never names `np` for tensor math: it asks `array_module(x)` for the module of its inputs, so the same
forward/backward runs on either. Host copies happen only at the edges (`to_host`, `to_device`).
"""

from __future__ import annotations

import numpy as np

from hpc_llm.errors import UserError


def array_module(x):
    """numpy or cupy, whichever owns x (CuPy is imported only if it is already loaded); an array type may name its
    own module (`xp`: the launch-counting stand-in for CuPy, kernels/cuda/launches.py)."""
    if type(x) is np.ndarray:
        return np
    mod = type(x).__module__
    if mod.startswith("cupy"):
        import cupy

        return cupy
    return getattr(type(x), "xp", np)


def get_backend(name: str):
    """The module for a config's `train.backend`."""
    if name == "numpy":
        return np
    if name == "cupy":
        try:
            import cupy
        except ImportError:
            raise UserError(
                'train.backend = "cupy" but CuPy is not installed (pip install hpc_llm[gpu])'
            ) from None
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # noqa: BLE001 - any CUDA failure: CuPy is here, a usable GPU is not
            raise UserError(f'train.backend = "cupy" but no usable GPU: {e}') from None
        return cupy
    raise UserError(f'train.backend: expected "numpy" or "cupy", got {name!r}')


def to_host(x) -> np.ndarray:
    """A NumPy array (a copy only when x lives on a GPU)."""
    if isinstance(x, np.ndarray):
        return x
    return x.get()


def to_device(x: np.ndarray, xp):
    return x if xp is np else xp.asarray(x)


def keep_freed_memory(keep: bool = True) -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS (keep=False: glibc's defaults).

    A training step allocates and frees the same large activations every step. By default glibc serves big
    allocations with mmap and gives them back on free, so the next step page-faults (and the kernel zeroes) every page
    again: a quarter of a small model's step here (docs/performance.md). Serving them from the heap and never
    trimming it makes each step reuse warm pages; peak memory is unchanged. Returns False (and does nothing) off glibc.
    """
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
    if keep:
        return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return (
        bool(mallopt(M_MMAP_MAX, 65536))
        and bool(mallopt(M_TRIM_THRESHOLD, 128 * 1024))
        and bool(mallopt(M_MMAP_THRESHOLD, 128 * 1024))
    )


def releasable_zeros(n: int, dtype, xp=np):
    """A zero-filled 1-D array whose ranges `release` can give back to the OS while every view of it stays valid: on
    NumPy an anonymous private mapping of its own (untouched pages cost nothing; a released page reads as zeros and
    is mapped again when written). ZeRO-2/3 keep their full-size gradient and parameter buffers so, with only a
    rank's shard and the units in use resident (parallel/zero.py), as FSDP frees a flat parameter's storage while its
    views live on. On CuPy a plain array: release only zeroes (CUDA's virtual-memory API would be needed to unmap)."""
    dtype = np.dtype(dtype)
    if xp is not np:
        return xp.zeros(n, dtype=dtype)
    import mmap

    # private: a released page of a shared mapping would keep its contents (and its memory) in the page cache
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    return np.frombuffer(
        mmap.mmap(-1, max(1, n * dtype.itemsize), flags=flags), dtype=dtype, count=n
    )


def is_releasable(buf) -> bool:
    """Whether buf is an array releasable_zeros made: a view of its memoryview of the mapping (a slice of it has
    another base)."""
    return isinstance(getattr(getattr(buf, "base", None), "obj", None), _mmap_type())


def release(buf, a: int, b: int) -> None:
    """buf[a:b] = 0, giving the whole pages inside it back to the OS when buf is a `releasable_zeros` array (the
    partial pages at the ends are zeroed in place); other arrays are only zeroed."""
    if b <= a:
        return
    if not is_releasable(buf):
        buf[a:b] = 0
        return
    mm = buf.base.obj
    size, page = buf.itemsize, _page_size()
    lo = -(-a * size // page) * page  # the first whole page inside, in bytes
    hi = b * size // page * page
    if hi <= lo:
        buf[a:b] = 0
        return
    buf[a : -(-lo // size)] = 0
    buf[hi // size : b] = 0
    mm.madvise(_mmap_module().MADV_DONTNEED, lo, hi - lo)


def _mmap_module():
    import mmap

    return mmap


def _mmap_type():
    return _mmap_module().mmap


def _page_size() -> int:
    return _mmap_module().PAGESIZE


def low_dtype(name: str):
    """The NumPy dtype of a precision's format (None for fp32)."""
    if name == "fp32":
        return None
    if name == "fp16":
        return np.dtype(np.float16)
    if name == "bf16":
        try:
            import ml_dtypes
        except ImportError:
            raise UserError(
                'train.precision = "bf16" needs the ml_dtypes package (pip install hpc_llm[bf16])'
            ) from None
        return np.dtype(ml_dtypes.bfloat16)
    raise UserError(f'train.precision: expected "fp32", "bf16" or "fp16", got {name!r}')
