"""Activation bytes, from the code's own shapes: what one micro-batch's forward keeps for its backward (a block's
cache, layer by layer as modules.py builds it; a chunk's: embedding, blocks, head), and what one operation
allocates on top of the caches while it runs (memory.py walks the schedule with them)."""

from __future__ import annotations

from hpc_llm.config import ModelConfig
from hpc_llm.model.layers import ELEMENTWISE_CHUNK, query_blocks

INDEX_BYTES = 8  # token ids and targets: int64 (data.get_batch)


def attention_scores(T: int) -> int:
    """Entries of the probability matrices of one head: query block [q0, q1) keeps (q1 - q0) x q1."""
    return sum((q1 - q0) * q1 for q0, q1 in query_blocks(T))


def block_cache_elems(b: int, T: int, C: int, H: int, tp: int, dropout: bool) -> dict:
    """Block.forward's cache (ln1, c_qkv, att, c_aproj, a_mask, ln2, c_fc, f, gt, c_mproj, m_mask), in elements."""
    n, nl, h = b * T * C, b * T * C // tp, H // tp
    att = b * h * attention_scores(T)
    return {
        "ln_1 xhat + rstd": n + b * T,
        "ln_1 output (qkv input)": n,
        "q, k, v split by head": 3 * nl,
        "attention probabilities": att,
        "attention dropout masks": att if dropout else 0,
        "attention output (proj input)": nl,
        "attention branch dropout mask": n if dropout else 0,
        "ln_2 xhat + rstd": n + b * T,
        "ln_2 output (fc input)": n,
        "fc output (GELU input)": 4 * nl,
        "GELU tanh": 4 * nl,
        "GELU output (proj input)": 4 * nl,
        "MLP branch dropout mask": n if dropout else 0,
    }


def block_cache_bytes(
    b: int, T: int, C: int, H: int, tp: int, dropout: bool, act: int, compute: int
) -> int:
    """LayerNorm's rstd and the dropout masks stay in the compute dtype; the rest is kept in the format."""
    total = 0
    for name, elems in block_cache_elems(b, T, C, H, tp, dropout).items():
        if name.endswith("rstd"):
            total += (elems - b * T) * act + b * T * compute
        else:
            total += elems * (compute if "mask" in name else act)
    return total


def chunk_cache_bytes(
    cfg: ModelConfig,
    tp: int,
    b: int,
    n_blocks: int,
    embedding: bool,
    head: bool,
    act: int = 4,
    recompute: str = "none",
    compute: int | None = None,
) -> int:
    """Bytes of one micro-batch's cache for a chunk (Chunk.forward's (emb_cache, caches, head_cache, rng)).
    recompute "block": each block keeps only a copy of its input (b, T, C), the cache is rebuilt in backward."""
    T, C, H = cfg.block_size, cfg.n_embd, cfg.n_head
    compute = act if compute is None else compute
    drop = cfg.dropout > 0
    total = 0
    if embedding:
        total += b * T * INDEX_BYTES + (b * T * C * compute if drop else 0)  # (idx, mask)
    if recompute == "block":
        total += n_blocks * b * T * C * compute
    else:
        total += n_blocks * block_cache_bytes(b, T, C, H, tp, drop, act, compute)
    if head:
        N, Vl = b * T, cfg.padded_vocab // tp
        # (lnf = (xhat, rstd), xf2 = ln_f's output, ce = (probabilities, local targets, mask), shape)
        total += act * 2 * N * C + compute * (N + N * Vl) + N * INDEX_BYTES + N
    return total


# -- what one operation allocates on top of the caches ---------------------------------------------------------


def block_backward_work(
    b: int, T: int, C: int, H: int, tp: int, act: int, grad: int, accumulate: bool, dropout: bool
) -> int:
    """Peak extra bytes inside Block.backward: its locals (dg, dh2, dy, dqkv, dh1) live until it returns, on top of
    the running gradient dx; each phase adds its own temporaries (LayerNorm's dxhat and xhat * mean, the attention
    backward's dyh, dqkvh, per-block datt and its final transposed copy, `out += a @ b` when accumulating)."""
    n, nl, h, hd = b * T * C, b * T * C // tp, H // tp, C // H
    blocks = query_blocks(T)
    wtemp = lambda rows, cols: rows * cols * grad if accumulate else 0  # noqa: E731
    masks = 2 * n if dropout else 0  # dm, da: copies of dx
    dg = 4 * nl  # d(GELU output) = d(fc output), in place
    gelu_tmp = 2 * min(ELEMENTWISE_CHUNK, 4 * nl)
    ln_tmp = 2 * n  # dxhat and xhat * mean_dx
    big_att = max((q1 - q0) * q1 for q0, q1 in blocks) * b * h
    # datt (+ an accumulate temp of dv/dk), or the final transposed copy of dqkv
    att_tmp = max(
        big_att
        + b * h * max(q1 for _, q1 in blocks) * hd * (1 if accumulate or len(blocks) > 1 else 0),
        3 * nl,
    )
    phases = [
        act * (n + masks + dg)
        + max(wtemp(4 * C // tp, C), act * gelu_tmp),  # mlp_proj backward, GELU backward
        act * (n + masks + dg) + wtemp(C, 4 * C // tp),  # fc's weight gradient
        act * (n + masks + dg + n + ln_tmp),  # ln_2 backward
        act * (n + masks + dg + n + nl) + wtemp(C // tp, C),  # attn_proj backward
        act
        * (
            n + masks + dg + n + nl + nl + 3 * nl + att_tmp
        ),  # attention backward: dyh, dqkvh, then its peak
        act * (n + masks + dg + n + nl + 3 * nl) + wtemp(C, 3 * C // tp),  # qkv's weight gradient
        act * (n + masks + dg + n + nl + 3 * nl + n + ln_tmp),  # ln_1 backward
    ]
    return max(phases)


def block_forward_work(b: int, T: int, C: int, H: int, tp: int, act: int) -> int:
    """Peak extra bytes of Block.forward beyond what it keeps: the residual stream, the fused qkv output (deleted
    after the head split) and the head-major attention output before its merge."""
    n, nl = b * T * C, b * T * C // tp
    return act * (n + 3 * nl + nl)


def head_backward_work(
    b: int, T: int, C: int, V: int, tp: int, act: int, grad: int, accumulate: bool
) -> int:
    """Head.backward: wte's gradient with `out += dlogits.T @ xf2` (a temporary of wte's shard), then dx (N, C) and
    ln_f's backward temporaries."""
    n = b * T * C
    return max(V // tp * C * grad if accumulate else 0, act * 3 * n)
