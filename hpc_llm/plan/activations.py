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


def attention_recompute_bytes(
    b: int, T: int, H: int, tp: int, dropout: bool, act: int, compute: int
) -> int:
    """recompute "selective": what backward's attention phase rebuilds and holds for one block, the probabilities
    (kept in the format, as forward keeps them) and the attention dropout masks (compute dtype)."""
    att = b * (H // tp) * attention_scores(T)
    return att * act + (att * compute if dropout else 0)


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
    mask and ln_f on the slice; the head keeps its all-gathered input (the logits' operand) whole."""
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
        # (lnf = (xhat, rstd), xf2 = ln_f's output (gathered), ce = (probabilities, local targets, mask), shape)
        total += act * (N * C // s + N * C) + compute * (N // s + N * Vl) + N * INDEX_BYTES + N
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
    each linear layer's backward holds a (b, T, C) temporary while it runs: the all-gathered dy of a row-parallel one,
    the re-gathered input of a column-parallel one and its full input gradient before the reduce-scatter. comm16
    (parallel.act_comm 16-bit): each tensor-parallel collective stages a 16-bit copy of its (b, T, C) buffer.
    recomputed: bytes the attention phase rebuilds and holds on top (recompute "selective")."""
    n, nl, h, hd = b * T * C, b * T * C // tp, H // tp, C // H
    r = nl if sp else n  # the stream, the masks, LayerNorm's arrays: the slice with sp
    gat = n if sp else 0  # a gathered (b, T, C) temporary
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
    # the fc and qkv input gradients before their reduce-scatter (sp; without it dh2 and dh1 are reduced in place)
    partial = act * n if sp else 0
    phases = [
        base + max(wtemp(4 * C // tp, C) + (act * gat + c16 if sp else 0), act * gelu_tmp),
        # mlp_proj backward (sp: dy gathered), GELU backward
        base
        + act * gat
        + max(wtemp(C, 4 * C // tp), partial)
        + c16,  # fc (sp: its input gathered again)
        base + act * (r + ln_tmp),  # ln_2 backward
        base + act * (r + nl + gat) + wtemp(C // tp, C) + (c16 if sp else 0),  # attn_proj backward
        base
        + act * (r + nl + nl + 3 * nl + att_tmp)
        + recomputed,  # attention: dyh, dqkvh, its peak
        base + act * (r + nl + 3 * nl + gat) + max(wtemp(C, 3 * C // tp), partial) + c16,  # qkv
        base + act * (r + nl + 3 * nl + r + ln_tmp),  # ln_1 backward
    ]
    return max(phases)


def block_forward_work(
    b: int, T: int, C: int, H: int, tp: int, act: int, sp: bool = False, comm16: bool = False
) -> int:
    """Peak extra bytes of Block.forward beyond what it keeps: the residual stream, the fused qkv output (deleted
    after the head split) and the head-major attention output before its merge. sp: the stream is the slice, and
    the all-gathered input of a column-parallel linear or the partial product before a row-parallel reduce-scatter
    ((b, T, C) each, one at a time) is held beside the qkv output or the attention output. comm16: each collective
    stages a 16-bit copy of its (b, T, C) buffer."""
    n, nl = b * T * C, b * T * C // tp
    c16 = 2 * n if comm16 and tp > 1 else 0
    if not sp:
        return act * (n + 3 * nl + nl) + c16
    return act * (nl + max(n + 3 * nl, 3 * nl + nl, nl + n)) + c16


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
    ln_f's backward temporaries. sp: dx whole until its reduce-scatter, then ln_f's backward on the slice."""
    n = b * T * C
    c16 = 2 * n if comm16 and tp > 1 else 0
    work = act * (n + n // tp) if sp else act * 3 * n
    return max(V // tp * C * grad if accumulate else 0, work + c16)
