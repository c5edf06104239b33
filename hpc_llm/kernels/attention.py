"""Fused (flash-style) causal attention: the device path's attention core, and its NumPy twin.

The twin is the arithmetic of cuda/attention.cu, tile for tile: per (row, head) and query tile of TILE rows, the key
tiles up to the causal limit, each giving scores s = q k^T, an online softmax (running maximum m, running sum l,
the output rescaled by exp(m_old - m_new)) and out += round(p * dropout) v; at the end out / l and the per-row
logsumexp m + log l, kept for backward. No score or probability matrix is kept. Backward in three passes: D = the
row sums of dy * out, then per key tile dk and dv, then per query tile dq, each recomputing p = exp(s - logsumexp).
The kernel sums its dot products in another order than NumPy's matmul and uses CUDA's expf: equal within float32
rounding, not bitwise (the bound: tests/kernels/test_attention.py).

Operands and layouts: qkv (B, T, 3C) as the qkv linear makes it (C = heads x head size of this rank), read in place;
q is scaled by 1/sqrt(head size) and, like k and v, rounded to the compute format (model/precision.py) as it is
loaded; y (B, T, C) and dqkv (B, T, 3C) are written in place too (no head-split copies).

Dropout on the probabilities is a counter-based hash, not the host's PCG64 (a kernel cannot draw from it):
Philox4x32-10 (Salmon et al., SC11; Random123's constants) with the counter (key position // 4, query position,
global head, global row) and a key derived from (seed, step, micro-batch, site) by Philox itself; word key position
% 4 of the result, kept iff it is >= round(p 2^32). A pure function of the same things the host's masks are, so any
tensor-, sequence- or data-parallel layout draws the single process's masks. The CPU path keeps its PCG64 masks
(layers.DropoutRNG): the device path's masks are other draws of the same distribution (docs/planning.md).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from hpc_llm.backend import array_module

TILE = 32  # query and key rows per tile: cuda/attention.cu's TILE
MAX_HEAD_DIM = 256  # the kernel's register tile bound; larger heads run the twin
PRODUCT_CHUNK = (
    64  # the columns of an hd-wide tile product per pass on tensor cores: cuda/attention.cu's CH
)


def tensor_core_products(precision: str, head_dim: int) -> bool:
    """Whether cuda/attention.cu multiplies its tiles on tensor cores (its tensor_cores(mode, hd)): a 16-bit compute
    format (bf16, fp16) and a head size that is a multiple of 16; else scalar float32 loops."""
    return precision in ("bf16", "fp16") and head_dim % 16 == 0


_M = (0xD2511F53, 0xCD9E8D57)
_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF
KEY_TAG = 0xA77E  # the key derivation's fourth counter word: attention's dropout


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, xp=np):
    """Philox4x32-10 of the counters (broadcastable uint32 arrays or ints) under the key (k0, k1): four uint32
    arrays. In uint64 so that the 32 x 32 products are exact."""
    u = np.uint64
    c = [xp.asarray(x, dtype=u) for x in (c0, c1, c2, c3)]
    for r in range(10):
        if r:
            k0, k1 = (k0 + _W[0]) & _MASK32, (k1 + _W[1]) & _MASK32
        p0, p1 = c[0] * u(_M[0]), c[2] * u(_M[1])
        c = [
            (p1 >> u(32)) ^ c[1] ^ u(k0),
            p1 & u(_MASK32),
            (p0 >> u(32)) ^ c[3] ^ u(k1),
            p0 & u(_MASK32),
        ]
    return [x.astype(np.uint32) for x in c]


class AttnDropout(NamedTuple):
    """Dropout on attention's probabilities as the kernels take it: p, the Philox key, the keep threshold, the
    scale 1 / (1 - p), the global row of each batch row, and this rank's first global head."""

    p: float
    key: tuple[int, int]
    threshold: int
    scale: float
    rows: tuple[int, ...]
    head0: int


def dropout_key(seed: int, step: int, micro: int, site: int) -> tuple[int, int]:
    """The Philox key of one dropout site's attention masks in one micro-batch."""
    s = seed % (1 << 64)
    ctr = (step & _MASK32, micro & _MASK32, site & _MASK32, KEY_TAG)
    w = philox4x32(*ctr, s & _MASK32, s >> 32)
    return int(w[0]), int(w[1])


