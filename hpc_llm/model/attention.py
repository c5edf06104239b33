"""Causal self-attention on a fused qkv projection, as a forward/backward pair (llm.c style; model/layers.py's
conventions): on a CPU by query blocks (each block's scores only for the keys its queries can see), on a device the
fused (flash-style) kernels (kernels/cuda/fused_attention.py); and the cached attention decoding uses."""

from __future__ import annotations

import math

import numpy as np

from hpc_llm.backend import array_module
from hpc_llm.kernels import gemm
from hpc_llm.kernels.attention import attention_dropout
from hpc_llm.kernels.cuda import device, fused_attention
from hpc_llm.kernels.gemm import matmul
from hpc_llm.kernels.rounding import heads_rounded
from hpc_llm.kernels.rows import from_heads, to_heads
from hpc_llm.kernels.softmax import (
    causal_softmax_,
    causal_softmax_bf16,
    softmax_backward_,
    softmax_backward_bf16,
)
from hpc_llm.model.layers import DropoutRNG, dropout_mask
from hpc_llm.model.precision import FP32, Precision


def split_heads(qkv, n_head: int, q_scale: float = 1.0):
    """(B, T, 3C) -> one contiguous (3, B, H, T, hd) copy: q, k, v per head, ready for batched matmul; q multiplied
    by q_scale."""
    return to_heads(qkv, n_head, 3, q_scale)


def merge_heads(y):
    """(B, H, T, hd) -> (B, T, H*hd)."""
    B, H, T, hd = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * hd)


ATTN_BLOCK = 128  # query rows per block: blocks skip the keys their queries cannot see


# the device path's fused attention; False: the query-block loop on a device too (the CPU's arithmetic and masks)
FUSED_ATTENTION = True


