"""The model's two ends (chunk.py puts them around the blocks of modules.py): Embedding, token + position embedding
with its dropout, and Head, the final LayerNorm, the tied LM head and the loss (cross-entropy, or distillation
against a teacher's logits). Both are vocabulary-parallel over the TP group; under sequence parallelism the
embedding reduce-scatters into this rank's slice of positions and the head gathers from it. Each has the blocks'
forward / backward / backward_input (B, its W to a layers.WeightWork), the cache returned, never kept.
"""

from __future__ import annotations

import numpy as np

from hpc_llm.kernels.cuda.gemm16 import stored_16_bit
from hpc_llm.kernels.gemm import matmul
from hpc_llm.model.distill import (
    Distill,
    DistillCache,
    vocab_parallel_distill_backward,
    vocab_parallel_distill_forward,
)
from hpc_llm.model.layers import (
    Param,
    WeightWork,
    dropout_backward,
    dropout_forward,
    dropout_site,
    linear_forward,
    position_embedding_backward,
)
from hpc_llm.model.modules import LayerNorm, SlicePartials, slice_rng
from hpc_llm.model.precision import FP32, Precision
from hpc_llm.model.tensor_parallel import (
    copy_to_tp_region,
    copy_to_tp_region_backward,
    gather_bits,
    gather_from_sequence_parallel_region,
    gather_from_sequence_parallel_region_backward,
    gather_from_tp_region,
    reduce_scatter_to_sequence_parallel_region_backward,
)
from hpc_llm.model.vocab_parallel import (
    vocab_parallel_cross_entropy_backward,
    vocab_parallel_cross_entropy_forward,
    vocab_parallel_embedding_backward,
    vocab_parallel_embedding_forward,
)
from hpc_llm.parallel.comm import Comm


class Embedding:
    """Token + learned position embedding (token rows vocabulary-parallel over the TP group), then dropout (site 0).
    head_writes_wte: the tied head on this rank writes wte's gradient first in backward, so this one adds to it.
    sequence_parallel: the output is this rank's slice of positions (the TP sum reduce-scattered), dropped out there;
    backward gathers the gradient of every position before the scatter into wte's rows and wpe, whose gradients are
    then whole on every rank."""

    def __init__(
        self,
        wte: Param,
        wpe: Param,
        v0: int,
        tp: Comm,
        dropout: float,
        head_writes_wte: bool,
        sequence_parallel: bool = False,
    ):
        self.wte, self.wpe, self.v0, self.tp = wte, wpe, v0, tp
        self.dropout, self.head_writes_wte = dropout, head_writes_wte
        self.sequence_parallel = sequence_parallel

    def forward(self, idx, rng=None, pos0: int = 0):
        sp = self.sequence_parallel
        x = vocab_parallel_embedding_forward(
            self.wte.value, self.wpe.value, idx, self.v0, self.tp, pos0, sequence_parallel=sp
        )
        mask = None
        if rng is not None and self.dropout > 0:
            site = dropout_site(rng, 0)
            x, mask = dropout_forward(x, self.dropout, slice_rng(site, x, self.tp) if sp else site)
        return x, (idx, mask)

    def backward(self, dx, cache, accumulate: bool) -> None:
        self._weight(dx, cache, accumulate)

    def backward_input(self, dx, cache, work: WeightWork) -> None:
        """B: nothing (the input is token ids); all of the backward is W (dx: no one else updates it)."""
        work.add(self._weight, dx, cache)

    def _weight(self, dx, cache, accumulate: bool) -> None:
        idx, mask = cache
        if mask is not None:
            dropout_backward(dx, mask)
        if (
            self.sequence_parallel
        ):  # the forward's reduce-scatter, backward: every position's gradient
            dx = reduce_scatter_to_sequence_parallel_region_backward(dx, self.tp)
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


