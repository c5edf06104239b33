"""A branch's dropout and the residual add after it: x += a * keep * scale, in one pass.

Compiled: the twin's arithmetic element by element in the same order (a * keep is exact, then the scale, then the
add), so the two are bitwise equal; without dropout the plain add (with the branch layer's bias, a + bias first), on
the shared pool's threads (kernels/pool.py).
"""

from __future__ import annotations

from hpc_llm.backend import array_module
from hpc_llm.kernels.cuda import device
from hpc_llm.kernels.dispatch import compiled, kernel, prange
from hpc_llm.kernels.rows import row_bias


def dropout_residual_(x, a, keep=None, scale: float = 1.0, bias=None):
    """x += a * keep * scale (keep: the dropout's kept flags, None: no dropout), in place; returns x. On a device
    one kernel (cuda/dropout_residual.cu). bias: a += bias first (the branch layer's bias folded in); on the host
    without dropout one pass x += (a + bias), which leaves a as it was."""
    flat = x.flags.c_contiguous and a.flags.c_contiguous and a.shape == x.shape
    xp = array_module(x)
    if device.on_device(xp) and flat and (keep is None or keep.flags.c_contiguous):
        return device.dropout_residual_(xp, x, a, keep, scale, dropout_residual_numpy, bias)
    if bias is not None and keep is None and flat and _fused_bias(x, a, bias):
        C = x.shape[-1]
        _residual_add_bias(x.reshape(-1, C), a.reshape(-1, C), bias)
        return x
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


def _fused_bias(x, a, bias) -> bool:
    """Whether the host's pass x += (a + bias) runs: a bias over x's last axis, one dtype, the pool's kernel."""
    return a.dtype == x.dtype and row_bias(x, bias) and compiled(_residual_add_bias, x, a, bias)


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


@kernel(auto="pool", pool=True)
def _residual_add_bias(x, a, b):
    # the twin's a += b, then x += a: the same two float32 additions per element
    N, C = x.shape
    for r in prange(N):
        for j in range(C):
            x[r, j] += a[r, j] + b[j]
