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
from hpc_llm.kernels.rounding import bf16_round, bf16_widen
from hpc_llm.kernels.rows import add_rows_, row_bias

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
    if compiled(_gelu_inner, x) and _flat(x) and (b is None or row_bias(x, b)):
        return _gelu_pool(x, b)
    if b is not None and row_bias(x, b) and _flat(x):
        add_rows_(x.reshape(-1, x.shape[-1]), b)  # NumPy's x += b (compiled where it pays)
    elif b is not None:
        x += b
    return gelu_forward_numpy(x)


def _gelu_pool(x, b=None):
    """The twin's passes with the shared pool on: those before and after the tanh fused into one parallel kernel
    each (the same float32 operations in the same order, the bias add included: bitwise the twin's), NumPy's
    vectorised tanh between them on this thread (split over Python threads it waited for the pool's OpenMP thread,
    which spins on the other core after each parallel region)."""
    out, t = np.empty_like(x), np.empty_like(x)
    xf, tf, c3, c, _, _, one, half = x.reshape(-1), t.reshape(-1), *_consts(x.dtype)
    if b is None:
        _gelu_inner(xf, tf, c3, c)
    else:
        C = x.shape[-1]
        _bias_gelu_inner(x.reshape(-1, C), b, t.reshape(-1, C), c3, c)
    np.tanh(tf, out=tf)
    _gelu_outer(xf, tf, out.reshape(-1), one, half)
    return out, t


@kernel(auto="pool", pool=True)
def _gelu_inner(x, t, c3, c):
    for i in prange(x.size):
        xs = x[i]
        t[i] = (xs * xs * c3 + c) * xs


@kernel(auto="pool", pool=True)
def _bias_gelu_inner(x, b, t, c3, c):
    # the twin's x += b, then _gelu_inner's operations
    N, C = x.shape
    for r in prange(N):
        for j in range(C):
            xs = x[r, j] + b[j]
            x[r, j] = xs
            t[r, j] = (xs * xs * c3 + c) * xs


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


# ---------------------------------------------------------------------------------------------------------------------
# bf16: GELU's kept values (its input and tanh term) and its output, the next product's operand, written as bf16 by
# the pass that makes them; backward reads them as they are. The same float32 values rounded to nearest even
# (rounding._to_bf16), so bitwise what gelu_forward / gelu_backward then rounding.to_low give.


def bias_gelu_forward_bf16(x, b, low, keep_t: bool = True):
    """x (..., C) float32 += b (None: no bias), then (x, gelu(x), t) in bfloat16 (`low`; t None unless keep_t): the
    values bias_gelu_forward and rounding.to_low of each give, bitwise, without the float32 output and tanh arrays
    or the conversion passes. None where this does not run (no numba, HPC_LLM_KERNELS=numpy, not a C-contiguous
    float32 NumPy array): the caller takes the float32 path. x is left holding x + b."""
    from hpc_llm.kernels.dispatch import kernels_choice, numba_available

    if not (type(x) is np.ndarray and x.dtype == np.float32 and _flat(x) and numba_available()):
        return None
    if (
        kernels_choice() == "numpy"
        or (b is not None and b.dtype != x.dtype)
        or low.name != "bfloat16"
    ):
        return None
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    outs = [np.empty(x.shape, dtype=low) for _ in range(3)]
    bits = [o.reshape(-1).view(np.uint16) for o in outs]
    if compiled(_bias_gelu_forward, x, b):  # the compiled forward's arithmetic (its tanh)
        bias = np.zeros(C, x.dtype) if b is None else b
        c3, c, _d3, _d, one, half = _consts(x.dtype)
        fb, gb, tb = (q.reshape(-1, C) for q in bits)
        _bias_gelu_forward_bf16(x2, bias, fb, gb, tb, keep_t, c3, c, one, half)
    elif compiled(_gelu_inner, x) and (b is None or row_bias(x, b)):
        # the pool's passes (_gelu_pool: the bias added in the first), the last one rounding
        t = np.empty_like(x2)
        c3, c = _consts(x.dtype)[:2]
        if b is None:
            _gelu_inner(x2.reshape(-1), t.reshape(-1), c3, c)
        else:
            _bias_gelu_inner(x2, b, t, c3, c)
        np.tanh(t, out=t)
        _gelu_finish_bf16(x2.reshape(-1), t.reshape(-1), *bits, keep_t)
    else:
        _gelu_rows_bf16(x2, b, bits, keep_t)
    return outs[0], outs[1], outs[2] if keep_t else None


