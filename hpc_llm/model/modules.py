"""GPT-2's building blocks as small objects: Embedding, Block, Head, and Chunk (a pipeline stage made of them).

Each holds `Param` views (value, gradient) into the flat buffers and has `forward(...) -> (out, cache)` and
`backward(dout, cache, ...)`. The cache is returned, never kept on the object, so several micro-batches can be in
flight at once (pipeline schedules). Dropout applies when an rng is given (training) and the model's dropout > 0; its
masks come from the rng's site for the layer (layers.DropoutRNG), so they do not depend on how the model is split.
Tensor parallelism lives inside: the column/row-parallel linears own their f/g mappings, the embedding and the head
are vocabulary-parallel.
"""

from __future__ import annotations

from typing import NamedTuple

from hpc_llm.model.layers import (
    NO_PARAM,
    DropoutRNG,
    Param,
    attention_backward,
    attention_forward,
    cached_attention_forward,
    dropout_backward,
    dropout_forward,
    dropout_site,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_forward,
    matmul_into,
    position_embedding_backward,
)
from hpc_llm.model.precision import FP32, Precision
from hpc_llm.model.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tp_region,
    copy_to_tp_region_backward,
    gather_from_tp_region,
    vocab_parallel_cross_entropy_backward,
    vocab_parallel_cross_entropy_forward,
    vocab_parallel_embedding_backward,
    vocab_parallel_embedding_forward,
)
from hpc_llm.parallel.comm import Comm


class LayerNorm:
    """Statistics in the compute dtype; the normalised input kept in the precision's format."""

    def __init__(self, w: Param, b: Param, prec: Precision = FP32):
        self.w, self.b, self.prec = w, b, prec

    def forward(self, x):
        out, (xhat, rstd) = layernorm_forward(x, self.w.value, self.b.value)
        return out, (self.prec.keep(xhat), rstd)

    def backward(self, dout, cache, accumulate: bool):
        xhat, rstd = cache
        return layernorm_backward(
            dout,
            (self.prec.use(xhat, dout.dtype), rstd),
            self.w.value,
            self.w.grad,
            self.b.grad,
            accumulate,
        )


class Embedding:
    """Token + learned position embedding (token rows vocabulary-parallel over the TP group), then dropout (site 0).
    head_writes_wte: the tied head on this rank writes wte's gradient first in backward, so this one adds to it."""

    def __init__(
        self, wte: Param, wpe: Param, v0: int, tp: Comm, dropout: float, head_writes_wte: bool
    ):
        self.wte, self.wpe, self.v0, self.tp = wte, wpe, v0, tp
        self.dropout, self.head_writes_wte = dropout, head_writes_wte

    def forward(self, idx, rng=None, pos0: int = 0):
        x = vocab_parallel_embedding_forward(
            self.wte.value, self.wpe.value, idx, self.v0, self.tp, pos0
        )
        mask = None
        if rng is not None and self.dropout > 0:
            x, mask = dropout_forward(x, self.dropout, dropout_site(rng, 0))
        return x, (idx, mask)

    def backward(self, dx, cache, accumulate: bool) -> None:
        idx, mask = cache
        if mask is not None:
            dropout_backward(dx, mask)
        # frozen (LoRA, train.freeze): no scatter into it; wpe's gradient as before
        if self.wte.grad is None:
            position_embedding_backward(dx, self.wpe.grad, accumulate)
            return
        vocab_parallel_embedding_backward(
            dx,
            idx,
            self.v0,
            self.wte.grad,
            self.wpe.grad,
            accumulate,
            self.tp,
            accumulate_wte=accumulate or self.head_writes_wte,
        )


