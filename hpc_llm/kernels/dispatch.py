"""Which implementation of a kernel runs: the compiled one (numba) or its NumPy twin.

`HPC_LLM_KERNELS` chooses: "numba" (the default: compiled kernels on NumPy arrays when numba is importable, the twin
otherwise), or "numpy" (the twins everywhere: the reference the compiled kernels are tested against). CuPy arrays
always take the twin here (the CUDA kernels are the device path's own). numba is imported on the first compiled
call, never at import time, so a process that runs no kernel pays nothing, and each kernel is compiled once per
machine (`cache=True`: later processes load the machine code from `__pycache__`).
"""

from __future__ import annotations

import os

import numpy as np

from hpc_llm.errors import UserError

CHOICES = ("numba", "numpy")
prange = range  # a kernel's parallel loop; numba.prange once the kernel is compiled (lazy_jit)
_state: dict = {}


def kernels_choice() -> str:
    """The configured implementation ("numba" or "numpy"), from HPC_LLM_KERNELS; a bad value is a UserError."""
    name = os.environ.get("HPC_LLM_KERNELS", "numba").strip().lower() or "numba"
    if name not in CHOICES:
        raise UserError(f"HPC_LLM_KERNELS: expected one of {', '.join(CHOICES)}, got {name!r}")
    return name


def numba_available() -> bool:
    if "numba" not in _state:
        try:
            import numba  # noqa: F401

            _state["numba"] = True
        except ImportError:
            _state["numba"] = False
    return _state["numba"]


def compiled(*arrays) -> bool:
    """Whether a kernel on these arrays runs compiled: numba chosen and available, and every array a NumPy one
    (C-contiguous where the kernel indexes it flat: the callers check what they need)."""
    if kernels_choice() != "numba" or not numba_available():
        return False
    return all(type(a) is np.ndarray for a in arrays if a is not None)


class lazy_jit:
    """A module-level function compiled by numba on its first call (with `cache=True` and the given options): the
    source sits beside its NumPy twin, and importing the module imports no numba."""

    def __init__(self, fn, **options):
        self.fn, self.options, self.jitted = fn, options, None

    def __call__(self, *args):
        if self.jitted is None:
            import numba

            _init_threads(numba)
            # the kernels' modules import prange as range (no numba at import): numba's own from here on
            self.fn.__globals__["prange"] = numba.prange
            self.jitted = numba.njit(cache=True, **self.options)(self.fn)
        return self.jitted(*args)


def _init_threads(numba) -> None:
    """numba's parallel loops get the cores this process may run on (an MPI rank bound to one core: one thread),
    capped by OMP_NUM_THREADS like the BLAS threads."""
    if "threads" in _state:
        return
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        n = min(n, int(env))
    _state["threads"] = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(_state["threads"])


def kernel(**options):
    """Decorator: `@kernel(parallel=True)` makes a lazy_jit of the function (fastmath stays off: results follow
    IEEE arithmetic, the bound each test states)."""
    return lambda fn: lazy_jit(fn, **options)
