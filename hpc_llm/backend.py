"""The array module: NumPy on CPU nodes, CuPy on GPU nodes; and the NumPy dtypes of the 16-bit formats.

Model code never names `np` for tensor math: it asks `array_module(x)` for the module of its inputs, so the same
forward/backward runs on either. Host copies happen only at the edges (`to_host`, `to_device`).
"""

from __future__ import annotations

import numpy as np

from hpc_llm.errors import UserError


def array_module(x):
    """numpy or cupy, whichever owns x (CuPy is imported only if it is already loaded)."""
    mod = type(x).__module__
    if mod.startswith("cupy"):
        import cupy

        return cupy
    return np


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
