"""Tensor parallelism, Megatron-LM's scheme: the f/g mappings, sharding of full tensors, and the vocabulary-parallel
embedding and cross-entropy.

Communication is named by what it does at the f/g points, so a reader sees every collective:

    copy_to_tp_region      forward: identity    backward: allreduce   (f: before a column-parallel layer)
    reduce_from_tp_region  forward: allreduce   backward: identity    (g: after a row-parallel layer)
    gather_from_tp_region  forward: allgather of the last axis        (full logits for inference)

and, with sequence parallelism (Megatron-LM's: the residual stream between the layers is cut along the sequence, rank
r holding positions [r T/tp, (r+1) T/tp), so LayerNorm, dropout and the residual adds run on 1/tp of it):

    gather_from_sequence_parallel_region        forward: allgather along T        backward: reduce-scatter along T
                                                (f's place: before a column-parallel layer and the head's logits)
    reduce_scatter_to_sequence_parallel_region  forward: reduce-scatter along T   backward: allgather along T
                                                (g's place: after a row-parallel layer and the embedding's sum)

With a TP group of one rank every collective is a no-op and these layers are the plain ones.
"""

from __future__ import annotations

import numpy as np

from hpc_llm.backend import array_module
from hpc_llm.kernels.cuda import device
from hpc_llm.kernels.cuda.gemm16 import stored_16_bit
from hpc_llm.model.layers import (
    Param,
    WeightWork,
    linear_backward_input,
    linear_backward_weight,
    linear_forward,
)
from hpc_llm.model.precision import FP32, Precision
from hpc_llm.parallel.comm import Comm

# ---------------------------------------------------------------------------------------------------------------------
# The f and g mappings


def copy_to_tp_region(x, comm: Comm):
    """f, forward: every TP rank already holds the full input."""
    return x


def copy_to_tp_region_backward(dx, comm: Comm):
    """f, backward: each rank has the gradient of its shard's use of x; the input gradient is their sum."""
    return comm.allreduce_(dx)


def reduce_from_tp_region(x, comm: Comm):
    """g, forward: sum the partial outputs of a row-parallel layer."""
    return comm.allreduce_(x)


def reduce_from_tp_region_backward(dx, comm: Comm):
    """g, backward: the gradient of a sum reaches every partial unchanged."""
    return dx


def gather_from_tp_region(x, comm: Comm):
    """The full last axis from each rank's slice of it (rank order)."""
    if comm.size == 1:
        return x
    xp = array_module(x)
    n = x.shape[-1]
    flat = xp.empty((comm.size, *x.shape), dtype=x.dtype)
    flat[comm.rank] = x
    comm.allgather_(flat.reshape(-1), [x.size] * comm.size)
    return xp.moveaxis(flat, 0, -2).reshape(*x.shape[:-1], comm.size * n)


# ---------------------------------------------------------------------------------------------------------------------
# Sequence parallelism's mappings: activations (B, T, C) cut along T (SEQ_AXIS) over the TP group

SEQ_AXIS = 1


def gather_from_sequence_parallel_region(x, comm: Comm):
    """forward: every rank's slice of positions -> the whole sequence (rank order), where f would pass x through."""
    return comm.allgather_along(x, SEQ_AXIS)


def gather_from_sequence_parallel_region_backward(dx, comm: Comm):
    """backward: each rank's gradient of the whole sequence is a partial (its shard's use of it): summed over the
    group, each rank keeping its own positions."""
    return comm.reduce_scatter_along(dx, SEQ_AXIS)


def reduce_scatter_to_sequence_parallel_region(x, comm: Comm):
    """forward: the partial outputs of a row-parallel layer summed, each rank keeping its own positions (g's
    allreduce, of which each rank needs only its slice)."""
    return comm.reduce_scatter_along(x, SEQ_AXIS)


def reduce_scatter_to_sequence_parallel_region_backward(dx, comm: Comm):
    """backward: every partial needs the gradient of every position: the slices gathered."""
    return comm.allgather_along(dx, SEQ_AXIS)


