"""The array module: NumPy on CPU nodes, CuPy on GPU nodes.

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
            raise UserError('train.backend = "cupy" but CuPy is not installed (pip install hpc_llm[gpu])') from None
        return cupy
    raise UserError(f'train.backend: expected "numpy" or "cupy", got {name!r}')


def to_host(x) -> np.ndarray:
    """A NumPy array (a copy only when x lives on a GPU)."""
    if isinstance(x, np.ndarray):
        return x
    return x.get()


def to_device(x: np.ndarray, xp):
    return x if xp is np else xp.asarray(x)
