"""GPT-2's building blocks as small objects: LayerNorm and Block (with ends.py's Embedding and Head, chunk.py makes a
pipeline stage of them).

Each holds `Param` views (value, gradient) into the flat buffers and has `forward(...) -> (out, cache)` and
`backward(dout, cache, ...)`, which is `backward_input(dout, cache, work)` (B, the input gradient) with its weight
gradients (W) run at once by a layers.WeightWork; a zero-bubble schedule keeps them for later instead. The cache is
returned, never kept on the object, so several micro-batches can be in flight at once (pipeline schedules). Dropout
applies when an rng is given (training) and the model's dropout > 0; its masks come from the rng's site for the layer
(layers.DropoutRNG), so they do not depend on how the model is split. Tensor parallelism lives inside: the
column/row-parallel linears own their f/g mappings, the embedding and the head are vocabulary-parallel. With sequence
parallelism the residual stream between them is this TP rank's slice of positions (B, T/tp, C): the embedding
reduce-scatters into it, the column-parallel linears and the head's logits gather from it, the row-parallel linears
reduce-scatter back into it; LayerNorms, dropouts and residual adds run on the slice (the dropouts with the single
process's masks at those positions, DropoutRNG.for_positions).
"""

from __future__ import annotations

from typing import NamedTuple

from hpc_llm.backend import array_module
from hpc_llm.kernels.cuda import device
from hpc_llm.kernels.dropout_residual import dropout_residual_
from hpc_llm.model.attention import attention_backward, attention_forward, cached_attention_forward
from hpc_llm.model.layers import (
    NO_PARAM,
    DropoutRNG,
    Param,
    WeightWork,
    dropout_mask,
    dropout_site,
    gelu_backward_kept,
    gelu_forward_kept,
    layernorm_backward_input,
    layernorm_backward_weight,
    layernorm_forward_kept,
)
from hpc_llm.model.precision import FP32, Precision
from hpc_llm.model.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
)
from hpc_llm.parallel.comm import Comm


def _read_as_kept(xhat) -> bool:
    """A host bf16 xhat goes to the LayerNorm kernels as it is (they read it, or widen it where they do not run)."""
    return xhat.dtype.name == "bfloat16" and not device.on_device(array_module(xhat))


class LayerNorm:
    """Statistics in the compute dtype; the normalised input kept in the precision's format. partial: its gradients
    are a SlicePartials buffer's views, overwritten by each backward (the buffer's reduce accumulates)."""

    def __init__(self, w: Param, b: Param, prec: Precision = FP32, partial: bool = False):
        self.w, self.b, self.prec, self.partial = w, b, prec, partial

    def forward(self, x, narrow: bool = False):
        """narrow: out made in the format where the host's kernel can (only for a linear layer's input)."""
        return layernorm_forward_kept(x, self.w.value, self.b.value, self.prec, narrow)

    def backward(self, dout, cache, accumulate: bool):
        return self.backward_input(dout, cache, WeightWork(accumulate))

    def backward_input(self, dout, cache, work: WeightWork, residual=None):
        """B: the input gradient; W (dout and the kept xhat) to `work`; the host's kernels read the kept copy.
        residual: the residual stream's gradient, to which the input gradient is added (in the host kernel's own
        pass where it runs) and which is returned."""
        kept, rstd = cache
        xhat = kept if _read_as_kept(kept) else self.prec.use(kept, dout.dtype)
        work.add(self._weight, dout, kept if work.deferred else xhat)
        dx = layernorm_backward_input(dout, (xhat, rstd), self.w.value, residual)
        if residual is None or dx is residual:
            return dx
        _dropout_residual(residual, dx, None)
        return residual

    def _weight(self, dout, xhat, accumulate: bool) -> None:
        keep = _read_as_kept(xhat) or xhat.dtype == dout.dtype
        xhat = xhat if keep else self.prec.use(xhat, dout.dtype)
        layernorm_backward_weight(
            dout, xhat, self.w.grad, self.b.grad, accumulate and not self.partial
        )


def slice_rng(rng, x, tp: Comm):
    """A DropoutRNG site's view for x, this TP rank's slice of positions (B, T/tp, ...) under sequence parallelism:
    the single process's masks at those positions (any other generator as it is)."""
    if not isinstance(rng, DropoutRNG):
        return rng
    n = x.shape[1]
    return rng.for_positions(tp.rank * n, (tp.rank + 1) * n, tp.size * n)


