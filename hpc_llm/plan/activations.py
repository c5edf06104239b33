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


def block_cache_elems(
    b: int,
    T: int,
    C: int,
    H: int,
    tp: int,
    dropout: bool,
    sp: bool = False,
    recompute: str = "none",
) -> dict:
    """Block.forward's cache (ln1, c_qkv, att, c_aproj, a_mask, ln2, c_fc, f, gt, c_mproj, m_mask), in elements.

    sp (sequence parallel): the terms replicated over the tensor-parallel group (both LayerNorms, the branch dropout
    masks, and each column-parallel linear's input, which keeps only its slice and gathers it again in backward) are
    on this rank's 1/tp of the sequence; attention's and the MLP's hidden terms are already 1/tp (local heads, local
    hidden units). recompute "selective": the probabilities and the attention dropout masks are not kept (backward
    recomputes the attention core from q, k, v)."""
    n, nl, h = b * T * C, b * T * C // tp, H // tp
    r, rows = (nl, b * T // tp) if sp else (n, b * T)  # replicated terms: the slice with sp
    att = 0 if recompute == "selective" else b * h * attention_scores(T)
    return {
        "ln_1 xhat": r,
        "ln_1 rstd": rows,
        "ln_1 output (qkv input)": r,
        "q, k, v split by head": 3 * nl,
        "attention probabilities": att,
        "attention dropout masks": att if dropout else 0,
        "attention output (proj input)": nl,
        "attention branch dropout mask": r if dropout else 0,
        "ln_2 xhat": r,
        "ln_2 rstd": rows,
        "ln_2 output (fc input)": r,
        "fc output (GELU input)": 4 * nl,
        "GELU tanh": 4 * nl,
        "GELU output (proj input)": 4 * nl,
        "MLP branch dropout mask": r if dropout else 0,
    }


def in_compute_dtype(name: str) -> bool:
    """LayerNorm's rstd and the dropout masks stay in the compute dtype; the rest is kept in the format."""
    return name.endswith("rstd") or "mask" in name


def block_cache_bytes(
    b: int,
    T: int,
    C: int,
    H: int,
    tp: int,
    dropout: bool,
    act: int,
    compute: int,
    sp: bool = False,
    recompute: str = "none",
) -> int:
    return sum(
        elems * (compute if in_compute_dtype(name) else act)
        for name, elems in block_cache_elems(b, T, C, H, tp, dropout, sp, recompute).items()
    )


def attention_recompute_bytes(b: int, T: int, H: int, tp: int, dropout: bool, compute: int) -> int:
    """recompute "selective": what attention_backward holds on top of its usual temporaries while it rebuilds the
    probabilities (and dropout masks) query block by query block, in the compute dtype: the largest block's, and the
    next one's, built while the loop's variables still hold the previous."""
    sizes = sorted(((q1 - q0) * q1 for q0, q1 in query_blocks(T)), reverse=True)
    return b * (H // tp) * sum(sizes[:2]) * compute * (2 if dropout else 1)


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
    sp: bool = False,
) -> int:
    """Bytes of one micro-batch's cache for a chunk (Chunk.forward's (emb_cache, caches, head_cache, rng)).
    recompute "block": each block keeps only a copy of its input (b, T, C), or its slice (b, T/tp, C) with sequence
    parallelism, and the cache is rebuilt in backward; "selective": block_cache_elems. sp: the embedding's dropout
    mask, ln_f and the logits' operand kept on the slice (the head gathers it again in backward)."""
    T, C, H = cfg.block_size, cfg.n_embd, cfg.n_head
    compute = act if compute is None else compute
    drop = cfg.dropout > 0
    s = tp if sp else 1  # the sequence split
    total = 0
    if embedding:
        total += b * T * INDEX_BYTES + (b * T * C // s * compute if drop else 0)  # (idx, mask)
    if recompute == "block":
        total += n_blocks * b * T * C // s * compute
    else:
        total += n_blocks * block_cache_bytes(b, T, C, H, tp, drop, act, compute, sp, recompute)
    if head:
        N, Vl = b * T, cfg.padded_vocab // tp
        # (lnf = (xhat, rstd), xf2 = ln_f's output, ce = (probabilities, local targets, mask), shape)
        total += act * 2 * N * C // s + compute * (N // s + N * Vl) + N * INDEX_BYTES + N
    return total


# -- what one operation allocates on top of the caches ---------------------------------------------------------


def block_backward_work(
    b: int,
    T: int,
    C: int,
    H: int,
    tp: int,
    act: int,
    grad: int,
    accumulate: bool,
    dropout: bool,
    sp: bool = False,
    comm16: bool = False,
    recomputed: int = 0,
) -> int:
    """Peak extra bytes inside Block.backward: its locals (dg, dh2, dy, dqkv, dh1) live until it returns, on top of
    the running gradient dx; each phase adds its own temporaries (LayerNorm's dxhat and xhat * mean, the attention
    backward's dyh, dqkvh, per-block datt and its final transposed copy, `out += a @ b` when accumulating).

    sp: dx, the masks, LayerNorm's arrays and the input gradients leaving a column-parallel layer are on the slice;
    a row-parallel layer gathers its output gradient (Comm.allgather_along: a receive buffer and the concatenated
    whole, 2 (b, T, C) at the peak, then the whole); a column-parallel one gathers its kept input again and
    reduce-scatters its whole input gradient (Comm.reduce_scatter_along: the gathered input, the gradient, its copy
    in rank order and the slice received: 3 (b, T, C) + the slice). comm16 (parallel.act_comm 16-bit): each
    tensor-parallel collective stages a 16-bit copy of its (b, T, C) buffer. recomputed: bytes the attention phase
    holds on top (recompute "selective": attention_recompute_bytes)."""
    n, nl, h, hd = b * T * C, b * T * C // tp, H // tp, C // H
    r = nl if sp else n  # the stream, the masks, LayerNorm's arrays: the slice with sp
    c16 = 2 * n if comm16 and tp > 1 else 0  # the 16-bit copy a collective sends or receives
    blocks = query_blocks(T)
    wtemp = lambda rows, cols: rows * cols * grad if accumulate else 0  # noqa: E731
    masks = 2 * r if dropout else 0  # dm, da: copies of dx
    dg = 4 * nl  # d(GELU output) = d(fc output), in place
    gelu_tmp = 2 * min(ELEMENTWISE_CHUNK, 4 * nl)
    ln_tmp = 2 * r  # dxhat and xhat * mean_dx
    big_att = max((q1 - q0) * q1 for q0, q1 in blocks) * b * h
    # datt (+ an accumulate temp of dv/dk), or the final transposed copy of dqkv
    att_tmp = max(
        big_att
        + b * h * max(q1 for _, q1 in blocks) * hd * (1 if accumulate or len(blocks) > 1 else 0),
        3 * nl,
    )
    base = act * (r + masks + dg)
    attention = base + act * (r + nl + nl + 3 * nl + att_tmp) + recomputed  # dyh, dqkvh, its peak
    if not sp:
        phases = [
            base + max(wtemp(4 * C // tp, C), act * gelu_tmp),  # mlp_proj backward, GELU backward
            base
            + wtemp(C, 4 * C // tp)
            + c16,  # fc's weight gradient (its input gradient allreduced)
            base + act * (n + ln_tmp),  # ln_2 backward
            base + act * (n + nl) + wtemp(C // tp, C),  # attn_proj backward
            attention,
            base + act * (n + nl + 3 * nl) + wtemp(C, 3 * C // tp) + c16,  # qkv's weight gradient
            base + act * (n + nl + 3 * nl + n + ln_tmp),  # ln_1 backward
        ]
        return max(phases)
    gather, scatter = act * 2 * n + c16, act * (3 * n + r) + c16  # the two collectives' peaks
    phases = [
        base + max(gather, act * n + wtemp(4 * C // tp, C), act * gelu_tmp),  # mlp_proj, GELU
        base + max(scatter, act * n + wtemp(C, 4 * C // tp)),  # fc
        base + act * (r + ln_tmp),  # ln_2 backward
        base + act * r + max(gather, act * (n + nl) + wtemp(C // tp, C)),  # attn_proj
        attention,
        base + act * (r + nl + 3 * nl) + max(scatter, act * n + wtemp(C, 3 * C // tp)),  # qkv
        base + act * (r + nl + 3 * nl + r + ln_tmp),  # ln_1 backward
    ]
    return max(phases)


def block_forward_work(
    b: int, T: int, C: int, H: int, tp: int, act: int, sp: bool = False, comm16: bool = False
) -> int:
    """Peak extra bytes of Block.forward beyond what it keeps: the residual stream, the fused qkv output (deleted
    after the head split) and the head-major attention output before its merge. sp: the stream is the slice; a
    column-parallel linear's all-gather holds 2 (b, T, C) at its peak, then the whole input beside the qkv output;
    a row-parallel one's reduce-scatter the partial product, its copy in rank order and the slice received. comm16:
    each collective stages a 16-bit copy of its (b, T, C) buffer."""
    n, nl = b * T * C, b * T * C // tp
    c16 = 2 * n if comm16 and tp > 1 else 0
    if not sp:
        return act * (n + 3 * nl + nl) + c16
    return act * (nl + max(2 * n, n + 3 * nl, 3 * nl + nl, nl + 2 * n + nl)) + c16


def head_backward_work(
    b: int,
    T: int,
    C: int,
    V: int,
    tp: int,
    act: int,
    grad: int,
    accumulate: bool,
    sp: bool = False,
    comm16: bool = False,
) -> int:
    """Head.backward: wte's gradient with `out += dlogits.T @ xf2` (a temporary of wte's shard), then dx (N, C) and
    ln_f's backward temporaries. sp: xf2 gathered again (the whole, bound until the end), dx whole until its
    reduce-scatter (a copy in rank order, the slice received), then ln_f's backward on the slice."""
    n = b * T * C
    c16 = 2 * n if comm16 and tp > 1 else 0
    wtemp = V // tp * C * grad if accumulate else 0
    if not sp:
        return max(wtemp, act * 3 * n + c16)
    return max(act * n + wtemp, act * (3 * n + n // tp) + c16)
