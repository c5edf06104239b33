"""Activation bytes, from the code's own shapes: what one micro-batch's forward keeps for its backward (a block's
cache, layer by layer as modules.py builds it; a chunk's: embedding, blocks, head), and what one operation
allocates on top of the caches while it runs (memory.py walks the schedule with them)."""

from __future__ import annotations

from hpc_llm.config import ModelConfig
from hpc_llm.kernels.attention import MAX_HEAD_DIM
from hpc_llm.model.attention import query_blocks
from hpc_llm.model.layers import ELEMENTWISE_CHUNK

INDEX_BYTES = 8  # token ids and targets: int64 (data.get_batch)
MASK_BYTES = 1  # a dropout mask's kept flags (layers.DropoutMask.keep: bool)


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
    fused: bool = False,
) -> dict:
    """Block.forward's cache (ln1, c_qkv, att, c_aproj, a_mask, ln2, c_fc, f, gt, c_mproj, m_mask), in elements.

    sp (sequence parallel): the terms replicated over the tensor-parallel group (both LayerNorms, the branch dropout
    masks, and each column-parallel linear's input, which keeps only its slice and gathers it again in backward) are
    on this rank's 1/tp of the sequence; attention's and the MLP's hidden terms are already 1/tp (local heads, local
    hidden units). recompute "selective": the probabilities, the attention dropout masks and GELU's tanh are not
    kept (backward recomputes the attention core from q, k, v and the tanh from the GELU input). fused (a device's
    fused attention, attention.attention_forward, whatever the recompute): no probabilities or masks; its FlashCache
    keeps the output y and each row's logsumexp."""
    n, nl, h = b * T * C, b * T * C // tp, H // tp
    r, rows = (nl, b * T // tp) if sp else (n, b * T)  # replicated terms: the slice with sp
    selective = recompute == "selective"
    att = 0 if selective or fused else b * h * attention_scores(T)
    return {
        "ln_1 xhat": r,
        "ln_1 rstd": rows,
        "ln_1 output (qkv input)": r,
        "q, k, v split by head": 3 * nl,
        "attention probabilities": att,
        "attention dropout masks": att if dropout else 0,
        "attention output (proj input)": nl,
        "fused attention output y": nl if fused else 0,
        "fused attention logsumexp": b * h * T if fused else 0,
        "attention branch dropout mask": r if dropout else 0,
        "ln_2 xhat": r,
        "ln_2 rstd": rows,
        "ln_2 output (fc input)": r,
        "fc output (GELU input)": 4 * nl,
        "GELU tanh": 0 if selective else 4 * nl,
        "GELU output (proj input)": 4 * nl,
        "MLP branch dropout mask": r if dropout else 0,
    }


def term_bytes(name: str, act: int, compute: int) -> int:
    """Bytes per element of a block_cache_elems term: the dropout masks one (bool), LayerNorm's rstd the compute
    dtype, the rest the format's (Precision.keep); the fused attention's y kept in the format is a second array, in
    the compute dtype the projection's input itself."""
    if "mask" in name:
        return MASK_BYTES
    if name == "fused attention output y":
        return act if act != compute else 0
    return compute if name.endswith(("rstd", "logsumexp")) else act


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
    fused: bool = False,
) -> int:
    elems = block_cache_elems(b, T, C, H, tp, dropout, sp, recompute, fused)
    return sum(n * term_bytes(name, act, compute) for name, n in elems.items())


def fused_attention(cfg: ModelConfig, device: bool) -> bool:
    """Whether a block's attention runs fused (attention.attention_forward on a device; kernels/cuda/fused_attention's
    head size test, `fusable`)."""
    return device and cfg.n_embd // cfg.n_head <= MAX_HEAD_DIM


