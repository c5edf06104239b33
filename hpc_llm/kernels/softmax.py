"""The attention core's elementwise work: the causal row softmax of a query block's scores (forward) and the
softmax's backward with the dropout mask applied first.

Compiled: a (batch, head, query) row at a time; its maximum and sum in float64 (the twin sums
pairwise in the scores' dtype) and the C library's exp (the twin NumPy's vectorised one): the bound tests/kernels
states. Masked entries are exactly 0 in both.
"""

from __future__ import annotations

import numpy as np

from hpc_llm.backend import array_module
from hpc_llm.kernels.dispatch import compiled, kernel, kernels_choice, numba_available, prange
from hpc_llm.kernels.rounding import bf16_round, bf16_widen, from_low
from hpc_llm.kernels.rows import dot_lanes, sum_lanes

_MASKS: dict = {}


def causal_mask(xp, Tq: int, Tk: int, dtype):
    """Additive mask (Tq, Tk): query i (at absolute position Tk - Tq + i) sees keys j <= its position."""
    key = (xp.__name__, Tq, Tk, str(dtype))
    if key not in _MASKS:
        i = xp.arange(Tq)[:, None] + (Tk - Tq)
        j = xp.arange(Tk)[None, :]
        _MASKS[key] = xp.where(j > i, -xp.inf, 0.0).astype(dtype)
    return _MASKS[key]


def causal_softmax_(att):
    """Row softmax of scores (..., Tq, Tk) with the causal mask (query i at position Tk - Tq + i), in place."""
    if compiled(_causal_softmax, att) and att.flags.c_contiguous:
        Tq, Tk = att.shape[-2], att.shape[-1]
        _causal_softmax(att.reshape(-1, Tq, Tk), Tk - Tq)
        return att
    if compiled(_shift_rows, att) and att.flags.c_contiguous:
        return _causal_softmax_pool(att)
    return causal_softmax_numpy_(att)


def _causal_softmax_pool(att):
    """With the shared pool on: the mask and the row maxima in one parallel pass, NumPy's vectorised exp (the
    twin's, on the same arguments: the same values), then the row
    sums (float64, as the compiled kernel's) and the scaling in a second parallel pass."""
    Tq, Tk = att.shape[-2], att.shape[-1]
    a3 = att.reshape(-1, Tq, Tk)
    _shift_rows(a3, Tk - Tq)
    np.exp(att, out=att)
    _scale_rows(a3, Tk - Tq)
    return att


@kernel(auto="pool", pool=True)
def _shift_rows(att, offset):
    G, Tq, Tk = att.shape
    for gi in prange(G * Tq):
        g, i = gi // Tq, gi % Tq
        n = min(Tk, i + offset + 1)
        row = att[g, i]
        mx = row[0]
        for j in range(1, n):
            mx = max(mx, row[j])
        # unsigned indices: the loops vectorize (rows.py)
        for j in range(np.uint64(n)):
            row[j] -= mx
        for j in range(np.uint64(n), np.uint64(Tk)):
            row[j] = -np.inf


@kernel(auto="pool", pool=True)
def _scale_rows(att, offset):
    G, Tq, Tk = att.shape
    for gi in prange(G * Tq):
        g, i = gi // Tq, gi % Tq
        n = min(Tk, i + offset + 1)
        row = att[g, i]
        inv = 1.0 / sum_lanes(row, n)
        for j in range(np.uint64(n)):
            row[j] = row[j] * inv


def causal_softmax_numpy_(att):
    xp = array_module(att)
    att += causal_mask(xp, att.shape[-2], att.shape[-1], att.dtype)
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    s = att.sum(axis=-1, keepdims=True)
    xp.reciprocal(s, out=s)
    att *= s
    return att


