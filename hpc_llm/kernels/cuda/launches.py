"""The device path's kernel launches, counted on NumPy: an array module that stands for CuPy.

`counting()` gives a module (`xp`) whose arrays are `CountedArray`s: NumPy arrays that record each operation run on
them in the active `Ledger`, one launch each (what the same line runs as on CuPy: a ufunc, a reduction, a copy, a
gather, a cast, a GEMM), with the bytes it reads and writes. The model code asks `array_module(x)` for its module,
gets this one, and so takes its device branches (`xp.__name__ != "numpy"`: no L2 chunking, fused kernels), while
the arithmetic is NumPy's, but for GEMMs while counting (zeros of their shape: their values decide no count).
Views, reshapes and shape queries launch nothing. A fused kernel run through
`record_kernel` counts once, with the bytes its CUDA source moves, however many NumPy calls its twin makes.
"""

from __future__ import annotations

import contextlib
import types
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

# NumPy functions that make views or read metadata: no kernel on a GPU
_NO_LAUNCH = {
    "reshape",
    "ravel",
    "transpose",
    "swapaxes",
    "moveaxis",
    "squeeze",
    "expand_dims",
    "broadcast_to",
    "shape",
    "ndim",
    "size",
    "result_type",
    "may_share_memory",
    "shares_memory",
    "empty_like",
    "atleast_1d",
    "atleast_2d",
}
_GEMM = {"matmul", "dot"}


@dataclass
class Ledger:
    """What ran: launches and bytes by operation name, GEMMs apart (the planner prices them by their shapes)."""

    launches: Counter = field(default_factory=Counter)
    nbytes: Counter = field(default_factory=Counter)

    def add(self, name: str, nbytes: int) -> None:
        self.launches[name] += 1
        self.nbytes[name] += int(nbytes)

    @property
    def total(self) -> int:
        """Every launch, GEMMs included."""
        return sum(self.launches.values())

    @property
    def elementwise(self) -> int:
        """Launches that are not GEMMs."""
        return sum(n for k, n in self.launches.items() if k not in _GEMM)

    @property
    def elementwise_bytes(self) -> int:
        return sum(n for k, n in self.nbytes.items() if k not in _GEMM)


_active: list[Ledger] = []
_depth = [0]  # > 0 inside a recorded operation: what it calls inside is part of it


def _record(name: str, nbytes: int) -> None:
    if _active and _depth[0] == 0:
        _active[-1].add(name, nbytes)


@contextlib.contextmanager
def _inside():
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1


def _plain(x):
    return x.view(np.ndarray) if isinstance(x, CountedArray) else x


def _counted(x):
    if isinstance(x, np.ndarray) and not isinstance(x, CountedArray):
        return x.view(CountedArray)
    if isinstance(x, tuple):
        return tuple(_counted(v) for v in x)
    return x


def _dry_matmul(a, b, out=None):
    """A GEMM's result as zeros of its shape, not computed: while counting, no value feeds a count (the operand
    shapes decide every launch), and the product would cost the most time (1-D operands: computed)."""
    if a.ndim < 2 or b.ndim < 2:
        return np.matmul(_plain(a), _plain(b), out=out)
    shape = (*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
    if out is not None:
        out[0][...] = 0
        return out[0]
    return np.zeros(shape, dtype=np.result_type(a, b))


def _bytes(*xs) -> int:
    n = 0
    for x in xs:
        if isinstance(x, np.ndarray):
            n += x.nbytes
        elif isinstance(x, (list, tuple)):
            n += _bytes(*x)
    return n


class CountedArray(np.ndarray):
    """A NumPy array whose operations are counted as device launches (see the module's note)."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_plain(o) for o in out)
        with _inside():
            if ufunc is np.matmul and method == "__call__" and _active:
                res = _dry_matmul(*inputs, out=kwargs.get("out"))
            else:
                res = getattr(ufunc, method)(*(_plain(x) for x in inputs), **kwargs)
        name = ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}"
        _record(name, _bytes(*inputs) + (_bytes(*out) if out is not None else _bytes(res)))
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _counted(res)

    def __array_function__(self, func, types_, args, kwargs):
        with _inside():
            res = super().__array_function__(func, types_, args, kwargs)
        if func.__name__ not in _NO_LAUNCH:
            _record(func.__name__, _bytes(*args, *kwargs.values()) + _bytes(res))
        return _counted(res)

    def __getitem__(self, idx):
        res = super().__getitem__(idx)
        advanced = any(
            isinstance(i, (np.ndarray, list)) for i in (idx if isinstance(idx, tuple) else (idx,))
        )
        if advanced:  # a gather kernel; basic indexing is a view
            _record("gather", _bytes(res) * 2)
        return res

    def __setitem__(self, idx, value):
        with _inside():
            super().__setitem__(idx, _plain(value))
        target = super().__getitem__(idx)
        _record("copy", (_bytes(target) if isinstance(target, np.ndarray) else 8) + _bytes(value))

    def _method(name):  # noqa: N805 - a factory run in the class body
        def run(self, *args, **kwargs):
            with _inside():
                res = getattr(np.ndarray, name)(self, *args, **kwargs)
            _record(name, self.nbytes + _bytes(res))
            return res

        run.__name__ = name
        return run

    astype = _method("astype")
    copy = _method("copy")
    fill = _method("fill")
    mean = _method("mean")
    sum = _method("sum")
    max = _method("max")
    del _method


class _CountingModule(types.ModuleType):
    """NumPy's names; array makers return CountedArrays: zeros/ones/full a memset launch each, an array from the
    host a "to_device" copy, a device array made contiguous (or copied by `array`) a "copy"."""

    _FILL = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "arange"}
    _CONVERT = {"asarray", "array", "ascontiguousarray"}

    def __getattr__(self, name):
        obj = getattr(np, name)
        if name not in self._FILL | self._CONVERT and name != "empty":
            return obj

        def make(*args, **kwargs):
            src = args[0] if args else None
            res = np.asarray(obj(*(_plain(a) for a in args), **kwargs))
            if name in self._FILL:
                _record("fill", res.nbytes)
            elif name in self._CONVERT and not isinstance(src, CountedArray):
                _record("to_device", res.nbytes)
            elif name in self._CONVERT and not np.may_share_memory(res, _plain(src)):
                _record("copy", 2 * res.nbytes)
            return _counted(res)

        return make


xp = _CountingModule("counting_device")
CountedArray.xp = xp  # backend.array_module's answer for these arrays


def record_kernel(name: str, nbytes: int) -> contextlib.AbstractContextManager:
    """A fused kernel: one launch moving nbytes, whatever its NumPy twin runs inside the `with`."""
    _record(name, nbytes)
    return _inside()


@contextlib.contextmanager
def counting():
    """`with counting() as ledger:` records every launch on CountedArrays made by `xp` until the block ends."""
    ledger = Ledger()
    _active.append(ledger)
    try:
        yield ledger
    finally:
        _active.pop()
