"""LayerNorm over the last axis: forward, and backward's input part (B) and weight part (W).

The compiled forward and B take a row at a time and accumulate a row's sums in float64 over several running sums
(the twin sums pairwise in the input's dtype): both are within a few units of the input dtype's roundoff of the exact
row statistics, the bound tests/kernels states. W (sums over rows): NumPy's, or with the shared pool NumPy's order on
its threads (kernels/rows.py, bitwise).
"""

from __future__ import annotations

import numpy as np

from hpc_llm.backend import array_module
from hpc_llm.kernels.cuda import device
from hpc_llm.kernels.dispatch import compiled, kernel, prange
from hpc_llm.kernels.rounding import bf16_round, bf16_widen, from_low
from hpc_llm.kernels.rows import (
    column_dot_and_sums_into,
    column_dot_bf16_into,
    column_sums_into,
    sum_lanes,
    sumsq_lanes,
)

LN_EPS = 1e-5


def layernorm_forward(x, w, b):
    """Returns out and the cache (xhat, rstd); rstd has shape (..., 1), xhat x's. On a device one fused kernel
    (cuda/layernorm.cu)."""
    xp = array_module(x)
    if device.on_device(xp):
        return device.layernorm_forward(xp, x, w, b, layernorm_forward_numpy)
    if compiled(_layernorm_forward, x, w, b) and x.dtype == w.dtype:
        C = x.shape[-1]
        x2 = np.ascontiguousarray(x).reshape(-1, C)
        out, xhat = np.empty_like(x2), np.empty_like(x2)
        rstd = np.empty((x2.shape[0], 1), dtype=x.dtype)
        bias = w if b is None else b
        _layernorm_forward(x2, w, bias, b is not None, out, xhat, rstd)
        lead = x.shape[:-1]
        return out.reshape(x.shape), (xhat.reshape(x.shape), rstd.reshape(*lead, 1))
    return layernorm_forward_numpy(x, w, b)


def layernorm_forward_numpy(x, w, b):
    """The twin: xhat replaces x's copy in memory, so the cache costs one activation."""
    xhat, rstd = _twin_statistics(x)
    xhat *= rstd
    out = xhat * w
    if b is not None:
        out += b
    return out, (xhat, rstd)


def _twin_statistics(x):
    """The twin's (x - mean, rstd): NumPy's row sums."""
    xp = array_module(x)
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = xp.einsum("...i,...i->...", xc, xc)[..., None]
    var *= 1.0 / x.shape[-1]
    var += LN_EPS
    rstd = xp.sqrt(var, out=var)
    xp.reciprocal(rstd, out=rstd)
    return xc, rstd


@kernel(auto="pool", pool=True)
def _layernorm_forward(x, w, b, has_bias, out, xhat, rstd):
    N, C = x.shape
    for r in prange(N):
        mean = sum_lanes(x[r], C) / C
        rs = 1.0 / np.sqrt(sumsq_lanes(x[r], C, mean) / C + LN_EPS)
        rstd[r, 0] = rs
        for i in range(C):
            h = (x[r, i] - mean) * rs
            xhat[r, i] = h
            o = xhat[r, i] * w[i]
            out[r, i] = o + b[i] if has_bias else o


def layernorm_backward_input(dout, cache, w, add_to=None):
    """B: the input gradient; dout is left as it is (W reads it). xhat on the host may be the kept bf16 copy: read
    as it is where the compiled kernel runs, else widened. On a device one fused kernel. add_to (the residual
    stream's gradient): where the compiled kernel runs, the gradient is added to it in the kernel's pass (each
    value rounded to the dtype first, so bitwise the addition after) and add_to is returned; elsewhere the new
    gradient is returned, for the caller to add."""
    xp = array_module(dout)
    if device.on_device(xp):
        return device.layernorm_backward_input(xp, dout, cache, w, layernorm_backward_input_numpy)
    xhat, rstd = cache
    kept = _bf16_kept(dout, xhat)
    xhat = xhat if kept or xhat.dtype == dout.dtype else from_low(xhat, dout.dtype)
    if (
        compiled(_layernorm_backward_input, dout, xhat, rstd, w)
        and dout.dtype == w.dtype == rstd.dtype
    ):
        C = dout.shape[-1]
        d2 = np.ascontiguousarray(dout).reshape(-1, C)
        add = _adds_into(add_to, dout)
        dx = add_to.reshape(-1, C) if add else np.empty_like(d2)
        x2, r2 = xhat.reshape(-1, C), rstd.reshape(-1, 1)
        if kept:
            _layernorm_backward_input_bf16(d2, x2.view(np.uint16), r2, w, dx, add)
        else:
            _layernorm_backward_input(d2, x2, r2, w, dx, add)
        return add_to if add else dx.reshape(dout.shape)
    if kept:
        xhat = from_low(xhat, dout.dtype)
    return layernorm_backward_input_numpy(dout, (xhat, rstd), w)