def query_blocks(T: int) -> list[tuple[int, int]]:
    """Query ranges [q0, q1) of about ATTN_BLOCK rows, the last (which sees all keys) first. Block [q0, q1) needs keys
    [0, q1) only, so with n blocks the score matrices hold (n+1)/2n of the T*T entries a dense causal mask would."""
    n = max(1, -(-T // ATTN_BLOCK))
    edges = [round(i * T / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in reversed(range(n))]


def attention_forward(
    qkv,
    n_head: int,
    dropout: float = 0.0,
    rng=None,
    prec: Precision = FP32,
    keep_probs=True,
    narrow=False,
):
    """softmax(q k^T / sqrt(hd) + mask) v per head, by query blocks. Cache: the head-split qkv (q pre-scaled), the
    probabilities and dropout masks per block. The scale is applied to q (T*hd elements), not to the scores.
    prec: q, k, v and the probabilities are matmul operands in its format, the softmax is computed in qkv's dtype,
    and the cache is kept in the format.

    keep_probs=False (selective recompute): the cache keeps q, k, v only, (qkvh, None, None); attention_backward
    recomputes each query block's probabilities and dropout mask from them as it reaches the block (given the same
    dropout rng again, freshly made: the masks are drawn in the same order).

    narrow (for a linear layer's input only): on the host in bf16 the output may come back as a bf16 array, rounded
    in the pass that merges the heads (Precision.keep_use takes it as it is).

    On a device (with no dropout or a DropoutRNG) the fused kernels of kernels/attention.py run instead: the cache
    is then (qkv kept, None, FlashCache), and the dropout masks are its hash's, not the host's."""
    xp = array_module(qkv)
    if FUSED_ATTENTION and device.on_device(xp) and (dropout == 0.0 or isinstance(rng, DropoutRNG)):
        return fused_attention.flash_attention_forward(
            xp, qkv, n_head, prec, attention_dropout(rng, dropout)
        )
    B, T, C3 = qkv.shape
    hd = C3 // 3 // n_head
    held = _reads_low(prec, qkv, T, hd)
    qkvh = _rounded_heads(qkv.reshape(B, T, 3, n_head, hd), prec, held, 1.0 / math.sqrt(hd))
    q, k, v = qkvh[0], qkvh[1], qkvh[2]
    yh = xp.empty(q.shape, dtype=qkv.dtype)
    atts, masks = [], []
    for q0, q1 in query_blocks(q.shape[2]):
        att, mask = _probabilities(q, k, q0, q1, dropout, rng, prec, held)
        used = att if mask is None else _dropped(att, mask, prec, held)
        matmul(used, v[:, :, :q1], yh[:, :, q0:q1], False, prec)
        if keep_probs:
            atts.append(att if prec.is_low(att.dtype) else prec.keep(att))
            masks.append(mask)
    del att, mask, used
    if not keep_probs:
        atts = masks = None
    cache = (qkvh if held else prec.keep(qkvh), atts, masks)
    # narrow: the output in bf16, rounded in the pass that merges the heads (a linear layer's input only)
    got = heads_rounded(yh[None], prec.low, merge=True) if narrow and prec.low is not None else None
    if got is not None:
        return got.reshape(qkv.shape[0], qkv.shape[1], -1), cache
    return from_heads(yh[None]), cache


def _dropped(att, mask, prec: Precision, held: bool):
    """The probabilities after dropout, rounded to the format: an operand of attention's products (held: a bf16
    array, which they read as it is; the same values)."""
    dropped = mask.scaled(att)
    return prec.keep(dropped) if held else prec.round_(dropped)


def _reads_low(prec: Precision, x, T: int, hd: int) -> bool:
    """Whether attention's products on x's heads (T positions, head size hd) all take bf16 operands as they are
    (oneDNN; the smallest, the first query block's, past gemm.MIN_MACS_HELD): q, k, v and the probabilities are
    then made in bf16, once."""
    return type(x) is np.ndarray and gemm.takes_held(prec, *held_size(T, hd))


def _rounded_heads(x5, prec: Precision, held: bool, scale=None):
    """x5 (B, T, G, H, hd) in attention's head layout (G, B, H, T, hd), the g = 0 slice times scale (None: 1),
    rounded to prec's format: held, into a bf16 array (the products read it as it is), else in float32. On the
    host in bf16 one compiled pass (rounding.heads_rounded), bitwise these steps."""
    xp = array_module(x5)
    if prec.name == "bf16" and xp is np:
        got = heads_rounded(np.ascontiguousarray(x5), prec.low, not held, scale)
        if got is not None:
            return got
    B, T, G, H, hd = x5.shape
    out = to_heads(x5.reshape(B, T, G * H * hd), H, G, 1.0 if scale is None else scale)
    return prec.keep(out) if held else prec.round_(out)  # ours to round


def held_size(T: int, hd: int) -> tuple[int, int]:
    """(multiply-adds, smallest side) of attention's smallest per-head product at T positions and head size hd:
    the first query block's (what gemm.takes_held decides by; the planner too, plan/compute.py)."""
    b = query_blocks(T)[-1][1]
    return b * b * hd, min(b, hd)


def _probabilities(q, k, q0: int, q1: int, dropout: float, rng, prec: Precision, held=False):
    """Query block [q0, q1)'s attention probabilities (rounded to the format: an operand, and kept so; held and
    without dropout: a bf16 array) and its dropout mask (None without dropout): forward's, and selective
    recompute's again in backward."""
    scores = matmul(q[:, :, q0:q1], k[:, :, :q1].transpose(0, 1, 3, 2), prec=prec)
    if held and dropout == 0.0:
        got = causal_softmax_bf16(scores, prec.low) if prec.name == "bf16" else None
        return (prec.keep(causal_softmax_(scores)) if got is None else got), None
    att = rounded_softmax_(scores, prec)
    mask = None if dropout == 0.0 else dropout_mask(att.shape, att.dtype, dropout, rng)
    return att, mask


def rounded_softmax_(att, prec: Precision):
    """causal_softmax_ of a query block's scores, in place, rounded to prec's format; on a device one fused kernel
    (cuda/softmax.cu), the rounding folded in."""
    xp = array_module(att)
    if device.on_device(xp):
        return device.causal_softmax_(xp, att, prec, _rounded_softmax_)
    return _rounded_softmax_(att, prec)


def _rounded_softmax_(att, prec: Precision):
    return prec.round_(causal_softmax_(att))


def rounded_softmax_backward_(datt, att, mask, prec: Precision, held: bool = False):
    """datt = p * (datt - sum(datt * p)) per row with the dropout mask (None: none) applied to datt first, rounded
    to prec's format, in place (held: into a new bf16 array, attention's products reading it as it is); masked
    entries have p = 0 and stay 0. On a device: the mask's pass, then one fused kernel with the rounding folded in."""
    xp = array_module(datt)
    if device.on_device(xp):
        if mask is not None:
            mask.apply_(datt)
        return device.softmax_backward_(xp, datt, att, prec, _rounded_softmax_backward_)
    keep, scale = (None, 1.0) if mask is None else (mask.keep, mask.scale)
    if held and prec.name == "bf16":  # the rounding in the last pass, into bf16 (att as it is held)
        got = softmax_backward_bf16(datt, att, prec.low, keep, scale)
        if got is not None:
            return got
    att = att if att.dtype == datt.dtype else prec.use(att, datt.dtype)
    softmax_backward_(datt, att, keep, scale)
    return prec.keep(datt) if held else prec.round_(datt)


def _rounded_softmax_backward_(datt, att, prec: Precision):
    return prec.round_(softmax_backward_(datt, att))


def cached_attention_forward(qkv, n_head: int, kv, pos0):
    """Attention of new tokens (qkv of positions pos0..) over every position so far, for decoding: their keys and
    values are written into the cache kv (2, B, H, block_size, hd) first. Forward only.

    pos0: an int (every row at the same position), or per row (B,) ints: row b's new tokens are at pos0[b].., and
    each query sees the keys up to its own position only, so what a row's cache holds beyond its length (padding
    written by an earlier call) is never read before this call's writes replace it."""
    xp = array_module(qkv)
    qkvh = split_heads(qkv, n_head)
    Tn = qkv.shape[1]
    q = qkvh[0] * (1.0 / math.sqrt(qkvh.shape[-1]))
    if isinstance(pos0, (int, np.integer)):
        end = pos0 + Tn
        kv[0, :, :, pos0:end] = qkvh[1]
        kv[1, :, :, pos0:end] = qkvh[2]
        att = causal_softmax_(q @ kv[0, :, :, :end].transpose(0, 1, 3, 2))
        return xp.ascontiguousarray(merge_heads(att @ kv[1, :, :, :end]))
    pos = [int(p) for p in pos0]
    for b, p in enumerate(pos):  # each row's keys and values at its own positions
        kv[0, b, :, p : p + Tn] = qkvh[1, b]
        kv[1, b, :, p : p + Tn] = qkvh[2, b]
    end = max(pos) + Tn
    att = q @ kv[0, :, :, :end].transpose(0, 1, 3, 2)
    # (B, Tn) absolute positions of the queries
    qpos = xp.asarray(pos)[:, None] + xp.arange(Tn)[None, :]
    hidden = xp.arange(end)[None, None, :] > qpos[:, :, None]  # (B, Tn, end): keys after the query
    att[xp.broadcast_to(hidden[:, None], att.shape)] = -xp.inf
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    return xp.ascontiguousarray(merge_heads(att @ kv[1, :, :, :end]))


def attention_backward(
    dy, cache, n_head: int, prec: Precision = FP32, dropout: float = 0.0, rng=None, narrow=False
):
    """The input gradient of attention_forward. A cache without probabilities (keep_probs=False) has them
    recomputed block by block: dropout and rng as forward's (rng made afresh, to draw the same masks). narrow
    (only where the next products read bf16 arrays: Precision.reads_low): it may come back in bf16, rounded in the
    pass that lays it out."""
    xp = array_module(dy)
    if isinstance(cache[2], fused_attention.FlashCache):
        return fused_attention.flash_attention_backward(xp, dy, cache, n_head, prec)
    qkvh, atts, masks = cache
    B, T, C = dy.shape
    hd = C // n_head
    held = _reads_low(prec, qkvh, T, hd)
    qkvh = prec.gemm_use(qkvh, dy.dtype) if held else prec.use(qkvh, dy.dtype)
    q, k, v = qkvh[0], qkvh[1], qkvh[2]
    dyh = _rounded_heads(dy.reshape(B, T, 1, n_head, hd), prec, held)[0]
    dqkvh = xp.empty(qkvh.shape, dtype=dy.dtype)
    dq, dk, dv = dqkvh[0], dqkvh[1], dqkvh[2]
    blocks = query_blocks(T)
    if atts is None:
        # selective recompute: each block's probabilities and mask again, in forward's order
        kept = ((_probabilities(q, k, q0, q1, dropout, rng, prec, held)) for q0, q1 in blocks)
    else:
        kept = zip(atts, masks)
    for first, ((q0, q1), (att, mask)) in enumerate(zip(blocks, kept)):
        # the first block sees every key: it writes dk and dv whole, later blocks add
        first = first == 0
        # att: rounded (held without dropout: bf16, as the products and the softmax's backward read it), else in
        # float32 for the softmax's backward
        low = att if held and mask is None else None
        if atts is not None and low is None:
            att = prec.use(att, dy.dtype)
        used = att if mask is None else _dropped(att, mask, prec, held)
        used = used if low is None else low
        dyb = dyh[:, :, q0:q1]
        matmul(used.transpose(0, 1, 3, 2), dyb, dv[:, :, :q1], not first, prec)
        datt = matmul(dyb, v[:, :, :q1].transpose(0, 1, 3, 2), prec=prec)
        if held:
            datt = rounded_softmax_backward_(datt, att, mask, prec, held=True)
        else:
            rounded_softmax_backward_(datt, att, mask, prec)
        matmul(datt, k[:, :, :q1], dq[:, :, q0:q1], False, prec)
        matmul(datt.transpose(0, 1, 3, 2), q[:, :, q0:q1], dk[:, :, :q1], not first, prec)
    scale = 1.0 / math.sqrt(hd)  # q was pre-scaled in forward; dk used the scaled q, which is right
    if narrow and prec.low is not None:
        dq *= scale
        got = heads_rounded(dqkvh, prec.low, merge=True)
        if got is not None:
            return got.reshape(B, T, 3 * C)
        scale = 1.0
    return from_heads(dqkvh, scale)  # dq scaled as it is copied