class Head:
    """Final LayerNorm, the tied LM head (logits = x wte^T on this rank's vocabulary slice: a column-parallel layer
    whose weight is the embedding, with its f mapping) and the vocabulary-parallel cross-entropy.

    sequence_parallel: x is this TP rank's slice of positions; ln_f runs on it (its gradients summed over the TP group
    at the end of backward, SlicePartials), then the slice is gathered into the logits matmul, kept as the slice and
    gathered again in backward for wte's gradient, and the input gradient is reduce-scattered (ColumnParallelLinear's
    sequence-parallel mapping)."""

    def __init__(
        self,
        ln_w: Param,
        ln_b: Param,
        wte: Param,
        v0: int,
        vocab_size: int,
        tp: Comm,
        prec: Precision = FP32,
        sequence_parallel: bool = False,
    ):
        self.partials = SlicePartials([ln_w, ln_b], tp) if sequence_parallel else None
        if self.partials is not None:
            ln_w, ln_b = self.partials.params
        self.ln_f = LayerNorm(ln_w, ln_b, prec, partial=sequence_parallel)
        self.wte, self.v0, self.vocab_size, self.tp, self.prec = wte, v0, vocab_size, tp, prec
        self.sequence_parallel = sequence_parallel

    def forward(self, x, targets=None, split: bool = False):
        """-> (mean loss, cache), or without targets (logits (B, T, vocab), None). The cross-entropy in the compute
        dtype (fp32), from logits whose matmul took operands in the precision's format. split (no targets): this
        rank's vocabulary slice of the logits, (B, T, padded_vocab / tp) from column self.v0, not gathered; the
        padding columns (>= vocab_size) are -inf there (sampling over the shards, generate.py)."""
        xf, lnf = self.ln_f.forward(x)
        bits = self._reads_bits(xf)
        if self.sequence_parallel:
            kept = self.prec.keep(xf)  # the slice, for backward
            xf = (
                gather_bits(kept, self.tp)
                if bits
                else gather_from_sequence_parallel_region(self.prec.use(kept, xf.dtype), self.tp)
            )
        B, T, C = xf.shape
        xf2 = copy_to_tp_region(xf.reshape(B * T, C), self.tp)
        # in 16 bits for 16-bit GEMMs (one launch), else bf16 where the products read it so (Precision.gemm_operand):
        # then it is the kept copy too
        if not (bits and self.sequence_parallel):
            xf2 = self.prec.keep(xf2) if bits else self.prec.gemm_operand(xf2)
        if targets is None:
            # few rows (decoding): by panels
            logits = linear_forward(xf2, self.wte.value.T, None, self.prec)
            if split:
                logits[:, max(0, self.vocab_size - self.v0) :] = -float("inf")
                return logits.reshape(B, T, -1), None
            logits = gather_from_tp_region(logits, self.tp)
            return logits.reshape(B, T, -1)[:, :, : self.vocab_size], None
        logits = matmul(xf2, self.wte.value.T, prec=self.prec)
        # its max and sums in fp32 (tp.plain: the group without parallel.act_comm's 16-bit wire)
        if isinstance(targets, Distill):  # a teacher's logits beside the ids (model/distill.py)
            loss, ce = vocab_parallel_distill_forward(
                logits, targets, self.vocab_size, self.v0, self.tp.plain
            )
        else:
            loss, ce = vocab_parallel_cross_entropy_forward(
                logits, targets.reshape(-1), self.vocab_size, self.v0, self.tp.plain
            )
        if not self.sequence_parallel:
            kept = xf2 if bits or self.prec.is_low(xf2.dtype) else self.prec.keep(xf2)
        return loss, (lnf, kept, ce, (B, T, C))

    def _reads_bits(self, x) -> bool:
        """Whether the GEMMs take 16-bit operands, x's bits (the kept input's, dlogits'): wte held in 2 bytes (a
        device's compute copy, kernels/cuda/gemm16.py), as the blocks' weights."""
        return stored_16_bit(self.wte.value) and x.dtype == np.float32

    def backward(self, cache, loss_scale: float, accumulate: bool):
        return self.backward_input(cache, loss_scale, WeightWork(accumulate))

    def backward_input(self, cache, loss_scale: float, work: WeightWork):
        """B: the input gradient; wte's gradient (W: dlogits and the kept input) and ln_f's go to `work`."""
        lnf, xf2, ce, shape = cache
        loss_backward = (
            vocab_parallel_distill_backward
            if isinstance(ce, DistillCache)
            else vocab_parallel_cross_entropy_backward
        )
        dlogits = loss_backward(ce, loss_scale)
        # in 16 bits for 16-bit GEMMs (one launch; nothing else reads it in float32), else as the products read it
        bits = self._reads_bits(dlogits)
        dlogits = self.prec.keep(dlogits) if bits else self.prec.gemm_round_(dlogits)
        # tied: wte's gradient gets the head's share; None: wte frozen (LoRA, train.freeze), its V x C GEMM skipped
        if self.wte.grad is not None:
            work.add(self._wte_weight, dlogits, xf2, shape[-1])
        dx = matmul(dlogits, self.wte.value, prec=self.prec).reshape(shape)
        del dlogits, ce
        if self.sequence_parallel:
            dx = gather_from_sequence_parallel_region_backward(dx, self.tp)
        else:
            dx = copy_to_tp_region_backward(dx, self.tp)
        dx = self.ln_f.backward_input(dx, lnf, work)
        if self.partials is not None:
            work.add(self.partials.reduce)
        return dx

    def _wte_weight(self, dlogits, xf2, C: int, accumulate: bool) -> None:
        dtype = np.float32 if self.prec.is_low(dlogits.dtype) else dlogits.dtype
        if stored_16_bit(dlogits):
            # both operands' bits (_reads_bits): the kept input's, gathered again with sp
            if self.sequence_parallel:
                xf2 = gather_bits(xf2, self.tp).reshape(-1, C)
        elif self.sequence_parallel:  # the forward's gather again
            xf2 = self.prec.use(xf2, dtype)
            xf2 = gather_from_sequence_parallel_region(xf2, self.tp).reshape(-1, C)
        else:
            xf2 = self.prec.gemm_use(xf2, dtype)
        matmul(dlogits.T, xf2, self.wte.grad, accumulate, self.prec)