def _adds_into(add_to, dout) -> bool:
    return (
        type(add_to) is np.ndarray
        and add_to.shape == dout.shape
        and add_to.dtype == dout.dtype
        and add_to.flags.c_contiguous
    )


def _bf16_kept(dout, xhat) -> bool:
    """Whether xhat is a kept bf16 copy (C-contiguous) of float32 dout's LayerNorm, for the kernels to read."""
    return (
        xhat.dtype.name == "bfloat16"
        and dout.dtype == np.float32
        and type(xhat) is np.ndarray
        and xhat.flags.c_contiguous
    )


def layernorm_backward_input_numpy(dout, cache, w):
    xp = array_module(dout)
    xhat, rstd = cache
    C = dout.shape[-1]
    dxhat = dout * w
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    mean_d = dxhat.mean(axis=-1, keepdims=True)
    mean_dx = xp.einsum("...i,...i->...", dxhat, xhat)[..., None]
    mean_dx *= 1.0 / C
    dxhat -= mean_d
    dxhat -= xhat * mean_dx
    dxhat *= rstd
    return dxhat


@kernel(auto=True, pool=True)
def _layernorm_backward_input(dout, xhat, rstd, w, dx, add):
    N, C = dout.shape
    for r in prange(N):
        _backward_input_row(dout[r], xhat[r], rstd[r, 0], w, dx[r], C, add)


@kernel(pool=True)
def _layernorm_backward_input_bf16(dout, xhat, rstd, w, dx, add):
    """_layernorm_backward_input on xhat's bf16 bits (uint16), each row widened first (exact): bitwise it on the
    widened xhat."""
    N, C = dout.shape
    for r in prange(N):
        row = np.empty(C, np.float32)
        for i in range(C):
            row[i] = bf16_widen(xhat[r, i])
        _backward_input_row(dout[r], row, rstd[r, 0], w, dx[r], C, add)


@kernel(inline="always")
def _backward_input_row(dout, xhat, rs, w, dx, C, add):
    # add: dx += the row's gradient, each value rounded to dx's dtype first (the store's rounding), else dx = it
    # the row's sums over 4 running sums each (a single one waits on the add's latency)
    sd0 = sd1 = sd2 = sd3 = sx0 = sx1 = sx2 = sx3 = 0.0
    m = C - C % 4
    for i in range(0, m, 4):
        d0, d1 = dout[i] * w[i], dout[i + 1] * w[i + 1]
        d2, d3 = dout[i + 2] * w[i + 2], dout[i + 3] * w[i + 3]
        sd0 += d0
        sd1 += d1
        sd2 += d2
        sd3 += d3
        sx0 += d0 * xhat[i]
        sx1 += d1 * xhat[i + 1]
        sx2 += d2 * xhat[i + 2]
        sx3 += d3 * xhat[i + 3]
    sd, sdx = (sd0 + sd1) + (sd2 + sd3), (sx0 + sx1) + (sx2 + sx3)
    for i in range(m, C):
        d = dout[i] * w[i]
        sd += d
        sdx += d * xhat[i]
    mean_d = sd / C
    mean_dx = sdx / C
    # unsigned indices and no branch inside: the loops vectorize (as rows.py's)
    if add:
        for i in range(np.uint64(C)):
            d = dout[i] * w[i]
            dx[i] += dx.dtype.type((d - mean_d - xhat[i] * mean_dx) * rs)
    else:
        for i in range(np.uint64(C)):
            d = dout[i] * w[i]
            dx[i] = (d - mean_d - xhat[i] * mean_dx) * rs


def layernorm_backward_weight(dout, xhat, dw, db, accumulate: bool) -> None:
    """W: dw = sum of dout * xhat over the rows, db = sum of dout (None: no bias). xhat on the host may be the kept
    bf16 copy (read as it is by the pool's sums, else widened)."""
    C = dout.shape[-1]
    d2, x2 = dout.reshape(-1, C), xhat.reshape(-1, C)
    if xhat.dtype == dout.dtype:
        if db is not None and column_dot_and_sums_into(d2, x2, dw, db, accumulate):
            return
        column_sums_into(d2, dw, accumulate, x2)
    elif not column_dot_bf16_into(d2, dw, accumulate, x2):
        column_sums_into(d2, dw, accumulate, from_low(x2, dout.dtype))
    if db is not None:
        column_sums_into(d2, db, accumulate)