# ---------------------------------------------------------------------------------------------------------------------
# Column- and row-parallel linear layers: each owns its mapping, so every collective sits beside its twin


class ColumnParallelLinear:
    """y = f(x) @ w + b with this rank's columns of w and b (Megatron's ColumnParallelLinear). f =
    copy_to_tp_region: every rank uses the whole input, so its gradient is summed over the group in backward. The
    output stays split over the group (this rank's heads, or its slice of the MLP's hidden units). prec: the
    operands' format (the input is kept in it); products accumulate in the compute dtype.

    lora = (A, B, s): a LoRA adapter, y += s h B with h = f(x A): A (in, r) replicated, so h is the same on every
    rank, B (r, out) split like w's columns. h's f: each rank's dh = s dy B_local^T is a partial, summed over the
    group (the allreduce of f's backward, (N, r) elements) before dA = x^T dh and the input gradient dh A^T, which
    is then the same on every rank and is added after the layer's own input-gradient allreduce. A weight whose
    gradient is None (frozen) gets none computed.

    sequence_parallel: the input is this rank's slice of positions (B, T/tp, C), and the mapping is
    gather_from_sequence_parallel_region instead of f: forward gathers the whole sequence for the matmul but keeps
    only the slice (in the precision's format), backward gathers it again for the weight gradient (Megatron's
    choice: the gathered copy would cost tp times the slice for as long as the micro-batch is in flight) and
    reduce-scatters the input gradient instead of allreducing it. No LoRA with it (config check)."""

    def __init__(
        self,
        w: Param,
        b: Param,
        comm: Comm,
        prec: Precision = FP32,
        lora=None,
        sequence_parallel: bool = False,
    ):
        self.w, self.b, self.comm, self.prec, self.lora = w, b, comm, prec, lora
        self.sequence_parallel = sequence_parallel
        assert lora is None or not sequence_parallel, "LoRA with sequence parallelism"

    def forward(self, x, bias: bool = True):
        """-> (y, cache): the cache is the input (as an operand, in the precision's format), and LoRA's h.
        bias=False: y without the bias (the caller adds it, in a fused kernel after; no LoRA)."""
        b = self.b.value if bias else None
        assert bias or self.lora is None, "the bias left out with LoRA"
        # the compute dtype: x's (a device's weights may be stored in 2 bytes)
        dtype = x.dtype
        bits = _reads_bits(self.w.value, x, self.lora)
        if self.sequence_parallel:
            x = self.prec.keep(x)  # the slice
            if bits:  # the gathered bits are the GEMM's operand
                return linear_forward(gather_bits(x, self.comm), self.w.value, b, self.prec), x
            xu = _gather_kept(self.prec, x, self.comm, dtype)
            return linear_forward(xu, self.w.value, b, self.prec), x
        if bits:  # the kept bits are the GEMM's operand
            x = self.prec.keep(copy_to_tp_region(x, self.comm))
            return linear_forward(x, self.w.value, b, self.prec), x
        x, xu = self.prec.keep_use(copy_to_tp_region(x, self.comm), dtype)
        y = linear_forward(xu, self.w.value, b, self.prec)
        if self.lora is None:
            return y, x
        A, B, s = self.lora
        h = self.prec.keep(
            copy_to_tp_region(linear_forward(xu, A.value, None, self.prec), self.comm)
        )
        _add_scaled(y, linear_forward(self.prec.use(h, y.dtype), B.value, None, self.prec), s)
        return y, (x, h)

    def backward(self, dy, cache, accumulate: bool):
        return self.backward_input(dy, cache, WeightWork(accumulate))

    def backward_input(self, dy, cache, work: WeightWork):
        """B: the input gradient; the weight gradients go to `work` (W: dy and the kept input; LoRA's dh too)."""
        x, h = cache if self.lora is not None else (cache, None)
        dy, dy_w = _operands(self.prec, dy, self.w.value, self.lora)
        if self.lora is not None and not work.deferred:
            # used twice at once (w's and A's gradients): converted once
            x = self.prec.use(x, dy.dtype)
        if self.w.grad is not None or self.b.grad is not None:
            # dy's bits for the GEMM: at once only (deferred, W narrows dy itself: nothing more is kept)
            work.add(self._weight, dy, x, None if work.deferred or dy_w is dy else dy_w)
        dx = linear_backward_input(dy_w, self.w.value, self.prec)
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region_backward(dx, self.comm)
        dx = copy_to_tp_region_backward(dx, self.comm)
        if self.lora is not None:
            A, B, s = self.lora
            dys = self.prec.operand(dy * s) if s != 1 else dy
            if B.grad is not None:
                work.add(self._lora_weight, dys, h, B.grad)
            dh = linear_backward_input(dys, B.value, self.prec)
            # h's f: the partials summed
            dh = self.prec.operand(copy_to_tp_region_backward(dh, self.comm))
            if A.grad is not None:
                work.add(self._lora_weight, dh, x, A.grad)
            dx += linear_backward_input(dh, A.value, self.prec)
        return dx

    def _weight(self, dy, x, dy_bits, accumulate: bool) -> None:
        """W: dw and db from the output gradient and the kept input (the slice, gathered again under sequence
        parallelism; a frozen weight needs no input)."""
        if self.w.grad is not None:
            bits = _reads_bits(self.w.value, dy, self.lora) and stored_16_bit(x)
            if self.sequence_parallel:  # the forward's gather again
                x = (
                    gather_bits(x, self.comm)
                    if bits
                    else _gather_kept(self.prec, x, self.comm, dy.dtype)
                )
            elif not bits:
                x = _used(self.prec, x, dy.dtype)
        linear_backward_weight(dy, x, self.w.grad, self.b.grad, accumulate, self.prec, dy_bits)

    def _lora_weight(self, dy, x, grad, accumulate: bool) -> None:
        linear_backward_weight(dy, _used(self.prec, x, dy.dtype), grad, None, accumulate, self.prec)


