"""A branch's dropout and the residual add after it: x += a * keep * scale, in one pass.

Compiled: the twin's arithmetic element by element in the same order (a * keep is exact, then the scale, then the
add), so the two are bitwise equal; without dropout the plain add, on the shared pool's threads (kernels/pool.py).
"""

from __future__ import annotations

from hpc_llm.backend import array_module
from hpc_llm.kernels.cuda import device
from hpc_llm.kernels.dispatch import compiled, kernel, prange


def dropout_residual_(x, a, keep=None, scale: float = 1.0, bias=None):
    """x += a * keep * scale (keep: the dropout's kept flags, None: no dropout), in place; returns x. On a device
    one kernel (cuda/dropout_residual.cu). bias: a += bias first (device only: the branch layer's bias folded in)."""
    flat = x.flags.c_contiguous and a.flags.c_contiguous and a.shape == x.shape
    xp = array_module(x)
    if device.on_device(xp) and flat and (keep is None or keep.flags.c_contiguous):
        return device.dropout_residual_(xp, x, a, keep, scale, dropout_residual_numpy, bias)
    if bias is not None:
        a += bias
    if (
        keep is not None
        and compiled(_dropout_residual, x, a, keep)
        and flat
        and keep.flags.c_contiguous
    ):
        _dropout_residual(x.reshape(-1), a.reshape(-1), keep.reshape(-1), x.dtype.type(scale))
        return x
    if keep is None and flat and a.dtype == x.dtype and compiled(_residual_add, x, a):
        _residual_add(x.reshape(-1), a.reshape(-1))
        return x
    return dropout_residual_numpy(x, a, keep, scale)


def dropout_residual_numpy(x, a, keep=None, scale: float = 1.0, bias=None):
    """dropout_residual_'s arithmetic in NumPy passes (the twin)."""
    if bias is not None:
        a += bias
    if keep is None:
        x += a
        return x
    d = a * keep
    d *= scale
    x += d
    return x


@kernel(auto=True, pool=True)
def _dropout_residual(x, a, keep, scale):
    for i in prange(x.size):
        x[i] += a[i] * keep[i] * scale


@kernel(auto="pool", pool=True)
def _residual_add(x, a):
    for i in prange(x.size):
        x[i] += a[i]