def attention_recompute_bytes(b: int, T: int, H: int, tp: int, dropout: bool, compute: int) -> int:
    """recompute "selective": what attention_backward holds on top of its usual temporaries (block_backward_work's
    datt and, with dropout, the masked probabilities) while it rebuilds each query block's probabilities and dropout
    mask from the kept q, k, v: the block's probabilities (compute dtype) and mask (1 byte), and, drawn while the
    loop's variables still hold the previous block's, the next block's probabilities, the uniforms its mask is drawn
    from (compute dtype: layers.dropout_mask) and the mask. The largest block is the first, the next one the second."""
    sizes = sorted(((q1 - q0) * q1 for q0, q1 in query_blocks(T)), reverse=True)
    held = compute + (MASK_BYTES if dropout else 0)  # a block's probabilities and mask
    draw = compute if dropout else 0  # the uniforms of the mask being drawn
    return b * (H // tp) * (sum(sizes[:2]) * held + sum(sizes[1:2]) * draw)


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
    device: bool = False,
) -> int:
    """Bytes of one micro-batch's cache for a chunk (Chunk.forward's (emb_cache, caches, head_cache, rng)).
    recompute "block": each block keeps only a copy of its input (b, T, C), or its slice (b, T/tp, C) with sequence
    parallelism, and the cache is rebuilt in backward; "selective": block_cache_elems. device: the device
    path's (its fused attention). sp: the embedding's dropout
    mask, ln_f and the logits' operand kept on the slice (the head gathers it again in backward)."""
    T, C, H = cfg.block_size, cfg.n_embd, cfg.n_head
    compute = act if compute is None else compute
    drop = cfg.dropout > 0
    s = tp if sp else 1  # the sequence split
    total = 0
    if embedding:
        total += b * T * INDEX_BYTES + (b * T * C // s * MASK_BYTES if drop else 0)  # (idx, mask)
    if recompute == "block":
        total += n_blocks * b * T * C // s * compute
    else:
        fused = fused_attention(cfg, device)
        total += n_blocks * block_cache_bytes(
            b, T, C, H, tp, drop, act, compute, sp, recompute, fused
        )
    if head:
        N, Vl = b * T, cfg.padded_vocab // tp
        # (lnf = (xhat, rstd), xf2 = ln_f's output, ce = (probabilities, local targets, mask), shape)
        total += act * 2 * N * C // s + compute * (N // s + N * Vl) + N * INDEX_BYTES + N
    return total


def chunk_weight_bytes(
    cfg: ModelConfig,
    tp: int,
    b: int,
    n_blocks: int,
    embedding: bool,
    head: bool,
    act: int = 4,
    compute: int | None = None,
    sp: bool = False,
    dy: int = 0,
) -> int:
    """Bytes one micro-batch's B leaves for its W (zero-bubble schedules: Chunk.backward_input's WeightWork): each
    weighted layer's kept input (in the format: the cache's own arrays, the rest of the cache freed) and output
    gradient (compute dtype; a linear's in `dy` bytes where nonzero: Bytes.weight_dy). A block: the LayerNorms' xhat
    and output gradients, the four linears' inputs and output gradients (a row-parallel one's gathered whole with
    sp, in the compute dtype: tensor_parallel._gathered_operand); the embedding: its input gradient, token ids and
    dropout mask; the head nothing (its W runs with its B: Chunk.backward_input)."""
    T, C = cfg.block_size, cfg.n_embd
    compute = act if compute is None else compute
    dy = dy or compute
    n, nl = b * T * C, b * T * C // tp
    r = nl if sp else n
    total = 0
    if n_blocks:
        # ln_1 and ln_2: xhat, output; attn_proj's and mlp_proj's inputs
        kept = 2 * r + 2 * r + nl + 4 * nl
        # the output gradients: the two projections', fc's, qkv's, the LayerNorms'
        rows = 2 * n * (compute if sp else dy)
        total += n_blocks * (kept * act + rows + (4 * nl + 3 * nl) * dy + 2 * r * compute)
    if embedding:
        total += r * compute + b * T * INDEX_BYTES + (r * MASK_BYTES if cfg.dropout > 0 else 0)
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
    selective: bool = False,
) -> int:
    """Peak extra bytes inside Block.backward: its locals (dg, dh2, dy, dqkv, dh1) live until it returns, on top of
    the running gradient dx; each phase adds its own temporaries (LayerNorm's dxhat and xhat * mean, the attention
    backward's dyh, dqkvh, per-block datt (with dropout beside the masked probabilities, DropoutMask.scaled's new
    array) and its final transposed copy, `out += a @ b` when accumulating). selective: GELU's backward beside the
    tanh it recomputes (layers.gelu_tanh: a new array of the GELU input's size). Every array counts in the compute
    dtype (the `act` given): a bf16/fp16 kept activation's float32 copy made by Precision.use is not counted.

    sp: dx, the masks, LayerNorm's arrays and the input gradients leaving a column-parallel layer are on the slice;
    a row-parallel layer gathers its output gradient (Comm.allgather_along: a receive buffer and the concatenated
    whole, 2 (b, T, C) at the peak, then the whole); a column-parallel one gathers its kept input again and
    reduce-scatters its whole input gradient (Comm.reduce_scatter_along: the gathered input, the gradient, its copy
    in rank order and the slice received: 3 (b, T, C) + the slice). comm16 (parallel.act_comm 16-bit): each
    tensor-parallel collective stages a 16-bit copy of its (b, T, C) buffer. selective (recompute "selective"): the
    attention phase holds attention_recompute_bytes on top."""
    n, nl, h, hd = b * T * C, b * T * C // tp, H // tp, C // H
    r = nl if sp else n  # the stream, the masks, LayerNorm's arrays: the slice with sp
    c16 = 2 * n if comm16 and tp > 1 else 0  # the 16-bit copy a collective sends or receives
    blocks = query_blocks(T)
    wtemp = lambda rows, cols: rows * cols * grad if accumulate else 0  # noqa: E731
    masks = 2 * r if dropout else 0  # dm, da: copies of dx
    dg = 4 * nl  # d(GELU output) = d(fc output), in place
    # GELU backward's two chunk-sized temporaries, and under selective recompute the tanh
    gelu_tmp = 2 * min(ELEMENTWISE_CHUNK, 4 * nl) + (4 * nl if selective else 0)
    recomputed = attention_recompute_bytes(b, T, H, tp, dropout, act) if selective else 0
    ln_tmp = 2 * r  # dxhat and xhat * mean_dx
    big_att = max((q1 - q0) * q1 for q0, q1 in blocks) * b * h
    # datt and with dropout the masked probabilities (+ an accumulate temp of dv/dk), or the final transposed copy of
    # dqkv
    att_tmp = max(
        big_att * (2 if dropout else 1)
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
    b: int,
    T: int,
    C: int,
    H: int,
    tp: int,
    act: int,
    sp: bool = False,
    comm16: bool = False,
    selective: bool = False,
) -> int:
    """Peak extra bytes of Block.forward beyond what it keeps: the residual stream, the fused qkv output (deleted
    after the head split) and the head-major attention output before its merge. sp: the stream is the slice; a
    column-parallel linear's all-gather holds 2 (b, T, C) at its peak, then the whole input beside the qkv output;
    a row-parallel one's reduce-scatter the partial product, its copy in rank order and the slice received. comm16:
    each collective stages a 16-bit copy of its (b, T, C) buffer. selective: GELU's tanh (4bTC/tp), not kept, lives
    beside the stream and the attention branch's output (the slice with sp) until mlp_proj runs."""
    n, nl = b * T * C, b * T * C // tp
    c16 = 2 * n if comm16 and tp > 1 else 0
    gelu = act * (2 * (nl if sp else n) + 4 * nl) if selective else 0
    if not sp:
        return max(act * (n + 3 * nl + nl) + c16, gelu)
    return max(act * (nl + max(2 * n, n + 3 * nl, 3 * nl + nl, nl + 2 * n + nl)) + c16, gelu)


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