class SlicePartials:
    """The gradients of replicated parameters used on a slice of the sequence (sequence parallelism: the LayerNorms'):
    each TP rank's backward sums over its own positions only. The layers are given `params` (the same values, their
    gradients redirected into one packed buffer, overwritten by each backward); `reduce(accumulate)` sums that buffer
    over the TP group (one allreduce) and writes, or adds, the sums into the real gradients, which are then whole and
    the same on every TP rank, like every replicated parameter's.

    Reduced every micro-batch (Megatron sums them once per step): a backward's gradients are then final when it
    returns, whoever calls it (GPT.backward with accumulation, a pipeline chunk whose buckets start during its last
    backward or at the step's end), with no state kept between calls, for one allreduce of a few C elements per
    block per micro-batch. Absent parameters (NO_PARAM: model.bias = false) stay absent."""

    def __init__(self, params: list[Param], tp: Comm):
        live = [p.grad for p in params if p.grad is not None]
        self.tp = (
            tp.plain
        )  # gradients: summed in their own dtype, never on parallel.act_comm's 16-bit wire
        self.buf = array_module(live[0]).empty(sum(g.size for g in live), dtype=live[0].dtype)
        self.params, self.pairs, a = [], [], 0  # pairs: (real gradient, its view in buf)
        for p in params:
            if p.grad is None:
                self.params.append(p)
                continue
            view = self.buf[a : a + p.grad.size].reshape(p.grad.shape)
            self.params.append(Param(p.value, view))
            self.pairs.append((p.grad, view))
            a += p.grad.size

    def reduce(self, accumulate: bool) -> None:
        self.tp.allreduce_(self.buf)
        for grad, view in self.pairs:
            if accumulate:
                grad += view
            else:
                grad[...] = view


def _dropout_residual(x, a, mask, bias=None) -> None:
    """x += the branch output a (+ bias: its layer's, when folded in here) through its dropout mask (None: none),
    one fused pass."""
    keep, scale = (None, 1.0) if mask is None else mask
    dropout_residual_(x, a, keep, scale, bias)


def _folded_bias(layer):
    """The layer's bias, which the fused pass after it (GELU's, the residual add's) adds, so the layer adds none;
    None with LoRA (it adds to the layer's output)."""
    return None if layer.lora else layer.b.value


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
    gelu_t: object  # GELU's tanh term (gelu_forward's cache); None under selective recompute
    mlp_proj: object
    mlp_mask: object  # dropout on the MLP branch


