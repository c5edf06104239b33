"""GELU, tanh approximation (GPT-2's), with the bias of the linear layer before it folded in.

    t = tanh(c (x + 0.044715 x^3)),  gelu(x) = 0.5 x (1 + t),  c = sqrt(2/pi)

The compiled kernels do the twin's arithmetic operation for operation in the input's dtype (the constants passed in
that dtype), so they differ from it only where the two tanh implementations do (NumPy's vectorised tanh against the
C library's, each within a few units of roundoff: the bound tests/kernels states).
"""

from __future__ import annotations

import math

import numpy as np

from hpc_llm.backend import array_module
from hpc_llm.kernels.cuda import device
from hpc_llm.kernels.dispatch import compiled, kernel, prange

GELU_C = math.sqrt(2.0 / math.pi)
# elements: a chunk of each operand stays in L2 across a chain of NumPy passes
ELEMENTWISE_CHUNK = 1 << 16


def _consts(dtype):
    t = np.dtype(dtype).type
    return (
        t(GELU_C * 0.044715),
        t(GELU_C),
        t(0.5 * 3 * 0.044715 * GELU_C),
        t(0.5 * GELU_C),
        t(1),
        t(0.5),
    )


def _flat(x) -> bool:
    return x.flags.c_contiguous


def bias_gelu_forward(x, b=None):
    """x += b (the linear layer's bias, None: none), then (gelu(x), t): t = the tanh term, the cache that spares
    backward recomputing it. x is left holding x + b (GELU's input, which backward reads)."""
    if compiled(_bias_gelu_forward, x, b) and _flat(x) and (b is None or b.dtype == x.dtype):
        out, t = np.empty_like(x), np.empty_like(x)
        C = x.shape[-1]
        bias = np.zeros(C, x.dtype) if b is None else b
        _bias_gelu_forward(
            x.reshape(-1, C), bias, out.reshape(-1, C), t.reshape(-1, C), *_consts(x.dtype)
        )
        return out, t
    if b is not None:
        x += b
    if compiled(_gelu_inner, x) and _flat(x):
        return _gelu_pool(x)
    return gelu_forward_numpy(x)


def _gelu_pool(x):
    """The twin's passes with the shared pool on: those before and after the tanh fused into one parallel kernel
    each (the same float32 operations in the same order: bitwise the twin's), NumPy's vectorised tanh between
    them on this thread (split over Python threads it waited for the pool's OpenMP thread, which spins on the
    other core after each parallel region)."""
    out, t = np.empty_like(x), np.empty_like(x)
    xf, tf, c3, c, _, _, one, half = x.reshape(-1), t.reshape(-1), *_consts(x.dtype)
    _gelu_inner(xf, tf, c3, c)
    np.tanh(tf, out=tf)
    _gelu_outer(xf, tf, out.reshape(-1), one, half)
    return out, t


@kernel(auto="pool", pool=True)
def _gelu_inner(x, t, c3, c):
    for i in prange(x.size):
        xs = x[i]
        t[i] = (xs * xs * c3 + c) * xs


@kernel(auto="pool", pool=True)
def _gelu_outer(x, t, out, one, half):
    for i in prange(x.size):
        out[i] = (t[i] + one) * x[i] * half


def gelu_forward(x, b=None):
    """(gelu(x), t), x += b first when a bias is given; on a device one fused kernel (cuda/bias_gelu.cu)."""
    xp = array_module(x)
    if device.on_device(xp):
        if b is None:
            return device.gelu_forward(xp, x, gelu_forward_numpy)
        return device.gelu_forward(xp, x, bias_gelu_forward_numpy, bias=b)
    return bias_gelu_forward(x, b)


def bias_gelu_forward_numpy(x, b):
    """x += b, then gelu_forward_numpy (the device kernel's twin with a bias)."""
    x += b
    return gelu_forward_numpy(x)


def gelu_forward_numpy(x):
    xp = array_module(x)
    out, t = xp.empty_like(x), xp.empty_like(x)
    _gelu_range(xp, x, out, t, 0, x.size)
    return out, t


def _gelu_range(xp, x, out, t, start: int, stop: int) -> None:
    """The twin's passes over the flat elements [start, stop), chunk by chunk (elementwise: any split of the range
    gives the same bits)."""
    xf, of, tf = x.reshape(-1), out.reshape(-1), t.reshape(-1)
    for a, b in _chunks(x, start, stop):
        xs, ts, os = xf[a:b], tf[a:b], of[a:b]
        _gelu_tanh(xp, xs, ts)
        xp.add(ts, 1.0, out=os)
        os *= xs
        os *= 0.5