def attention_dropout(rng, p: float) -> AttnDropout | None:
    """The dropout of a layers.DropoutRNG site (its for_heads view under tensor parallelism), or None for p = 0."""
    if p == 0.0:
        return None
    seed, _, step, micro = rng.key
    h0 = rng.heads[0] if rng.heads else 0
    thr = min(_MASK32, round(p * 2.0**32))
    key = dropout_key(seed, step, micro, rng.site_index)
    return AttnDropout(p, key, thr, 1.0 / (1.0 - p), tuple(rng.rows), h0)


def keep_tile(xp, drop: AttnDropout, heads: int, q0: int, q1: int, k0: int, k1: int):
    """The kept flags (B, heads, q1 - q0, k1 - k0) of queries [q0, q1) and keys [k0, k1)."""
    g0, g1 = k0 // 4, (k1 + 3) // 4
    rows = np.asarray(drop.rows, dtype=np.uint32)[:, None, None, None]
    hs = (drop.head0 + np.arange(heads, dtype=np.uint32))[None, :, None, None]
    qs = np.arange(q0, q1, dtype=np.uint32)[None, None, :, None]
    gs = np.arange(g0, g1, dtype=np.uint32)[None, None, None, :]
    words = philox4x32(gs, qs, hs, rows, *drop.key)
    w = np.stack(np.broadcast_arrays(*words), axis=-1).reshape(len(drop.rows), heads, q1 - q0, -1)
    keep = w[..., k0 - 4 * g0 : k1 - 4 * g0] >= np.uint32(drop.threshold)
    return keep if xp is np else xp.asarray(keep)


def _heads(x, n_head: int, part: int, C: int):
    """Part `part` (0 q, 1 k, 2 v) of a (B, T, 3C) array as (B, heads, T, hd) (a strided view)."""
    B, T = x.shape[:2]
    return (
        x[:, :, part * C : (part + 1) * C].reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)
    )


