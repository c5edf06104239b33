"""NumPy's own passes over a layer's rows as pool kernels: a bias added to every row, sums over the rows (a bias's
gradient, LayerNorm's weight gradients), the embedding's scatter-add into token rows, attention's copies between
positions and heads; and the float64 row sums over 8 running sums the row kernels share.

NumPy runs these passes on one core while the shared pool's other threads wait (kernels/pool.py). The compiled
kernels do NumPy's arithmetic in NumPy's order, so they are bitwise its passes: a row add is one addition per
element; NumPy sums a C-contiguous (N, C) array over axis 0 (and einsum "ni,ni->i") row after row into each column,
and `add.at` adds its rows in index order, which the kernels keep, splitting the columns over the threads; and a
copy is a copy (the scaling of q folded into it is the same one multiplication).
With the pool off they are not used (`auto="pool"`), except the bias add, the scatter-add and the sums of a product
with a bf16 array, which beat NumPy on one thread too (`auto=True`; 6 x 384, one thread: the bias add 0.04-0.17
against 0.10-0.35 ms, the scatter-add 0.33 against 4.8 ms: NumPy's `add.at` is a slow generic loop).

Their inner loops index whole rows with unsigned integers (np.uint64): numba then emits no wraparound for negative
indices there, and LLVM vectorizes the loop (a row's slice made per row cost as much as the 64 columns' sums: the
sums over rows 2.5-3x faster at 768 rows; the same operations, bitwise).
"""

from __future__ import annotations

import numpy as np

from hpc_llm.backend import array_module
from hpc_llm.kernels.dispatch import compiled, kernel, prange
from hpc_llm.kernels.rounding import bf16_widen

# columns per parallel iteration of a sum over rows or the scatter-add: a block's sums stay in L1 as the rows stream by
COLUMN_BLOCK = 64


@kernel(inline="always")
def sum_lanes(v, n):
    """The float64 sum of v[0:n] over 8 running sums (a sequential float64 sum is bound by the add's latency, 4
    cycles an element); within n u64 of the exact sum, far inside the float32 bounds the row kernels state."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    m = n - n % 8
    for i in range(0, m, 8):
        a0 += v[i]
        a1 += v[i + 1]
        a2 += v[i + 2]
        a3 += v[i + 3]
        a4 += v[i + 4]
        a5 += v[i + 5]
        a6 += v[i + 6]
        a7 += v[i + 7]
    s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    for i in range(m, n):
        s += v[i]
    return s


@kernel(inline="always")
def sumsq_lanes(v, n, mean):
    """The float64 sum of (v[i] - mean)^2 over i < n, as sum_lanes sums."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    m = n - n % 8
    for i in range(0, m, 8):
        d0, d1, d2, d3 = v[i] - mean, v[i + 1] - mean, v[i + 2] - mean, v[i + 3] - mean
        d4, d5, d6, d7 = v[i + 4] - mean, v[i + 5] - mean, v[i + 6] - mean, v[i + 7] - mean
        a0 += d0 * d0
        a1 += d1 * d1
        a2 += d2 * d2
        a3 += d3 * d3
        a4 += d4 * d4
        a5 += d5 * d5
        a6 += d6 * d6
        a7 += d7 * d7
    s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    for i in range(m, n):
        d = v[i] - mean
        s += d * d
    return s


@kernel(inline="always")
def dot_lanes(u, v, n):
    """The float64 sum of u[i] * v[i] (each product in the arrays' dtype) over i < n, as sum_lanes sums."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    m = n - n % 8
    for i in range(0, m, 8):
        a0 += u[i] * v[i]
        a1 += u[i + 1] * v[i + 1]
        a2 += u[i + 2] * v[i + 2]
        a3 += u[i + 3] * v[i + 3]
        a4 += u[i + 4] * v[i + 4]
        a5 += u[i + 5] * v[i + 5]
        a6 += u[i + 6] * v[i + 6]
        a7 += u[i + 7] * v[i + 7]
    s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    for i in range(m, n):
        s += u[i] * v[i]
    return s


def _pool_2d(k, *arrays) -> bool:
    """Whether pool kernel k runs on these NumPy arrays: compiled under the current choice, each C-contiguous."""
    return compiled(k, *arrays) and all(a.flags.c_contiguous for a in arrays)


def row_bias(x, b) -> bool:
    """Whether b is a bias over x's rows: x's dtype, over its last axis, x at least 2-D (what the fused bias passes
    take)."""
    return b.dtype == x.dtype and b.shape == x.shape[-1:] and x.ndim >= 2


def add_rows_(x2, b):
    """x2 (N, C) += b (C,) per row, in place; returns x2."""
    if x2.ndim == 2 and b.dtype == x2.dtype and _pool_2d(_add_rows, x2, b):
        _add_rows(x2, b)
    else:
        x2 += b
    return x2


@kernel(auto=True, pool=True)
def _add_rows(x, b):
    N, C = x.shape
    for r in prange(N):
        xr = x[r]
        for j in range(np.uint64(C)):
            xr[j] += b[j]


def column_sums_into(x2, out, accumulate: bool, y2=None) -> None:
    """out (=|+=) the sum of x2's rows (N, C) -> (C,), or with y2 that of x2 * y2 (einsum "ni,ni->i"); bitwise
    NumPy's."""
    dot = y2 is not None
    same = out.dtype == x2.dtype and (not dot or y2.dtype == x2.dtype)
    if x2.ndim == 2 and same and _pool_2d(_column_sums, x2, out, y2 if dot else x2):
        s = np.empty_like(out) if accumulate else out
        if dot:
            _column_dots(x2, y2, s)
        else:
            _column_sums(x2, s)
        if accumulate:
            out += s
    elif dot:
        s = array_module(x2).einsum("ni,ni->i", x2, y2)
        if accumulate:
            out += s
        else:
            out[...] = s
    elif accumulate:
        out += x2.sum(axis=0)
    else:
        x2.sum(axis=0, out=out)