def layernorm_forward_bf16(x, w, b, low, narrow_out: bool):
    """layernorm_forward with xhat (the kept copy) and, narrow_out, out (a product's operand) in bfloat16 `low`,
    rounded where the compiled forward makes them: bitwise its float32 values then rounding.to_low. Where the twin
    runs (one thread), its statistics and then its last passes compiled with the roundings (`_finish_bf16`):
    bitwise the twin's values then rounding. None where neither is compiled (the caller takes the float32 path)."""
    if x.dtype != np.float32 or w.dtype != np.float32 or low.name != "bfloat16":
        return None
    if not compiled(_layernorm_forward, x, w, b):
        return _twin_bf16(x, w, b, low, narrow_out)
    C = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, C)
    out = np.empty(x.shape, dtype=low if narrow_out else x.dtype)
    xhat = np.empty(x.shape, dtype=low)
    rstd = np.empty((*x.shape[:-1], 1), dtype=x.dtype)
    if narrow_out:
        wide, bits = np.empty((1, 1), np.float32), out.reshape(-1, C).view(np.uint16)
    else:
        wide, bits = out.reshape(-1, C), np.empty((1, 1), np.uint16)
    xbits, bias = xhat.reshape(-1, C).view(np.uint16), w if b is None else b
    _layernorm_forward_bf16(
        x2, w, bias, b is not None, narrow_out, wide, bits, xbits, rstd.reshape(-1, 1)
    )
    return out, (xhat, rstd)


@kernel(pool=True)
def _layernorm_forward_bf16(x, w, b, has_bias, narrow, out, out_bits, xhat, rstd):
    N, C = x.shape
    for r in prange(N):
        mean = sum_lanes(x[r], C) / C
        rs = 1.0 / np.sqrt(sumsq_lanes(x[r], C, mean) / C + LN_EPS)
        rstd[r, 0] = rs
        for i in range(C):
            xhat[r, i], o = _xhat_out_bf16(np.float32((x[r, i] - mean) * rs), w[i], b[i], has_bias)
            if narrow:
                out_bits[r, i] = bf16_round(o)
            else:
                out[r, i] = o


def _twin_bf16(x, w, b, low, narrow_out: bool):
    """layernorm_forward_bf16 on the twin's statistics (None where the compiled pass does not run)."""
    if not compiled(_finish_bf16, x, w, b) or (b is not None and b.dtype != np.float32):
        return None
    C = x.shape[-1]
    xc, rstd = _twin_statistics(x)
    out = np.empty(x.shape, dtype=low if narrow_out else x.dtype)
    xhat = np.empty(x.shape, dtype=low)
    if narrow_out:
        wide, bits = np.empty((1, 1), np.float32), out.reshape(-1, C).view(np.uint16)
    else:
        wide, bits = out.reshape(-1, C), np.empty((1, 1), np.uint16)
    bias = w if b is None else b
    args = (xc.reshape(-1, C), rstd.reshape(-1, 1), w, bias, b is not None, narrow_out)
    _finish_bf16(*args, wide, bits, xhat.reshape(-1, C).view(np.uint16))
    return out, (xhat, rstd)


@kernel(auto=True)
def _finish_bf16(xc, rstd, w, b, has_bias, narrow, out, out_bits, xhat):
    """The twin's xhat *= rstd, out = xhat * w (+ b), the same float32 operations, each value rounded to bf16 as it
    is written (xhat always, out when narrow)."""
    N, C = xc.shape
    for r in range(N):
        rs = rstd[r, 0]
        for i in range(C):
            xhat[r, i], o = _xhat_out_bf16(xc[r, i] * rs, w[i], b[i], has_bias)
            if narrow:
                out_bits[r, i] = bf16_round(o)
            else:
                out[r, i] = o


@kernel(inline="always")
def _xhat_out_bf16(h, wi, bi, has_bias):
    """An element of the bf16 forward from its float32 xhat h: (xhat's bf16 bits, out = h * w (+ b) in float32).
    Scalars in, scalars out: a helper taking the arrays, inlined, put reference counting of each array in the
    serial loop (17 ms instead of ~1 for 2048 x 384, measured)."""
    o = h * wi
    return bf16_round(h), (o + bi if has_bias else o)