class RowParallelLinear:
    """y = g(x @ w) + b with this rank's rows of w and an input split the same way (Megatron's RowParallelLinear).
    g = reduce_from_tp_region sums the partial products (its backward is the identity); the bias, replicated, is
    added once, after the sum. prec as ColumnParallelLinear's.

    lora = (A, B, s): a LoRA adapter, y += s h B with h = g(x_local A_local): A (in, r) split along its rows like w,
    B (r, out) replicated. h's g is an (N, r) allreduce in forward, the identity in backward: dB = s h^T dy and
    dh = s dy B^T are the same on every rank, dA_local = x_local^T dh and the input gradient dh A_local^T stay this
    rank's share, as the layer's own.

    sequence_parallel: the mapping is reduce_scatter_to_sequence_parallel_region instead of g: forward sums the
    partial products but keeps this rank's slice of positions (B, T/tp, C), the bias added on it; backward gathers
    the output gradient of every position, so the bias gradient (summed over all of them) is whole on every rank,
    not a partial. No LoRA with it (config check)."""

    def __init__(
        self,
        w: Param,
        b: Param,
        comm: Comm,
        prec: Precision = FP32,
        lora=None,
        sequence_parallel: bool = False,
    ):
        self.w, self.b, self.comm, self.prec, self.lora = w, b, comm, prec, lora
        self.sequence_parallel = sequence_parallel
        assert lora is None or not sequence_parallel, "LoRA with sequence parallelism"
        # the layer's own mapping and its backward twin
        self.reduce, self.reduce_backward = (
            (
                reduce_scatter_to_sequence_parallel_region,
                reduce_scatter_to_sequence_parallel_region_backward,
            )
            if sequence_parallel
            else (reduce_from_tp_region, reduce_from_tp_region_backward)
        )

    def forward(self, x, bias: bool = True):
        """-> (y, cache): the cache is the input (as an operand, in the precision's format), and LoRA's h.
        bias=False: y without the bias (the caller adds it, in a fused kernel after; no LoRA)."""
        assert bias or self.lora is None, "the bias left out with LoRA"
        if _reads_bits(self.w.value, x, self.lora):  # the kept bits are the GEMM's operand
            x = xu = self.prec.keep(x)
        else:
            x, xu = self.prec.keep_use(x, x.dtype)
        y = self.reduce(linear_forward(xu, self.w.value, None, self.prec), self.comm)
        if bias and self.b.value is not None:
            y += self.b.value
        if self.lora is None:
            return y, x
        A, B, s = self.lora
        h = self.prec.keep(
            reduce_from_tp_region(linear_forward(xu, A.value, None, self.prec), self.comm)
        )
        _add_scaled(y, linear_forward(self.prec.use(h, y.dtype), B.value, None, self.prec), s)
        return y, (x, h)

    def backward(self, dy, cache, accumulate: bool):
        return self.backward_input(dy, cache, WeightWork(accumulate))

    def backward_input(self, dy, cache, work: WeightWork):
        """B: the input gradient; the weight gradients go to `work` (W: dy after the mapping's backward and the
        kept input; LoRA's dh too). dy must stay as it is until W has run (WeightWork.keep)."""
        x, h = cache if self.lora is not None else (cache, None)
        if self.sequence_parallel:
            dy, dy_w = _gathered_operand(self.prec, dy, self.comm, self.w.value)
        else:
            dy = self.reduce_backward(dy, self.comm)
            dy, dy_w = _operands(self.prec, dy, self.w.value, self.lora)
        if self.lora is not None and not work.deferred:
            # used twice at once (w's and A's gradients): converted once
            x = self.prec.use(x, dy.dtype)
        if self.w.grad is not None or self.b.grad is not None:
            bits = None if work.deferred or dy_w is dy else dy_w  # as ColumnParallelLinear's
            work.add(self._weight, dy, x, self.w.grad, self.b.grad, bits)
        dx = linear_backward_input(dy_w, self.w.value, self.prec)
        if self.lora is not None:
            A, B, s = self.lora
            dys = self.prec.operand(dy * s) if s != 1 else dy
            if B.grad is not None:
                work.add(self._weight, dys, h, B.grad, None, None)
            dh = linear_backward_input(dys, B.value, self.prec)
            # h's g: the identity
            dh = self.prec.operand(reduce_from_tp_region_backward(dh, self.comm))
            if A.grad is not None:
                work.add(self._weight, dh, x, A.grad, None, None)
            dx += linear_backward_input(dh, A.value, self.prec)
        return dx

    def _weight(self, dy, x, dw, db, dy_bits, accumulate: bool) -> None:
        """W: a weight's (and bias's) gradient from an output gradient and a kept input."""
        if dw is not None and not (_reads_bits(self.w.value, dy, self.lora) and stored_16_bit(x)):
            x = _used(self.prec, x, dy.dtype)
        linear_backward_weight(dy, x, dw, db, accumulate, self.prec, dy_bits)