class BlockCache(NamedTuple):
    """What Block.backward needs from its forward: each sub-layer's cache (named after the sub-layer), the dropout
    masks (None without dropout) and the MLP's hidden activations, kept in the precision's format."""

    ln_1: tuple  # LayerNorm's (normalised input, 1/std)
    qkv: object  # the qkv linear's cache
    attn: tuple | None  # attention's (head-split qkv, probabilities, masks); None when decoding
    attn_proj: object
    attn_mask: object  # dropout on the attention branch
    ln_2: tuple
    fc: object
    fc_out: object  # the fc layer's output, GELU's input
    gelu_t: object  # GELU's tanh term (gelu_forward's cache)
    mlp_proj: object
    mlp_mask: object  # dropout on the MLP branch


class Block:
    """x + attn(ln_1(x)), then + mlp(ln_2(x)). Attention: column-parallel qkv (this rank's heads), causal attention,
    row-parallel projection; MLP: column-parallel fc, GELU, row-parallel projection. Dropout (site layer + 1) on the
    attention probabilities and on each branch before its residual add. The residual stream x is updated in place.

    p holds the block's parameters by their names within it ("attn.c_attn.weight", ...), LoRA's adapters among them
    ("attn.c_attn.lora_A", "attn.c_attn.lora_B": that linear layer then adds lora_scale * x A B); frozen: the names
    of those not trained, whose linear layers skip their weight gradients (LayerNorms' are computed, and ignored)."""

    def __init__(
        self,
        p: dict[str, Param],
        layer: int,
        n_head: int,
        tp: Comm,
        dropout: float,
        prec: Precision = FP32,
        lora_scale: float = 0.0,
        frozen=frozenset(),
    ):
        self.layer, self.dropout, self.prec = layer, dropout, prec
        self.heads = n_head // tp.size  # this rank's
        self.head_range = (tp.rank * self.heads, (tp.rank + 1) * self.heads, n_head)

        def linear(kind, name):
            # no bias with model.bias = false
            w, b = (p.get(f"{name}.{k}", NO_PARAM) for k in ("weight", "bias"))
            w, b = (
                Param(x.value, None) if f"{name}.{k}" in frozen else x
                for x, k in ((w, "weight"), (b, "bias"))
            )
            lora = None
            if f"{name}.lora_A" in p:
                lora = tuple(
                    Param(p[f"{name}.{k}"].value, None)
                    if f"{name}.{k}" in frozen
                    else p[f"{name}.{k}"]
                    for k in ("lora_A", "lora_B")
                ) + (lora_scale,)
            return kind(w, b, tp, prec, lora)

        # none with model.bias = false
        b = {k: p.get(k, NO_PARAM) for k in ("ln_1.bias", "ln_2.bias")}
        self.ln_1 = LayerNorm(p["ln_1.weight"], b["ln_1.bias"], prec)
        self.qkv = linear(ColumnParallelLinear, "attn.c_attn")
        self.attn_proj = linear(RowParallelLinear, "attn.c_proj")
        self.ln_2 = LayerNorm(p["ln_2.weight"], b["ln_2.bias"], prec)
        self.fc = linear(ColumnParallelLinear, "mlp.c_fc")
        self.mlp_proj = linear(RowParallelLinear, "mlp.c_proj")

    def forward(self, x, rng=None, kv=None, pos0: int = 0):
        """x (B, T, C) -> (x, cache). kv: decoding, this layer's KV cache (2, B, H, block_size, hd), extended at
        pos0 (the cache returned is then of no use: there is no backward)."""
        drop = self.dropout if rng is not None else 0.0
        rng = dropout_site(rng, self.layer + 1) if drop > 0 else None
        h1, ln1 = self.ln_1.forward(x)
        qkv, c_qkv = self.qkv.forward(h1)
        if kv is None:
            heads_rng = rng.for_heads(*self.head_range) if isinstance(rng, DropoutRNG) else rng
            y, att = attention_forward(qkv, self.heads, drop, heads_rng, self.prec)
        else:
            y, att = cached_attention_forward(qkv, self.heads, kv, pos0), None
        del qkv
        a, c_aproj = self.attn_proj.forward(y)
        a_mask = None
        if drop > 0:
            a, a_mask = dropout_forward(a, drop, rng)
        # the residual input is not needed again: LayerNorm's cache holds its normalised copy
        x += a
        h2, ln2 = self.ln_2.forward(x)
        f, c_fc = self.fc.forward(h2)
        g, gt = gelu_forward(f)
        m, c_mproj = self.mlp_proj.forward(g)
        del g
        m_mask = None
        if drop > 0:
            m, m_mask = dropout_forward(m, drop, rng)
        x += m
        keep = self.prec.keep
        return x, BlockCache(
            ln1, c_qkv, att, c_aproj, a_mask, ln2, c_fc, keep(f), keep(gt), c_mproj, m_mask
        )

    def backward(self, dx, cache: BlockCache, accumulate: bool):
        """dx: the gradient of the block's output (updated in place into that of its input, and returned)."""
        c, use = cache, self.prec.use
        dm = dx if c.mlp_mask is None else dropout_backward(dx.copy(), c.mlp_mask)
        dg = self.mlp_proj.backward(dm, c.mlp_proj, accumulate)
        df = gelu_backward(dg, use(c.fc_out, dg.dtype), use(c.gelu_t, dg.dtype))  # consumes gelu_t
        dh2 = self.fc.backward(df, c.fc, accumulate)
        dx += self.ln_2.backward(dh2, c.ln_2, accumulate)
        da = dx if c.attn_mask is None else dropout_backward(dx.copy(), c.attn_mask)
        dy = self.attn_proj.backward(da, c.attn_proj, accumulate)
        dqkv = attention_backward(dy, c.attn, self.heads, self.prec)
        dh1 = self.qkv.backward(dqkv, c.qkv, accumulate)
        dx += self.ln_1.backward(dh1, c.ln_1, accumulate)
        return dx