def _gelu_rows_bf16(x2, b, bits, keep_t: bool) -> None:
    """bias_gelu_forward_bf16 with the twin's arithmetic (NumPy's tanh), a chunk of rows at a time
    (in L2): the bias and tanh's argument in one compiled pass (the twin's operations), NumPy's tanh, then the rest
    and the rounding in one compiled pass."""
    C = x2.shape[1]
    N, rows = x2.shape[0], max(1, ELEMENTWISE_CHUNK // C)
    scratch = np.empty(min(rows, N) * C, x2.dtype)
    fb, gb, tb = bits
    c3, c = _consts(x2.dtype)[:2]
    bias = np.zeros(1, x2.dtype) if b is None else b
    for a in range(0, N, rows):
        z = min(a + rows, N)
        xs = x2[a:z]
        xf, ts = xs.reshape(-1), scratch[: (z - a) * C]
        _bias_gelu_arg(xs, bias, b is not None, ts.reshape(xs.shape), c3, c)
        np.tanh(ts, out=ts)
        _gelu_finish_bf16(xf, ts, fb[a * C : z * C], gb[a * C : z * C], tb[a * C : z * C], keep_t)


@kernel(nogil=True)
def _bias_gelu_forward_bf16(x, b, fbits, gbits, tbits, keep_t, c3, c, one, half):
    N, C = x.shape
    for r in range(N):
        for i in range(C):
            xs = x[r, i] + b[i]
            x[r, i] = xs
            ts = np.tanh((xs * xs * c3 + c) * xs)
            fbits[r, i] = bf16_round(xs)
            gbits[r, i] = bf16_round((ts + one) * xs * half)
            if keep_t:
                tbits[r, i] = bf16_round(ts)


@kernel(nogil=True)
def _bias_gelu_arg(x, b, has_bias, t, c3, c):
    # the twin's x += b, then t = x * x, *= c3, += c, *= x (in float32)
    N, C = x.shape
    for r in range(N):
        for i in range(C):
            xs = x[r, i] + b[i] if has_bias else x[r, i]
            x[r, i] = xs
            t[r, i] = (xs * xs * c3 + c) * xs


@kernel(pool=True)
def _gelu_finish_bf16(x, t, fbits, gbits, tbits, keep_t):
    # the twin's out = (t + 1) * x * 0.5, in float32
    one, half = np.float32(1.0), np.float32(0.5)
    for i in prange(x.size):
        xs, ts = x[i], t[i]
        fbits[i] = bf16_round(xs)
        gbits[i] = bf16_round((ts + one) * xs * half)
        if keep_t:
            tbits[i] = bf16_round(ts)


def gelu_backward_bf16(dout, f, t, narrow: bool):
    """gelu_backward from GELU's input f and tanh term t kept in bfloat16 (read as they are, not widened first):
    narrow, the input gradient in bfloat16 (a new array of f's dtype: bitwise rounding.to_low of gelu_backward's),
    else written over dout (float32) as gelu_backward writes it. None where the compiled kernel does not run (the
    caller widens f and t and takes gelu_backward)."""
    arrays = (dout, f, t)
    if not (compiled(_gelu_backward, dout, f, t) and all(_flat(a) for a in arrays)):
        return None
    if dout.dtype != np.float32 or f.dtype != t.dtype or f.dtype.name != "bfloat16":
        return None
    d3, d, one, half = _consts(np.float32)[2:]
    fb, tb = f.reshape(-1).view(np.uint16), t.reshape(-1).view(np.uint16)
    out = np.empty(dout.shape if narrow else 1, dtype=f.dtype)
    _gelu_backward_bf16(
        dout.reshape(-1), fb, tb, out.reshape(-1).view(np.uint16), narrow, d3, d, one, half
    )
    return out if narrow else dout


@kernel(pool=True)
def _gelu_backward_bf16(dout, fbits, tbits, out, narrow, d3, d, one, half):
    for i in prange(dout.size):
        xs, ts = bf16_widen(fbits[i]), bf16_widen(tbits[i])
        inner = (xs * xs * d3 + d) * xs * (one - ts * ts)
        if narrow:
            out[i] = bf16_round(dout[i] * (ts * half + half + inner))
        else:
            dout[i] *= ts * half + half + inner