@kernel(auto="pool", pool=True)
def _column_sums(x, out):
    N, C = x.shape
    for blk in prange((C + COLUMN_BLOCK - 1) // COLUMN_BLOCK):
        a = blk * COLUMN_BLOCK
        b = min(a + COLUMN_BLOCK, C)
        # the block's running sums in a local array (into `out` itself, each add would wait on the last store);
        # NumPy's order: the first row, then each next one added
        acc, ua, w = x[0, a:b].copy(), np.uint64(a), np.uint64(b - a)
        for r in range(1, N):
            xr = x[r]
            for j in range(w):
                acc[j] += xr[ua + j]
        out[a:b] = acc


@kernel(auto="pool", pool=True)
def _column_dots(x, y, out):
    # einsum's order: from zero, each row's products added
    N, C = x.shape
    for blk in prange((C + COLUMN_BLOCK - 1) // COLUMN_BLOCK):
        a = blk * COLUMN_BLOCK
        b = min(a + COLUMN_BLOCK, C)
        acc, ua, w = np.zeros(b - a, out.dtype), np.uint64(a), np.uint64(b - a)
        for r in range(N):
            xr, yr = x[r], y[r]
            for j in range(w):
                acc[j] += xr[ua + j] * yr[ua + j]
        out[a:b] = acc


def column_dot_and_sums_into(x2, y2, dots, sums, accumulate: bool) -> bool:
    """column_sums_into(x2, dots, accumulate, y2) and column_sums_into(x2, sums, accumulate) in one pass over x2
    (LayerNorm's two weight gradients from its output gradient) where the pool's kernel runs, bitwise the two; False
    elsewhere, nothing done."""
    same = x2.ndim == 2 and x2.dtype == y2.dtype == dots.dtype == sums.dtype
    if not (same and x2.shape == y2.shape and _pool_2d(_column_dot_sums, x2, y2, dots, sums)):
        return False
    d, s = (np.empty_like(dots), np.empty_like(sums)) if accumulate else (dots, sums)
    _column_dot_sums(x2, y2, d, s)
    if accumulate:
        dots += d
        sums += s
    return True


@kernel(auto="pool", pool=True)
def _column_dot_sums(x, y, dots, sums):
    N, C = x.shape
    for blk in prange((C + COLUMN_BLOCK - 1) // COLUMN_BLOCK):
        a = blk * COLUMN_BLOCK
        b = min(a + COLUMN_BLOCK, C)
        # _column_dots' and _column_sums' orders: the products' sums from zero, the plain sums from the first row
        acc, tot = np.zeros(b - a, dots.dtype), x[0, a:b].copy()
        ua, w = np.uint64(a), np.uint64(b - a)
        x0, y0 = x[0], y[0]
        for j in range(w):
            acc[j] += x0[ua + j] * y0[ua + j]
        for r in range(1, N):
            xr, yr = x[r], y[r]
            for j in range(w):
                acc[j] += xr[ua + j] * yr[ua + j]
                tot[j] += xr[ua + j]
        dots[a:b] = acc
        sums[a:b] = tot


def column_dot_bf16_into(x2, out, accumulate: bool, y2) -> bool:
    """column_sums_into(x2, out, accumulate, y2) for float32 x2 and out and a bfloat16 y2 read as it is (each value
    widened as it is read: bitwise the sums of the widened y2) where the compiled kernel runs, on one thread too
    (`auto=True`: 0.09-0.14 against the widening and einsum's 0.16 ms at 2048 x 384); False elsewhere."""
    if not (y2.dtype.name == "bfloat16" and x2.dtype == out.dtype == np.float32 and x2.ndim == 2):
        return False
    bits = y2.view(np.uint16) if y2.flags.c_contiguous else None
    if bits is None or not _pool_2d(_column_dot_bf16, x2, out, bits):
        return False
    s = np.empty_like(out) if accumulate else out
    _column_dot_bf16(x2, bits, s)
    if accumulate:
        out += s
    return True


@kernel(auto=True, pool=True)
def _column_dot_bf16(x, y, out):
    N, C = x.shape
    for blk in prange((C + COLUMN_BLOCK - 1) // COLUMN_BLOCK):
        a = blk * COLUMN_BLOCK
        b = min(a + COLUMN_BLOCK, C)
        acc, yw = np.zeros(b - a, out.dtype), np.empty(b - a, np.float32)
        ua, w = np.uint64(a), np.uint64(b - a)
        for r in range(N):
            xr, yr = x[r], y[r]
            # the row's block widened first: the sums' loop as the float32 kernel's
            for j in range(w):
                yw[j] = bf16_widen(yr[ua + j])
            for j in range(w):
                acc[j] += xr[ua + j] * yw[j]
        out[a:b] = acc


def scatter_add_rows_(table, idx, rows) -> None:
    """table[idx[i]] += rows[i] for each i in order (np.add.at's), in place; idx (N,) ints, rows (N, C)."""
    if (
        rows.ndim == 2
        and rows.dtype == table.dtype
        and _pool_2d(_scatter_add_rows, rows, table)
        and idx.dtype.kind == "i"
        and (idx.size == 0 or (idx.min() >= 0 and idx.max() < table.shape[0]))
    ):
        _scatter_add_rows(table, np.ascontiguousarray(idx), rows)
    else:
        np.add.at(table, idx, rows)


@kernel(auto=True, pool=True)
def _scatter_add_rows(table, idx, rows):
    N, C = rows.shape
    nb = (C + COLUMN_BLOCK - 1) // COLUMN_BLOCK
    for blk in prange(nb):
        a = blk * COLUMN_BLOCK
        b = min(a + COLUMN_BLOCK, C)
        ua, w = np.uint64(a), np.uint64(b - a)
        for i in range(N):
            tr, rr = table[idx[i]], rows[i]
            for j in range(w):
                tr[ua + j] += rr[ua + j]


def to_heads(x, n_head: int, parts: int, scale0: float = 1.0):
    """(B, T, parts * n_head * hd) -> one contiguous (parts, B, n_head, T, hd) copy, part 0 multiplied by scale0 (1:
    a plain copy; else NumPy's `part *= scale0` after the copy, bitwise)."""
    xp = array_module(x)
    B, T, width = x.shape
    src = x.reshape(B, T, parts, n_head, width // parts // n_head)
    if compiled(_to_heads, x) and x.dtype.kind == "f" and x.dtype.itemsize >= 4:
        out = np.empty((parts, B, n_head, T, src.shape[-1]), x.dtype)
        _to_heads(src, out, _part_scales(parts, scale0, x.dtype))
        return out
    out = xp.ascontiguousarray(src.transpose(2, 0, 3, 1, 4))
    if scale0 != 1.0:
        out[0] *= scale0
    return out


def from_heads(xh, scale0: float = 1.0):
    """(parts, B, n_head, T, hd) -> one contiguous (B, T, parts * n_head * hd) copy, part 0 multiplied by scale0 as
    to_heads does."""
    xp = array_module(xh)
    P, B, H, T, hd = xh.shape
    if compiled(_from_heads, xh) and xh.dtype.kind == "f" and xh.dtype.itemsize >= 4:
        out = np.empty((B, T, P, H, hd), xh.dtype)
        _from_heads(xh, out, _part_scales(P, scale0, xh.dtype))
        return out.reshape(B, T, P * H * hd)
    if scale0 != 1.0:
        xh[0] *= scale0
    return xp.ascontiguousarray(xh.transpose(1, 3, 0, 2, 4)).reshape(B, T, P * H * hd)


def _part_scales(parts: int, scale0: float, dtype):
    s = np.ones(parts, dtype)
    s[0] = scale0
    return s


@kernel(auto="pool", pool=True)
def _to_heads(src, out, scale):
    B, T, P, H, hd = src.shape
    # each iteration writes one head's (T, hd) block, contiguous
    for pbh in prange(P * B * H):
        p, b, h = pbh // (B * H), pbh // H % B, pbh % H
        s = scale[p]
        for t in range(T):
            for e in range(hd):
                out[p, b, h, t, e] = src[b, t, p, h, e] * s


@kernel(auto="pool", pool=True)
def _from_heads(src, out, scale):
    B, T, P, H, hd = out.shape
    for bt in prange(B * T):
        b, t = bt // T, bt % T
        for p in range(P):
            s = scale[p]
            for h in range(H):
                for e in range(hd):
                    out[b, t, p, h, e] = src[p, b, h, t, e] * s
