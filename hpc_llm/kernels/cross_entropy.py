"""The softmax cross-entropy's elementwise work on a rank's slice of the logits (the vocabulary-parallel allreduces
sit between these: tensor_parallel.py).

    exp_shifted_(logits, row_max, local, mine) -> target logit, sum of exp   (logits -= max; exp; in place)
    normalize_rows_(probs, s)                                                 (probs /= s, as * (1 / s))
    cross_entropy_backward_(probs, local, mine, scale)                        ((p - onehot) * scale)

Compiled: a row at a time, its sum in float64 (the twin's pairwise in the logits' dtype) and the
C library's exp: the bound tests/kernels states.
"""

from __future__ import annotations

import numpy as np

from hpc_llm.backend import array_module
from hpc_llm.kernels.dispatch import compiled, kernel, prange


def exp_shifted_(logits, row_max, local, mine):
    """logits = exp(logits - row_max) per row, in place; returns (the target's shifted logit, 0 where the target is
    not in this slice; the rows' sums of exp), both (N,) in the logits' dtype."""
    if compiled(_exp_shifted, logits, row_max) and logits.flags.c_contiguous:
        N = logits.shape[0]
        target, s = np.empty(N, logits.dtype), np.empty(N, logits.dtype)
        _exp_shifted(logits, row_max, local, mine, target, s)
        return target, s
    xp = array_module(logits)
    logits -= row_max[:, None]
    rows = xp.arange(logits.shape[0])
    # not `* mine`: -inf * 0 is nan
    target = xp.where(mine, logits[rows, xp.where(mine, local, 0)], 0.0)
    xp.exp(logits, out=logits)
    return target, logits.sum(axis=1)


@kernel()
def _exp_shifted(logits, row_max, local, mine, target, s):
    N, V = logits.shape
    for r in range(N):
        mx = row_max[r]
        target[r] = logits[r, local[r]] - mx if mine[r] else 0.0
        acc = 0.0
        for j in range(V):
            e = np.exp(logits[r, j] - mx)
            logits[r, j] = e
            acc += e
        s[r] = acc


def normalize_rows_(probs, s):
    """probs *= 1 / s per row, in place (s is overwritten with 1 / s)."""
    xp = array_module(probs)
    xp.reciprocal(s, out=s)
    if compiled(_scale_rows, probs, s) and probs.flags.c_contiguous:
        _scale_rows(probs, s)
    else:
        probs *= s[:, None]
    return probs


@kernel(auto=True, pool=True)
def _scale_rows(x, s):
    N, V = x.shape
    for r in prange(N):
        f = s[r]
        for j in range(V):
            x[r, j] *= f


def cross_entropy_backward_(probs, local, mine, scale: float):
    """(probs - onehot(target)) * scale, in place (the target's column only where it is in this slice)."""
    if compiled(_cross_entropy_backward, probs) and probs.flags.c_contiguous:
        _cross_entropy_backward(probs, local, mine, probs.dtype.type(scale))
        return probs
    xp = array_module(probs)
    rows = xp.arange(probs.shape[0])[mine]
    probs[rows, local[mine]] -= 1.0
    probs *= scale
    return probs


@kernel(auto="pool", pool=True)
def _cross_entropy_backward(probs, local, mine, scale):
    N, V = probs.shape
    for r in prange(N):
        if mine[r]:
            probs[r, local[r]] -= 1.0
        for j in range(V):
            probs[r, j] *= scale