def _used(prec: Precision, x, dtype):
    """A kept input as a product's operand: converted from the format unless B already did (or the products
    take the format as it is: Precision.gemm_use)."""
    return x if x.dtype == dtype else prec.gemm_use(x, dtype)


def _gather_kept(prec: Precision, kept, comm: Comm, dtype):
    """Sequence parallelism's gather of a kept input slice, as a whole operand in dtype. On a device with a 16-bit
    format the kept bits travel (2 bytes an element whatever parallel.act_comm, no wire conversions: the values are
    the format's already) and the whole is widened once; elsewhere the slice is widened, then gathered."""
    if prec.low is not None and device.on_device(array_module(kept)) and kept.dtype.itemsize == 2:
        return prec.use(gather_bits(kept, comm), dtype)
    # a bf16 operand's dtype asked for (Precision.gemm_operand): the gather's is float32
    wide = np.float32 if prec.is_low(dtype) else dtype
    return gather_from_sequence_parallel_region(
        kept if kept.dtype == wide else prec.use(kept, wide), comm
    )


def gather_bits(kept, comm: Comm):
    """A kept 16-bit slice gathered whole as its bits (the values are the format's: no wire conversions)."""
    return gather_from_sequence_parallel_region(kept.view(np.uint16), comm.plain).view(kept.dtype)


