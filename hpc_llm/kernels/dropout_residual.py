"""A branch's dropout and the residual add after it: x += a * keep * scale, in one pass.

Compiled: the twin's arithmetic element by element in the same order (a * keep is exact, then the scale, then the
add), so the two are bitwise equal.
"""

from __future__ import annotations

from hpc_llm.kernels.dispatch import compiled, kernel


def dropout_residual_(x, a, keep=None, scale: float = 1.0):
    """x += a * keep * scale (keep: the dropout's kept flags, None: no dropout), in place; returns x."""
    flat = x.flags.c_contiguous and a.flags.c_contiguous and a.shape == x.shape
    if (
        keep is not None
        and compiled(_dropout_residual, x, a, keep)
        and flat
        and keep.flags.c_contiguous
    ):
        _dropout_residual(x.reshape(-1), a.reshape(-1), keep.reshape(-1), x.dtype.type(scale))
        return x
    if keep is None:
        x += a
        return x
    d = a * keep
    d *= scale
    x += d
    return x


@kernel(auto=True)
def _dropout_residual(x, a, keep, scale):
    for i in range(x.size):
        x[i] += a[i] * keep[i] * scale