class Head:
    """Final LayerNorm, the tied LM head (logits = x wte^T on this rank's vocabulary slice: a column-parallel layer
    whose weight is the embedding, with its f mapping) and the vocabulary-parallel cross-entropy."""

    def __init__(
        self,
        ln_w: Param,
        ln_b: Param,
        wte: Param,
        v0: int,
        vocab_size: int,
        tp: Comm,
        prec: Precision = FP32,
    ):
        self.ln_f = LayerNorm(ln_w, ln_b, prec)
        self.wte, self.v0, self.vocab_size, self.tp, self.prec = wte, v0, vocab_size, tp, prec

    def forward(self, x, targets=None, split: bool = False):
        """-> (mean loss, cache), or without targets (logits (B, T, vocab), None). The cross-entropy in the compute
        dtype (fp32), from logits whose matmul took operands in the precision's format. split (no targets): this
        rank's vocabulary slice of the logits, (B, T, padded_vocab / tp) from column self.v0, not gathered; the
        padding columns (>= vocab_size) are -inf there (sampling over the shards, generate.py)."""
        B, T, C = x.shape
        xf, lnf = self.ln_f.forward(x)
        xf2 = self.prec.operand(copy_to_tp_region(xf.reshape(B * T, C), self.tp))
        if targets is None:
            logits = linear_forward(xf2, self.wte.value.T, None)  # few rows (decoding): by panels
            if split:
                logits[:, max(0, self.vocab_size - self.v0) :] = -float("inf")
                return logits.reshape(B, T, -1), None
            logits = gather_from_tp_region(logits, self.tp)
            return logits.reshape(B, T, -1)[:, :, : self.vocab_size], None
        logits = xf2 @ self.wte.value.T
        # its max and sums in fp32 (tp.plain: the group without parallel.act_comm's 16-bit wire)
        loss, ce = vocab_parallel_cross_entropy_forward(
            logits, targets.reshape(-1), self.vocab_size, self.v0, self.tp.plain
        )
        return loss, (lnf, self.prec.keep(xf2), ce, x.shape)

    def backward(self, cache, loss_scale: float, accumulate: bool):
        lnf, xf2, ce, shape = cache
        dlogits = self.prec.round_(vocab_parallel_cross_entropy_backward(ce, loss_scale))
        xf2 = self.prec.use(xf2, dlogits.dtype)
        # tied: wte's gradient gets the head's share; None: wte frozen (LoRA, train.freeze), its V x C GEMM skipped
        if self.wte.grad is not None:
            matmul_into(dlogits.T, xf2, self.wte.grad, accumulate)
        dx = copy_to_tp_region_backward(dlogits @ self.wte.value, self.tp).reshape(shape)
        del dlogits, ce
        return self.ln_f.backward(dx, lnf, accumulate)


