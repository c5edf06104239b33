"""The 16-bit formats' rounding (model/precision.py): float32 values rounded to bfloat16, kept as bfloat16, and
widened back, each in one pass.

Compiled for bfloat16 on float32 arrays: round to nearest, ties to even, on the bit pattern (add 0x7FFF plus the
lowest kept bit, clear the low 16 bits; a NaN becomes the quiet NaN 0x7FC0 of its sign), which is what ml_dtypes'
conversion does, so the results are bitwise the twin's (tests/kernels checks ties, NaNs, infinities and subnormals).
Other formats and dtypes take the twin (astype).
"""

from __future__ import annotations

import numpy as np

from hpc_llm.kernels.dispatch import compiled, kernel, numba_available, prange

PIECE = 1 << 18  # the twin rounds a piece at a time: no temporaries the size of x


def _bf16(low) -> bool:
    return low is not None and low.name == "bfloat16"


def round_low_(x, low):
    """x (contiguous, ours to overwrite) rounded to the format `low` (a NumPy dtype; None: no rounding), in place."""
    if low is None:
        return x
    if _bf16(low) and x.dtype == np.float32 and compiled(_round_bf16, x) and x.flags.c_contiguous:
        _round_bf16(x.reshape(-1).view(np.uint32))
        return x
    flat = x.reshape(-1)
    for a in range(0, flat.size, PIECE):
        flat[a : a + PIECE] = flat[a : a + PIECE].astype(low)
    return x


def to_low(x, low):
    """x stored in the format (a new array of dtype low)."""
    if _bf16(low) and x.dtype == np.float32 and compiled(_to_bf16, x) and x.flags.c_contiguous:
        out = np.empty(x.shape, dtype=low)
        _to_bf16(x.reshape(-1).view(np.uint32), out.reshape(-1).view(np.uint16))
        return out
    return x.astype(low)


def from_low(kept, dtype):
    """A kept 16-bit array back in dtype (exact: widening)."""
    if (
        _bf16(kept.dtype)
        and np.dtype(dtype) == np.float32
        and compiled(_from_bf16, kept)
        and kept.flags.c_contiguous
    ):
        out = np.empty(kept.shape, dtype=np.float32)
        _from_bf16(kept.reshape(-1).view(np.uint16), out.reshape(-1).view(np.uint32))
        return out
    return kept.astype(dtype)


def bf16_bits(x, low, out=None):
    """x's bf16 bit patterns (float32 x, C-contiguous, rounded to nearest even: exact on values already bf16) as a
    uint16 array of x's shape, into out (C-contiguous) when given. `low` is bfloat16's dtype. Compiled whenever
    numba is there, on arrays of any size: a oneDNN product's operands (kernels/gemm.py), in a run that has loaded
    the compiled rounding already."""
    out = np.empty(x.shape, dtype=np.uint16) if out is None else out
    assert x.dtype == np.float32 and out.size == x.size and out.flags.c_contiguous
    if numba_available():
        _to_bf16(x.reshape(-1).view(np.uint32), out.reshape(-1))
    else:
        out[...] = x.astype(low).view(np.uint16)
    return out


def round_into(x, out, low, bits=None):
    """out[...] = x rounded to the format `low` (float32 holding the rounded values) and, given, bits = their bf16
    bit patterns: one compiled pass for bf16 on C-contiguous float32 (bitwise round_low_ of a copy, then bf16_bits),
    else those steps."""
    arrays = (x, out) if bits is None else (x, out, bits)
    flat = all(type(a) is np.ndarray and a.flags.c_contiguous for a in arrays)
    if _bf16(low) and x.dtype == out.dtype == np.float32 and flat and compiled(_to_bf16, x):
        keep = bits is not None
        b = bits.reshape(-1) if keep else np.empty(1, np.uint16)
        _round_into(x.reshape(-1).view(np.uint32), out.reshape(-1).view(np.uint32), b, keep)
        return out
    out[...] = round_low_(x.copy(), low)
    if bits is not None:
        bf16_bits(out, low, bits)
    return out


@kernel(auto=True, pool=True)
def _round_into(x, out, bits, keep):
    for i in prange(x.size):
        u = x[i]
        if (u & 0x7FFFFFFF) > 0x7F800000:  # NaN: quiet, sign kept
            h = ((u & 0x80000000) >> 16) | 0x7FC0
        else:
            h = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
        out[i] = h << 16
        if keep:
            bits[i] = h


def sum_rows_low(x, out):
    """out (float32, C) = the sum of the rows of x (R, C), float32 or a bfloat16 array (a bf16 operand: the
    layers' bias gradients), in float32: bitwise NumPy's x.astype(float32).sum(axis=0), whose order (from +0, row
    after row) the compiled kernel keeps, without the float32 copy."""
    if _bf16(x.dtype) and compiled(_sum_rows_bf16, x, out) and x.flags.c_contiguous:
        _sum_rows_bf16(x.view(np.uint16), out)
        return out
    if x.dtype != np.float32:
        x = from_low(np.ascontiguousarray(x), np.float32)
    return x.sum(axis=0, out=out)