@kernel(pool=True)
def _causal_softmax(att, offset):
    G, Tq, Tk = att.shape
    for gi in prange(G * Tq):
        g, i = gi // Tq, gi % Tq
        row = att[g, i]
        n = min(Tk, i + offset + 1)
        mx = row[0]
        for j in range(1, n):
            mx = max(mx, row[j])
        s = 0.0
        for j in range(n):
            e = np.exp(row[j] - mx)
            row[j] = e
            s += e
        inv = 1.0 / s
        for j in range(n):
            row[j] = row[j] * inv
        for j in range(n, Tk):
            row[j] = 0.0


def softmax_backward_(datt, att, keep=None, scale: float = 1.0):
    """datt = att * (d - sum(d * att)) per row, d = datt * keep * scale (the dropout mask; keep None: none), in
    place. Masked entries have att = 0 and come out 0."""
    if (
        compiled(_softmax_backward, datt, att, keep)
        and datt.flags.c_contiguous
        and att.flags.c_contiguous
    ):
        K = datt.shape[-1]
        mask = np.ones((1, 1), np.bool_) if keep is None else keep.reshape(-1, K)
        _softmax_backward(
            datt.reshape(-1, K), att.reshape(-1, K), mask, keep is not None, datt.dtype.type(scale)
        )
        return datt
    return softmax_backward_numpy_(datt, att, keep, scale)


def softmax_backward_numpy_(datt, att, keep=None, scale: float = 1.0):
    xp = array_module(datt)
    if keep is not None:
        datt *= keep
        datt *= scale
    rowdot = xp.einsum("...j,...j->...", datt, att)[..., None]
    datt -= rowdot
    datt *= att
    return datt


@kernel(auto="pool", pool=True)
def _softmax_backward(datt, att, keep, masked, scale):
    N, K = datt.shape
    for r in prange(N):
        if masked:
            for j in range(K):
                datt[r, j] = datt[r, j] * keep[r, j] * scale
        d, p = datt[r], att[r]
        s = dot_lanes(d, p, K)
        for j in range(np.uint64(K)):
            d[j] = (d[j] - s) * p[j]


# ---------------------------------------------------------------------------------------------------------------------
# bf16: the probabilities and their gradient written as bf16 by the pass that makes them (attention's held operands,
# model/attention.py): the same float32 values rounded to nearest even, bitwise the float32 kernels then to_low


def _twin_bf16(x, low, *more) -> bool:
    """Whether the twin runs on x (C-contiguous float32 NumPy) with its last pass compiled with the rounding to
    `low` (bfloat16 only)."""
    arrays = (x, *(a for a in more if a is not None))
    if low.name != "bfloat16" or not all(
        type(a) is np.ndarray and a.flags.c_contiguous for a in arrays
    ):
        return False
    return x.dtype == np.float32 and kernels_choice() != "numpy" and numba_available()


def causal_softmax_bf16(att, low):
    """causal_softmax_(att) as a new bfloat16 (`low`) array where its twin runs (att, C-contiguous float32, used as
    scratch): the twin's passes, its last (the scaling by the sums' reciprocals) compiled with the rounding. None
    elsewhere (the caller rounds causal_softmax_'s result)."""
    if not _twin_bf16(att, low) or compiled(_causal_softmax, att):
        return None
    Tq, Tk = att.shape[-2], att.shape[-1]
    out = np.empty(att.shape, dtype=low)
    if compiled(
        _shift_rows, att
    ):  # the pool's passes (_causal_softmax_pool), the last one rounding
        a3 = att.reshape(-1, Tq, Tk)
        _shift_rows(a3, Tk - Tq)
        np.exp(att, out=att)
        _scale_rows_pool_bf16(a3, Tk - Tq, out.reshape(-1, Tq, Tk).view(np.uint16))
        return out
    att += causal_mask(np, Tq, Tk, att.dtype)
    att -= att.max(axis=-1, keepdims=True)
    np.exp(att, out=att)
    s = att.sum(axis=-1, keepdims=True)
    np.reciprocal(s, out=s)
    _scale_rows_bf16(att.reshape(-1, Tk), s.reshape(-1), out.reshape(-1, Tk).view(np.uint16))
    return out