def _operands(qkv, n_head: int, prec):
    """q (scaled), k, v as (B, heads, T, hd) contiguous copies, rounded as the kernel loads them: each element
    rounded to the format, q's scaled and rounded again."""
    C = qkv.shape[2] // 3
    xp = array_module(qkv)
    q, k, v = (prec.round_(xp.ascontiguousarray(_heads(qkv, n_head, i, C))) for i in range(3))
    q *= np.dtype(qkv.dtype).type(1.0 / math.sqrt(C // n_head))
    return prec.round_(q), k, v


def _tiles(T: int):
    return [(a, min(a + TILE, T)) for a in range(0, T, TILE)]


def _scores(q, k, i0, i1, j0, j1):
    """q k^T of a tile, -inf where the key is after the query."""
    s = q[:, :, i0:i1] @ k[:, :, j0:j1].transpose(0, 1, 3, 2)
    if j1 - 1 > i0:  # the diagonal tile
        xp = array_module(s)
        s[..., xp.arange(j0, j1)[None, :] > xp.arange(i0, i1)[:, None]] = -np.inf
    return s


def _dropped(x, keep, drop):
    """x * kept flags * scale (dropout applied: a new array), or x itself without dropout."""
    if drop is None:
        return x
    out = x * keep
    out *= np.dtype(x.dtype).type(drop.scale)
    return out


def flash_forward(qkv, n_head: int, prec, drop: AttnDropout | None = None):
    """(y (B, T, C), logsumexp (B, heads, T)): cuda/attention.cu's attention_forward."""
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    q, k, v = _operands(qkv, n_head, prec)
    y = xp.empty((B, T, C3 // 3), dtype=qkv.dtype)
    yh = xp.empty_like(q)
    lse = xp.empty(q.shape[:3], dtype=qkv.dtype)
    for i0, i1 in _tiles(T):
        m = xp.full((B, n_head, i1 - i0), -np.inf, dtype=qkv.dtype)
        total = xp.zeros_like(m)
        acc = xp.zeros((B, n_head, i1 - i0, q.shape[3]), dtype=qkv.dtype)
        for j0, j1 in _tiles(i1):
            s = _scores(q, k, i0, i1, j0, j1)
            m_new = xp.maximum(m, s.max(axis=-1))
            alpha = xp.exp(m - m_new)
            s -= m_new[..., None]
            pr = xp.exp(s, out=s)
            total = total * alpha + pr.sum(axis=-1)
            keep = None if drop is None else keep_tile(xp, drop, n_head, i0, i1, j0, j1)
            pd = prec.round_(xp.ascontiguousarray(_dropped(pr, keep, drop)))
            acc = acc * alpha[..., None] + pd @ v[:, :, j0:j1]
            m = m_new
        yh[:, :, i0:i1] = acc / total[..., None]
        lse[:, :, i0:i1] = m + xp.log(total)
    y[...] = yh.transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)
    return y, lse


def flash_backward_dot(dy, y, n_head: int, prec):
    """D (B, heads, T): the row sums of round(dy) * y per head (the softmax backward's sum of dp * p)."""
    xp = array_module(dy)
    C = dy.shape[2]
    dyh = prec.round_(xp.ascontiguousarray(_heads(dy, n_head, 0, C)))
    return (dyh * _heads(y, n_head, 0, C)).sum(axis=-1)


def _tile_grads(q, k, v, dyh, lse, D, t, prec, drop, n_head):
    """One (query tile, key tile)'s probabilities after dropout (pd) and score gradients (ds), recomputed."""
    xp = array_module(q)
    i0, i1, j0, j1 = t
    s = _scores(q, k, i0, i1, j0, j1)
    s -= lse[:, :, i0:i1, None]
    p = xp.exp(s, out=s)
    keep = None if drop is None else keep_tile(xp, drop, n_head, i0, i1, j0, j1)
    # p itself stays unrounded for ds (the kernel's p), so without dropout the rounded pd is a copy
    pd = prec.operand(p) if drop is None else prec.round_(_dropped(p, keep, drop))
    dp = _dropped(dyh[:, :, i0:i1] @ v[:, :, j0:j1].transpose(0, 1, 3, 2), keep, drop)
    dp -= D[:, :, i0:i1, None]
    dp *= p
    return pd, prec.round_(dp)


def flash_backward_kv(dy, qkv, lse, D, n_head: int, prec, drop, dqkv) -> None:
    """dk and dv into dqkv's k and v parts: cuda/attention.cu's attention_backward_kv (per key tile, the query
    tiles that see it)."""
    xp = array_module(dy)
    C = dy.shape[2]
    q, k, v = _operands(qkv, n_head, prec)
    dyh = prec.round_(xp.ascontiguousarray(_heads(dy, n_head, 0, C)))
    tiles = _tiles(dy.shape[1])
    for j0, j1 in tiles:
        dk = xp.zeros_like(k[:, :, j0:j1])
        dv = xp.zeros_like(dk)
        for i0, i1 in (t for t in tiles if t[1] > j0):
            pd, ds = _tile_grads(q, k, v, dyh, lse, D, (i0, i1, j0, j1), prec, drop, n_head)
            dv += pd.transpose(0, 1, 3, 2) @ dyh[:, :, i0:i1]
            dk += ds.transpose(0, 1, 3, 2) @ q[:, :, i0:i1]
        _heads(dqkv, n_head, 1, C)[:, :, j0:j1] = dk
        _heads(dqkv, n_head, 2, C)[:, :, j0:j1] = dv


def flash_backward_q(dy, qkv, lse, D, n_head: int, prec, drop, dqkv) -> None:
    """dq into dqkv's q part: cuda/attention.cu's attention_backward_q (per query tile, the key tiles it sees),
    times 1/sqrt(head size) (q was scaled in forward)."""
    xp = array_module(dy)
    C = dy.shape[2]
    q, k, v = _operands(qkv, n_head, prec)
    dyh = prec.round_(xp.ascontiguousarray(_heads(dy, n_head, 0, C)))
    scale = np.dtype(dy.dtype).type(1.0 / math.sqrt(C // n_head))
    for i0, i1 in _tiles(dy.shape[1]):
        dq = xp.zeros_like(q[:, :, i0:i1])
        for j0, j1 in _tiles(i1):
            _, ds = _tile_grads(q, k, v, dyh, lse, D, (i0, i1, j0, j1), prec, drop, n_head)
            dq += ds @ k[:, :, j0:j1]
        dq *= scale
        _heads(dqkv, n_head, 0, C)[:, :, i0:i1] = dq


def flash_backward(dy, qkv, y, lse, n_head: int, prec, drop: AttnDropout | None = None):
    """dqkv (B, T, 3C) of flash_forward's (y, lse): the three passes in order."""
    xp = array_module(dy)
    D = flash_backward_dot(dy, y, n_head, prec)
    dqkv = xp.empty((*dy.shape[:2], 3 * dy.shape[2]), dtype=dy.dtype)
    flash_backward_kv(dy, qkv, lse, D, n_head, prec, drop, dqkv)
    flash_backward_q(dy, qkv, lse, D, n_head, prec, drop, dqkv)
    return dqkv
