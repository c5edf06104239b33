"""Which implementation of a kernel runs: the compiled one (numba) or its NumPy twin.

`HPC_LLM_KERNELS` chooses: "auto" (the default: the compiled kernels measured faster than their twins, on arrays
large enough to pay for them), "numba" (every compiled kernel: the tests of each against its twin, and the
benchmarks), or "numpy" (the twins everywhere). Without numba every choice runs the twins. CuPy arrays
always take the twin here (the CUDA kernels are the device path's own). numba is imported on the first compiled
call, never at import time, so a process that runs no kernel pays nothing, and each kernel is compiled once per
machine (`cache=True`: later processes load the machine code from `__pycache__`).
"""

from __future__ import annotations

import os
import types

import numpy as np

from hpc_llm.errors import UserError

CHOICES = ("auto", "numba", "numpy")
# "auto" runs a compiled kernel on arrays of at least this many elements: below it the twin's few microseconds
# are not worth a process's first-call cost (importing numba and loading the cached kernels, about a second)
AUTO_MIN_ELEMENTS = 1 << 15
_state: dict = {}
# (variable, its raw value) -> the checked choice: every kernel call asks, and a changed value is a new key (so a
# variable set later, as tests do, is seen at once); a bad value is never cached
_choices: dict = {}
# pool.pool_threads, bound on first use (pool.py imports this module)
_pool_threads = None


def env_choice(var: str, choices: tuple) -> str:
    """Environment variable `var`, one of `choices` (case and spaces ignored; unset or empty: the first); a bad
    value is a UserError."""
    key = (var, os.environ.get(var))
    name = _choices.get(key)
    if name is None:
        name = (key[1] or "").strip().lower() or choices[0]
        if name not in choices:
            raise UserError(f"{var}: expected one of {', '.join(choices)}, got {name!r}")
        _choices[key] = name
    return name


def kernels_choice() -> str:
    """The configured implementation, from HPC_LLM_KERNELS; a bad value is a UserError."""
    return env_choice("HPC_LLM_KERNELS", CHOICES)


def check_environment() -> None:
    """The kernel layer's environment variables (HPC_LLM_KERNELS, HPC_LLM_POOL) read at start: a bad value is a
    UserError on every rank before any compute, not at a first product inside a step."""
    from hpc_llm.kernels.pool import pool_choice

    kernels_choice()
    pool_choice()


def numba_available() -> bool:
    if "numba" not in _state:
        try:
            import numba  # noqa: F401

            _state["numba"] = True
        except ImportError:
            _state["numba"] = False
    return _state["numba"]


def compiled(k: lazy_jit, x, *more) -> bool:
    """Whether kernel k runs compiled on arrays x, *more (None entries ignored; the callers check the layouts they
    need). "numba": whenever numba is there and every array is a NumPy one; "auto": also only for a kernel measured
    faster than its twin (k.auto, docs/performance.md) and an x of AUTO_MIN_ELEMENTS or more; "numpy": never."""
    choice = kernels_choice()
    if choice == "numpy" or (choice == "auto" and (x.size < AUTO_MIN_ELEMENTS or not _auto(k))):
        return False
    if type(x) is not np.ndarray or not numba_available():
        return False
    for a in more:
        if a is not None and type(a) is not np.ndarray:
            return False
    return True


def pool_threads() -> int:
    """kernels/pool.py's pool_threads (imported on first use: that module imports this one)."""
    global _pool_threads
    if _pool_threads is None:
        from hpc_llm.kernels.pool import pool_threads as threads

        _pool_threads = threads
    return _pool_threads()


def _auto(k: lazy_jit) -> bool:
    """Whether kernel k runs under "auto": k.auto True (measured faster than its twin on one thread), or "pool"
    (its parallel variant measured faster than the twin, with the shared pool on)."""
    if k.auto != "pool":
        return bool(k.auto)
    return pool_threads() > 0


class lazy_jit:
    """A module-level function compiled by numba on its first call (with `cache=True` and the given options): the
    source sits beside its NumPy twin, and importing the module imports no numba.

    A pool kernel's outer loop is `prange` (this module's name for `range`): with the shared thread pool on
    (kernels/pool.py) it runs a second compilation of the same source in which that loop is numba's `prange`, its
    iterations (independent rows or elements, no sums across them) split over the pool's threads, each computed as
    the serial one computes it."""

    def __init__(self, fn, auto: bool | str, pool: bool = False, **options):
        self.fn, self.auto, self.pool, self.options = fn, auto, pool, options
        self.jitted = self.parallel = None

    def __call__(self, *args):
        if self.pool and pool_threads() > 0:
            return (self.parallel or self.compile_parallel())(*args)
        return (self.jitted or self.compile())(*args)

    def compile(self):
        """The numba dispatcher; the kernels this one calls (lazy_jit globals) are compiled first and put in its
        module's namespace in their place, for numba to call."""
        if self.jitted is None:
            g = self.fn.__globals__
            for name in self.fn.__code__.co_names:
                if isinstance(g.get(name), lazy_jit):
                    g[name] = g[name].compile()
            import numba

            self.jitted = numba.njit(cache=True, **self.options)(self.fn)
        return self.jitted

    def compile_parallel(self):
        """The parallel variant: the source compiled with `prange` bound to numba's (its own cache entry)."""
        if self.parallel is None:
            import numba

            # the kernels this one calls, compiled into the module's namespace first (compile() puts them there);
            # its own serial dispatcher compiles lazily, only if it is ever called
            self.compile()
            fn = self.fn
            scope = dict(fn.__globals__, prange=numba.prange)
            twin = types.FunctionType(
                fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__
            )
            twin.__qualname__ = fn.__qualname__ + "_pool"
            twin.__module__ = fn.__module__
            self.parallel = numba.njit(cache=True, parallel=True, **self.options)(twin)
        return self.parallel


def kernel(auto: bool | str = False, pool: bool = False, **options):
    """Decorator: `@kernel(auto=True)` makes a lazy_jit of the function; auto: run under HPC_LLM_KERNELS=auto
    (measured faster than the twin), "pool": only with the shared pool on (its parallel variant measured faster);
    pool: its outer loop is `prange`, split over the shared pool's threads when that is on. fastmath stays off:
    IEEE arithmetic, the bound each test states."""
    return lambda fn: lazy_jit(fn, auto, pool, **options)


# a pool kernel's outer loop: the builtin range when compiled serially, numba's prange in its parallel variant
prange = range