@kernel()
def _bias_gelu_forward(x, b, out, t, c3, c, _d3, _d, one, half):
    N, C = x.shape
    for r in range(N):
        for i in range(C):
            xs = x[r, i] + b[i]
            x[r, i] = xs
            ts = np.tanh((xs * xs * c3 + c) * xs)
            t[r, i] = ts
            out[r, i] = (ts + one) * xs * half


def gelu_tanh(x):
    """gelu_forward's cache alone, bitwise: backward's tanh when it was not kept (selective recompute)."""
    if compiled(_gelu_tanh_kernel, x) and _flat(x):
        t = np.empty_like(x)
        c3, c = _consts(x.dtype)[:2]
        _gelu_tanh_kernel(x.reshape(-1), t.reshape(-1), c3, c)
        return t
    xp = array_module(x)
    t = xp.empty_like(x)
    xf, tf = x.reshape(-1), t.reshape(-1)
    for a, b in _chunks(x):
        _gelu_tanh(xp, xf[a:b], tf[a:b])
    return t


@kernel()
def _gelu_tanh_kernel(x, t, c3, c):
    for i in range(x.size):
        xs = x[i]
        t[i] = np.tanh((xs * xs * c3 + c) * xs)


def gelu_backward(dout, x, t):
    """d/dx = 0.5 (1 + t) + 0.5 (1 - t^2) x c (1 + 3 * 0.044715 x^2); written over dout, and t is consumed."""
    xp = array_module(dout)
    if device.on_device(xp):
        return device.gelu_backward(xp, dout, x, t, gelu_backward_numpy)
    same = dout.dtype == x.dtype == t.dtype
    if compiled(_gelu_backward, dout, x, t) and _flat(dout) and _flat(x) and _flat(t) and same:
        _gelu_backward(dout.reshape(-1), x.reshape(-1), t.reshape(-1), *_consts(x.dtype)[2:])
        return dout
    return gelu_backward_numpy(dout, x, t)


@kernel(auto=True, pool=True)
def _gelu_backward(dout, x, t, d3, d, one, half):
    for i in prange(x.size):
        xs, ts = x[i], t[i]
        inner = (xs * xs * d3 + d) * xs * (one - ts * ts)
        dout[i] *= ts * half + half + inner


def gelu_backward_numpy(dout, x, t):
    xp = array_module(dout)
    df, xf, tf = dout.reshape(-1), x.reshape(-1), t.reshape(-1)
    n = min(ELEMENTWISE_CHUNK, x.size) if xp.__name__ == "numpy" else x.size
    inner, sech2 = xp.empty(n, dtype=x.dtype), xp.empty(n, dtype=x.dtype)
    for a, b in _chunks(x):
        xs, ts, ds, ins, s2 = xf[a:b], tf[a:b], df[a:b], inner[: b - a], sech2[: b - a]
        xp.multiply(xs, xs, out=ins)
        ins *= 0.5 * 3 * 0.044715 * GELU_C
        ins += 0.5 * GELU_C
        ins *= xs  # 0.5 x c (1 + 3a x^2)
        xp.multiply(ts, ts, out=s2)
        xp.subtract(1.0, s2, out=s2)  # 1 - t^2
        ins *= s2
        ts *= 0.5
        ts += 0.5
        ts += ins
        ds *= ts
    return dout


def _chunks(x, start: int = 0, stop: int | None = None):
    """Flat [a, b) ranges of [start, stop) (default: all of x) for running a chain of elementwise passes chunk by
    chunk (NumPy: each pass then reads L2, not memory); one range for a GPU array."""
    n = x.size if stop is None else stop
    step = ELEMENTWISE_CHUNK if array_module(x).__name__ == "numpy" else max(n - start, 1)
    return [(a, min(a + step, n)) for a in range(start, n, step)]


def _gelu_tanh(xp, xs, ts) -> None:
    """ts = tanh(c (x + 0.044715 x^3)), computed as tanh(x (c + c 0.044715 x^2))."""
    xp.multiply(xs, xs, out=ts)
    ts *= GELU_C * 0.044715
    ts += GELU_C
    ts *= xs
    xp.tanh(ts, out=ts)