def _reads_bits(w, x, lora) -> bool:
    """Whether a linear layer's GEMMs take its input's kept 16-bit bits (forward's, and the weight gradient's): w
    stored in 2 bytes (a device's compute copy, kernels/cuda/gemm16.py) and no LoRA (whose GEMMs read the float32
    operand)."""
    return lora is None and stored_16_bit(w) and x.dtype == np.float32


def _operands(prec: Precision, dy, w, lora):
    """An output gradient as a matmul operand (the format's values) and as the input-gradient GEMM's operand: for w
    stored in 2 bytes on a device, float32 and its bits, from the same launch (keep_use); else the operand twice,
    in float32 with LoRA (which scales dy in float32), else as the products read it (Precision.gemm_operand: bf16
    on oneDNN)."""
    if prec.low is not None and stored_16_bit(w) and dy.dtype == np.float32:
        bits, dy = prec.keep_use(dy, dy.dtype)
        return dy, bits
    dy = prec.operand(dy) if lora is not None else prec.gemm_operand(dy)
    return dy, dy


def _gathered_operand(prec: Precision, dy, comm: Comm, w):
    """Sequence parallelism: a row-parallel layer's output gradient gathered whole (its mapping's backward), as a
    matmul operand, and the input-gradient GEMM's (for w stored in 2 bytes: the gathered bits). On a device with a
    16-bit format each slice is rounded first and its bits travel, the whole widened once (_gather_kept): the values
    of gathering then rounding, as rounding is elementwise, unless a wire of another format or fp16's scaled one
    would round before (those gather, then round)."""
    same = comm.wire is None or comm.wire == prec.name == "bf16"
    if (
        prec.low is not None
        and same
        and device.on_device(array_module(dy))
        and dy.dtype == np.float32
    ):
        bits = gather_bits(prec.keep(dy), comm)
        used = prec.use(bits, dy.dtype)
        return used, bits if stored_16_bit(w) else used
    used = prec.operand(reduce_scatter_to_sequence_parallel_region_backward(dy, comm))
    return used, used


def _add_scaled(y, z, s: float) -> None:
    """y += s z (z is ours to scale in place)."""
    if s != 1:
        z *= s
    y += z


# ---------------------------------------------------------------------------------------------------------------------
# Sharding a full (logical) tensor by its spec (DESIGN principle 4)


def shard_slices(
    shape: tuple, tp_axis: int | None, tp_blocks: int, tp: int, rank: int
) -> list[tuple]:
    """Rank's shard as hyperslabs of the full tensor, which concatenated along tp_axis give it: along tp_axis, each of
    tp_blocks equal blocks is cut into tp pieces and the rank takes piece `rank` of every block (so a rank gets its
    heads' q, k and v). A reader of a file reads only these."""
    if tp_axis is None or tp == 1:
        return [(slice(None),) * len(shape)]
    n = shape[tp_axis] // tp_blocks
    piece = n // tp
    return [
        (slice(None),) * tp_axis + (slice(b * n + rank * piece, b * n + (rank + 1) * piece),)
        for b in range(tp_blocks)
    ]


def shard_index(shape: tuple, tp_axis: int | None, tp_blocks: int, tp: int, rank: int):
    """shard_slices as one index into the full tensor: an index array along tp_axis (or all of it when unsplit)."""
    slabs = shard_slices(shape, tp_axis, tp_blocks, tp, rank)
    if tp_axis is None or tp == 1:
        return slabs[0]
    idx = np.concatenate([np.arange(s[tp_axis].start, s[tp_axis].stop) for s in slabs])
    return (slice(None),) * tp_axis + (idx,)


def shard(full, spec, tp: int, rank: int):
    return full[shard_index(spec.shape, spec.tp_axis, spec.tp_blocks, tp, rank)]


def local_shape(spec, tp: int) -> tuple:
    if spec.tp_axis is None:
        return spec.shape
    s = list(spec.shape)
    s[spec.tp_axis] //= tp
    return tuple(s)