@kernel(auto=True)
def _sum_rows_bf16(bits, out):
    # serial: split over the pool's threads by column blocks its loops stopped vectorising (3-5x slower, measured)
    row = np.empty(bits.shape[1], dtype=np.uint32)
    wide = row.view(np.float32)
    out[:] = 0.0
    for i in range(bits.shape[0]):
        for j in range(bits.shape[1]):
            row[j] = np.uint32(bits[i, j]) << 16
        for j in range(bits.shape[1]):
            out[j] += wide[j]


@kernel(auto=True, pool=True)
def _round_bf16(bits):
    # in place, one array: a second argument aliasing it kept the loop from vectorising (5x slower)
    for i in prange(bits.size):
        u = bits[i]
        if (u & 0x7FFFFFFF) > 0x7F800000:  # NaN: quiet, sign kept
            bits[i] = (u & 0x80000000) | 0x7FC00000
        else:
            bits[i] = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000


@kernel(auto=True, pool=True)
def _to_bf16(bits, out):
    for i in prange(bits.size):
        u = bits[i]
        if (u & 0x7FFFFFFF) > 0x7F800000:
            out[i] = ((u & 0x80000000) >> 16) | 0x7FC0
        else:
            out[i] = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


@kernel(auto=True, pool=True)
def _from_bf16(half, out):
    for i in prange(half.size):
        out[i] = np.uint32(half[i]) << 16


@kernel()
def bf16_widen(h):
    """A bf16 bit pattern (uint16) as the float32 value it is: for compiled kernels that read bf16."""
    return np.uint32(np.uint32(h) << np.uint32(16)).view(np.float32)


@kernel()
def bf16_round(x):
    """float32 x's bf16 bit pattern (uint16), rounded to nearest even, a NaN to the quiet NaN of its sign: _to_bf16's
    for one value, for compiled kernels that write bf16."""
    u = np.float32(x).view(np.uint32)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(((u & np.uint32(0x80000000)) >> np.uint32(16)) | np.uint32(0x7FC0))
    return np.uint16(
        (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    )


def heads_rounded(x, low, wide: bool = False, scale_first=None, merge: bool = False):
    """Attention's head layout and bfloat16 `low` rounding in one compiled pass: x (B, T, G, H, hd) C-contiguous
    float32 to (G, B, H, T, hd) (merge: the reverse, x (G, B, H, T, hd) to (B, T, G, H, hd)), C-contiguous, as a
    bfloat16 array or (wide) float32 holding the rounded values; scale_first (not with merge): the g = 0 slice
    multiplied by it first, in float32. Bitwise the transposed copy, the scaling, then to_low / round_low_. None
    where the compiled pass does not run (the caller takes those steps)."""
    if not (_bf16(low) and x.dtype == np.float32 and x.flags.c_contiguous and x.ndim == 5):
        return None
    if not compiled(_to_bf16, x) or (merge and scale_first is not None):
        return None
    a, b, c, d, e = x.shape
    shape = (b, d, a, c, e) if merge else (c, a, d, b, e)
    out = np.empty(shape, dtype=np.float32 if wide else low)
    bits = out.view(np.uint32 if wide else np.uint16)
    scale = np.float32(1.0 if scale_first is None else scale_first)
    (_heads_merge if merge else _heads_split)(x, bits, scale, wide)
    return out


@kernel(nogil=True, pool=True)
def _heads_split(x, out, scale, wide):
    # out[g, b, h, t] = x[b, t, g, h] (rows of hd), g = 0 scaled; times 1 is exact for rounding (NaNs: quiet either way)
    B, T, G, H, E = x.shape
    one = np.float32(1.0)
    for gb in prange(G * B):
        g, b = gb // B, gb % B
        s = scale if g == 0 else one
        for h in range(H):
            for t in range(T):
                for e in range(E):
                    r = bf16_round(x[b, t, g, h, e] * s)
                    if wide:
                        out[g, b, h, t, e] = np.uint32(r) << np.uint32(16)
                    else:
                        out[g, b, h, t, e] = r


@kernel(nogil=True, pool=True)
def _heads_merge(x, out, scale, wide):
    # out[b, t, g, h] = x[g, b, h, t] (rows of hd)
    G, B, H, T, E = x.shape
    for bt in prange(B * T):
        b, t = bt // T, bt % T
        for g in range(G):
            for h in range(H):
                for e in range(E):
                    r = bf16_round(x[g, b, h, t, e])
                    if wide:
                        out[b, t, g, h, e] = np.uint32(r) << np.uint32(16)
                    else:
                        out[b, t, g, h, e] = r