class Block:
    """x + attn(ln_1(x)), then + mlp(ln_2(x)). Attention: column-parallel qkv (this rank's heads), causal attention,
    row-parallel projection; MLP: column-parallel fc, GELU, row-parallel projection. Dropout (site layer + 1) on the
    attention probabilities and on each branch before its residual add. The residual stream x is updated in place.

    p holds the block's parameters by their names within it ("attn.c_attn.weight", ...), LoRA's adapters among them
    ("attn.c_attn.lora_A", "attn.c_attn.lora_B": that linear layer then adds lora_scale * x A B); frozen: the names
    of those not trained, whose linear layers skip their weight gradients (LayerNorms' are computed, and ignored).

    sequence_parallel: x is this TP rank's slice of positions (B, T/tp, C); the linears gather from it and
    reduce-scatter back into it (tensor_parallel.py), the LayerNorms, the branch dropouts and the residual adds run
    on it, and the LayerNorms' partial gradients are summed over the TP group at the end of backward
    (SlicePartials)."""

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
        selective: bool = False,
        sequence_parallel: bool = False,
    ):
        self.layer, self.dropout, self.prec = layer, dropout, prec
        # train.recompute = "selective": attention's core and GELU's tanh again in backward
        self.selective = selective
        self.tp, self.sequence_parallel = tp, sequence_parallel
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
            return kind(w, b, tp, prec, lora, sequence_parallel)

        # none with model.bias = false
        b = {k: p.get(k, NO_PARAM) for k in ("ln_1.bias", "ln_2.bias")}
        ln = [p["ln_1.weight"], b["ln_1.bias"], p["ln_2.weight"], b["ln_2.bias"]]
        # sequence parallelism: the LayerNorms see this rank's positions, their gradients are partial sums
        self.partials = SlicePartials(ln, tp) if sequence_parallel else None
        if self.partials is not None:
            ln = self.partials.params
        sp = sequence_parallel
        self.ln_1 = LayerNorm(ln[0], ln[1], prec, partial=sp)
        self.qkv = linear(ColumnParallelLinear, "attn.c_attn")
        self.attn_proj = linear(RowParallelLinear, "attn.c_proj")
        self.ln_2 = LayerNorm(ln[2], ln[3], prec, partial=sp)
        self.fc = linear(ColumnParallelLinear, "mlp.c_fc")
        self.mlp_proj = linear(RowParallelLinear, "mlp.c_proj")

    def forward(self, x, rng=None, kv=None, pos0: int = 0):
        """x (B, T, C) -> (x, cache). kv: decoding, this layer's KV cache (2, B, H, block_size, hd), extended at
        pos0 (the cache returned is then of no use: there is no backward)."""
        drop = self.dropout if rng is not None else 0.0
        rng = dropout_site(rng, self.layer + 1) if drop > 0 else None
        # the branch dropouts' masks: at this rank's positions under sequence parallelism
        branch_rng = slice_rng(rng, x, self.tp) if self.sequence_parallel else rng
        h1, ln1 = self.ln_1.forward(x, narrow=True)
        qkv, c_qkv = self.qkv.forward(h1)
        if kv is None:
            heads_rng = rng.for_heads(*self.head_range) if isinstance(rng, DropoutRNG) else rng
            y, att = attention_forward(
                qkv, self.heads, drop, heads_rng, self.prec, not self.selective, narrow=True
            )
        else:
            y, att = cached_attention_forward(qkv, self.heads, kv, pos0), None
        del qkv
        # each bias is added by the fused pass after its linear (a pass fewer each)
        bias = _folded_bias(self.attn_proj)
        a, c_aproj = self.attn_proj.forward(y, bias=bias is None)
        a_mask = dropout_mask(a.shape, a.dtype, drop, branch_rng) if drop > 0 else None
        # the residual input is not needed again: LayerNorm's cache holds its normalised copy
        _dropout_residual(x, a, a_mask, bias)
        h2, ln2 = self.ln_2.forward(x, narrow=True)
        bias = _folded_bias(self.fc)
        f, c_fc = self.fc.forward(h2, bias=bias is None)
        # selective recompute: GELU's tanh again in backward (one elementwise pass), not kept
        g, f, gelu_t = gelu_forward_kept(f, bias, self.prec, keep_t=not self.selective)
        bias = _folded_bias(self.mlp_proj)
        m, c_mproj = self.mlp_proj.forward(g, bias=bias is None)
        del g
        m_mask = dropout_mask(m.shape, m.dtype, drop, branch_rng) if drop > 0 else None
        _dropout_residual(x, m, m_mask, bias)
        return x, BlockCache(
            ln1, c_qkv, att, c_aproj, a_mask, ln2, c_fc, f, gelu_t, c_mproj, m_mask
        )

    def backward(self, dx, cache: BlockCache, accumulate: bool, rng=None):
        """dx: the gradient of the block's output (updated in place into that of its input, and returned). rng: the
        forward's dropout rng (a DropoutRNG), to draw attention's masks again under selective recompute."""
        return self.backward_input(dx, cache, WeightWork(accumulate), rng)

    def backward_input(self, dx, cache: BlockCache, work: WeightWork, rng=None):
        """B of backward (the same dx in and out); each linear's and LayerNorm's W goes to `work`, then the sum of
        the LayerNorms' partial gradients (sequence parallelism: SlicePartials)."""
        c = cache
        # the branch's output gradient: the row-parallel W reads it after dx has been updated in place
        dm = work.keep(dx) if c.mlp_mask is None else c.mlp_mask.scaled(dx)
        dg = self.mlp_proj.backward_input(dm, c.mlp_proj, work)
        # in bf16 where fc's products read it so (no LoRA: it scales its operand in float32)
        narrow = self.fc.lora is None and self.prec.reads_low(dg)
        df = gelu_backward_kept(dg, c.fc_out, c.gelu_t, self.prec, narrow)
        dh2 = self.fc.backward_input(df, c.fc, work)
        self.ln_2.backward_input(dh2, c.ln_2, work, residual=dx)
        da = work.keep(dx) if c.attn_mask is None else c.attn_mask.scaled(dx)
        dy = self.attn_proj.backward_input(da, c.attn_proj, work)
        drop, heads_rng = 0.0, None
        if c.attn[1] is None and rng is not None and self.dropout > 0:
            # selective: a fresh site, same masks
            drop = self.dropout
            heads_rng = dropout_site(rng, self.layer + 1).for_heads(*self.head_range)
        narrow = self.qkv.lora is None and self.prec.reads_low(dy)  # as GELU's
        dqkv = attention_backward(dy, c.attn, self.heads, self.prec, drop, heads_rng, narrow)
        dh1 = self.qkv.backward_input(dqkv, c.qkv, work)
        self.ln_1.backward_input(dh1, c.ln_1, work, residual=dx)
        if self.partials is not None:
            work.add(self.partials.reduce)
        return dx