@kernel(pool=True)
def _scale_rows_pool_bf16(att, offset, out):
    G, Tq, Tk = att.shape
    for gi in prange(G * Tq):
        g, i = gi // Tq, gi % Tq
        inv = 1.0 / sum_lanes(att[g, i], min(Tk, i + offset + 1))
        for j in range(Tk):  # past the row's keys exp(-inf) = 0, as _scale_rows leaves them
            out[g, i, j] = bf16_round(np.float32(att[g, i, j] * inv))


@kernel(pool=True)
def _scale_rows_bf16(x, s, out):
    N, K = x.shape
    for r in prange(N):
        for j in range(K):
            out[r, j] = bf16_round(x[r, j] * s[r])


def softmax_backward_bf16(datt, att, low, keep=None, scale: float = 1.0):
    """softmax_backward_(datt, att, keep, scale) as a new bfloat16 (`low`) array where its twin runs (datt and
    att C-contiguous, datt float32 and used as scratch, att float32 or the held bf16 probabilities, read as they are
    by the compiled pass): the twin's passes, its last two (less the row's dot product, times p) compiled with the
    rounding. None elsewhere."""
    held = att.dtype == low
    if not _twin_bf16(datt, low, None if held else att) or not att.flags.c_contiguous:
        return None
    K = datt.shape[-1]
    out = np.empty(datt.shape, dtype=low)
    if compiled(_softmax_backward, datt, att, keep):  # its pass, rounding as it writes
        mask = np.ones((1, 1), np.bool_) if keep is None else keep.reshape(-1, K)
        p = att.reshape(-1, K).view(np.uint16) if held else att.reshape(-1, K)
        args = (datt.reshape(-1, K), p, mask, keep is not None, datt.dtype.type(scale))
        bits = out.reshape(-1, K).view(np.uint16)
        (_softmax_backward_held_bf16 if held else _softmax_backward_bf16)(*args, bits)
        return out
    att = from_low(att, datt.dtype) if held else att
    if keep is not None:
        datt *= keep
        datt *= scale
    rowdot = np.einsum("...j,...j->...", datt, att)
    bits = out.reshape(-1, K).view(np.uint16)
    _sub_mul_bf16(datt.reshape(-1, K), rowdot.reshape(-1), att.reshape(-1, K), bits)
    return out


@kernel(pool=True)
def _sub_mul_bf16(d, rowdot, p, out):
    N, K = d.shape
    for r in prange(N):
        for j in range(K):
            out[r, j] = bf16_round((d[r, j] - rowdot[r]) * p[r, j])


@kernel(pool=True)
def _softmax_backward_bf16(datt, att, keep, masked, scale, out):
    N, K = datt.shape
    for r in prange(N):
        _backward_row_bf16(
            datt[r], att[r], keep[r] if masked else keep[0], masked, scale, out[r], K
        )


@kernel(pool=True)
def _softmax_backward_held_bf16(datt, att, keep, masked, scale, out):
    """_softmax_backward_bf16 on the probabilities' bf16 bits (uint16), each row widened first (exact): bitwise it
    on the widened probabilities."""
    N, K = datt.shape
    for r in prange(N):
        p = np.empty(K, np.float32)
        for j in range(K):
            p[j] = bf16_widen(att[r, j])
        _backward_row_bf16(datt[r], p, keep[r] if masked else keep[0], masked, scale, out[r], K)


@kernel(inline="always")
def _backward_row_bf16(d, p, keep, masked, scale, out, K):
    if masked:
        for j in range(K):
            d[j] = d[j] * keep[j] * scale
    s = dot_lanes(d, p, K)
    for j in range(K):
        out[j] = bf16_round(np.float32((d[j] - s) * p[j]))