class ChunkCache(NamedTuple):
    """What Chunk.backward needs from its forward."""

    embedding: tuple | None  # the embedding's cache (first stage)
    blocks: list  # per block: its BlockCache, or its input under recompute
    head: tuple | None  # the head's cache (last stage, with targets)
    rng: object  # the dropout rng, to draw the same masks again under recompute


class Chunk:
    """One (virtual) pipeline stage: [embedding] + blocks + [head]. Its forward takes token ids on the first stage,
    else the previous stage's activations, and gives the loss on the last stage (logits without targets), else its
    activations; its backward takes the gradient of those activations (None on the last stage) and gives that of
    its input (None on the first). grad_offsets: for the head and each block, where its parameters start in the flat
    buffer; backward calls grad_ready(offset) once each one's gradients are final (data-parallel buckets start).

    recompute (Megatron's full recompute): forward keeps only each block's input, and backward runs the block's
    forward again from it to get the cache; the same arithmetic on the same input gives the same cache bit for bit,
    and a DropoutRNG's sites draw the same masks again."""

    def __init__(
        self,
        vstage: int,
        embedding: Embedding | None,
        blocks: list[Block],
        head: Head | None,
        grad_offsets: dict,
        recompute: bool = False,
    ):
        self.vstage, self.embedding, self.blocks, self.head = vstage, embedding, blocks, head
        self.grad_offsets = grad_offsets  # {"head": offset, layer index: offset}
        self.recompute = recompute

    def forward(self, inp, targets=None, rng=None, keep_cache: bool = True):
        recompute = keep_cache and self.recompute
        if (
            recompute
            and rng is not None
            and not isinstance(rng, DropoutRNG)
            and self.blocks[0].dropout > 0
        ):
            raise ValueError(
                "recompute with dropout needs a layers.DropoutRNG (its masks can be drawn again)"
            )
        x, emb_cache = self.embedding.forward(inp, rng) if self.embedding else (inp, None)
        caches = []
        for block in self.blocks:
            if recompute:
                caches.append(x.copy())  # the block updates its input in place
            x, cache = block.forward(x, rng)
            if keep_cache and not recompute:
                caches.append(cache)
        if self.head is None:
            return x, ChunkCache(emb_cache, caches, None, rng)
        out, head_cache = self.head.forward(x, targets)
        return out, ChunkCache(emb_cache, caches, head_cache, rng)

    def backward(
        self,
        dout,
        cache: ChunkCache,
        loss_scale: float = 1.0,
        accumulate: bool = False,
        grad_ready=None,
    ):
        emb_cache, caches, head_cache, rng = cache
        ready = grad_ready or (lambda offset: None)
        dx = dout
        if self.head is not None:
            dx = self.head.backward(head_cache, loss_scale, accumulate)
            ready(self.grad_offsets["head"])
        for block in reversed(self.blocks):
            block_cache = caches.pop()
            if self.recompute:
                _, block_cache = block.forward(block_cache, rng)
            dx = block.backward(dx, block_cache, accumulate)
            ready(self.grad_offsets[block.layer])
        if self.embedding is None:
            return dx
        self.embedding.backward(dx, emb_cache, accumulate)
        return None
