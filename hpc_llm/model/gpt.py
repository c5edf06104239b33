"""GPT-2 on one rank: the model as chunks of layer objects over flat buffers, forward, backward, and incremental
decoding with a KV cache.

All parameters a rank holds live in one contiguous buffer `model.flat` and their gradients in `model.grad_flat` with
the same layout (model/layout.py); `model.params[name]` and `model.grads[name]` are views. Under tensor parallelism
a rank's buffers hold its shards, under pipeline parallelism only the layers of its stages (`StagePlan`).
`full_tensors` puts the logical tensors of a stage back together (model/shard_io.py).
"""

from __future__ import annotations

import math

import numpy as np

from hpc_llm.backend import releasable_zeros, release, to_device
from hpc_llm.config import ModelConfig
from hpc_llm.errors import UserError
from hpc_llm.kernels import gemm
from hpc_llm.kernels.cuda import device
from hpc_llm.kernels.dispatch import check_environment
from hpc_llm.model.chunk import Chunk
from hpc_llm.model.ends import Embedding, Head
from hpc_llm.model.kv_cache import KVCache
from hpc_llm.model.layers import NO_PARAM, Param
from hpc_llm.model.layout import (
    ParamSpec,
    StagePlan,
    flops_per_token,
    frozen_names,
    init_tensor,
    intersect_ranges,
    merge_ranges,
    param_specs,
    whole_model,
)
from hpc_llm.model.modules import Block
from hpc_llm.model.precision import Precision
from hpc_llm.model.shard_io import ShardIO
from hpc_llm.parallel.comm import Comm


def stored_16_bit(spec: ParamSpec) -> bool:
    """The tensors a device's 2-byte compute copy serves as they are: the blocks' matrices (GEMM operands)."""
    return spec.name.startswith("h.") and len(spec.local_shape) == 2


def gemm_16_bit(spec: ParamSpec) -> bool:
    """The tensors whose 2-byte bits a device's GEMMs read: the blocks' matrices and wte, the tied head's weight. wte
    is served both ways (its slot in the 2-byte buffer exists, as every tensor's): the head multiplies its bits, the
    embedding gathers its rows in float32 from compute_wide."""
    return stored_16_bit(spec) or spec.name == "wte.weight"


def wide_runs(specs) -> list[tuple[int, int]]:
    """The flat buffer's runs of the other tensors, which the device keeps in float32 too."""
    return merge_ranges((s.offset, s.offset + s.size) for s in specs if not stored_16_bit(s))


def compute_16_bit(xp, prec: Precision, dtype, releasable=frozenset()) -> bool:
    """Whether the compute copy is stored in 2 bytes: on a device, in bf16/fp16, from float32 master weights, and
    not under ZeRO-3 (whose gathers fill the compute copy by ranges of the flat layout)."""
    on = device.on_device(xp) and prec.low is not None
    return on and np.dtype(dtype) == np.float32 and "params" not in releasable


class GPT:
    """GPT-2 on one rank of a tensor-parallel group (`tp_comm`; none: the whole model on this process), holding the
    chunks of the pipeline `plan` that are this rank's (default: the whole model).

    A rank holds its shard of every split tensor (heads of qkv and the MLP, rows of the projections, a slice of the
    vocabulary) and a full copy of the rest; the f/g mappings of tensor_parallel.py join them. `chunks` are its
    pipeline stages (chunk.Chunk); forward/backward below run the whole model when it is one chunk, the pipeline
    runs chunks one by one (parallel/pipeline.py).

    sequence_parallel (training only, tp > 1): the activations between the layers, and between pipeline stages, are
    this rank's slice of positions (B, T/tp, C) (modules.py); decoding does not run so (forward_cached refuses).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        xp=np,
        seed: int | None = 0,
        tp_comm: Comm | None = None,
        tp_act: Comm | None = None,
        plan: StagePlan | None = None,
        recompute: str = "none",
        precision: str = "fp32",
        freeze=(),
        sequence_parallel: bool = False,
        releasable: frozenset = frozenset(),
    ):
        if cfg.vocab_size <= 0:
            raise UserError(
                "model.vocab_size: expected a positive integer (set it, or prepare data first)"
            )
        self.cfg = cfg
        self.xp = xp
        self.tp = tp_comm if tp_comm is not None else Comm(None)
        # the layers' group: tp, or (parallel.act_comm) its 16-bit wire view, which the cross-entropy leaves (Head)
        self.tp_act = tp_act if tp_act is not None else self.tp
        self.plan = plan if plan is not None else whole_model(cfg)
        # train.recompute: "block" (each block's forward again in backward), "selective" (attention's core), "none"
        self.recompute = recompute
        self.sequence_parallel = sequence_parallel
        self.prec = Precision(precision)
        check_environment()  # HPC_LLM_KERNELS, HPC_LLM_POOL: a bad value stops here, before any compute
        self.dtype = np.dtype(cfg.dtype)
        # the whole model's tensors, whatever we hold
        self.logical = {s.name: s.shape for s in param_specs(cfg)}
        self.specs = param_specs(cfg, self.tp.size, self.plan)
        self.spec = {s.name: s for s in self.specs}
        self.io = ShardIO(self.specs, self.logical, self.tp, xp, self.dtype)
        # not trained (LoRA's base, train.freeze): no optimizer state, no update, out of the gradient norm; their
        # linear layers skip the weight gradient (modules.Block), a frozen wte its head's and embedding's (_chunk)
        self.frozen = frozen_names(cfg, freeze)
        self.num_trainable = sum(
            math.prod(shape) for n, shape in self.logical.items() if n not in self.frozen
        )
        # the whole model's
        self.num_params = sum(math.prod(shape) for shape in self.logical.values())
        self.local_size = self.io.local_size  # this rank's flat buffer
        self.heads = cfg.n_head // self.tp.size  # this rank's attention heads
        # the first vocabulary row held here
        self.v0 = self.tp.rank * (cfg.padded_vocab // self.tp.size)
        # which flat buffers hold only some ranges at a time ("grads", "params": ZeRO-2/3, parallel/zero.py), and
        # the ranges of the parameters this rank keeps (None: all of them; ZeRO-3: its shard)
        self.releasable, self.kept = frozenset(releasable), None
        self._make_buffers()
        self.chunks = [self._chunk(v) for v in self.plan.chunks]
        self.has_embedding = self.chunks[0].embedding is not None
        self.has_head = self.chunks[-1].head is not None
        self._cache = None
        if seed is not None:
            self.init_weights(seed)

    def _make_buffers(self) -> None:
        """The flat buffers (zeros) and the named views into them."""
        xp, n = self.xp, self.local_size

        def zeros(kind):
            if kind in self.releasable:
                return releasable_zeros(n, self.dtype, xp)
            return xp.zeros(n, dtype=self.dtype)

        # the master weights (the optimizer's, saved)
        self.flat = zeros("params")
        self.grad_flat = zeros("grads")
        # what forward and backward compute with: the master weights themselves, or (bf16/fp16) a copy of them
        # rounded to the format, refreshed by refresh_compute() whenever the master weights change. On a device it
        # is stored in 2 bytes (device.storage_dtype), which the blocks' GEMMs read (kernels/cuda/gemm16.py); the
        # tensors the fused kernels read in float32 (wide_runs: embeddings, biases, LayerNorm weights) are kept
        # rounded in float32 beside it, packed in compute_wide
        self.compute_wide, self.wide_runs = None, None
        if self.prec.low is None:
            self.compute = self.flat
        elif compute_16_bit(xp, self.prec, self.dtype, self.releasable):
            self.compute = xp.zeros(n, dtype=device.storage_dtype(xp, self.prec))
            self.wide_runs = device.WideRuns(xp, wide_runs(self.specs))
            self.compute_wide = xp.zeros(self.wide_runs.total, dtype=self.dtype)
        else:
            self.compute = zeros("params")
        # bf16 products on oneDNN (kernels/gemm.py): the compute copy's bf16 bits beside it (2 bytes a parameter),
        # written with it by refresh_compute, so no product converts a weight again; not under ZeRO-3, whose
        # compute copy is gathered a unit at a time
        self.compute_bits = None
        if (
            xp is np
            and self.dtype == np.float32
            and "params" not in self.releasable
            and gemm.reads_bf16(self.prec)
        ):
            self.compute_bits = np.zeros(n, dtype=np.uint16)
            gemm.share_bf16_bits(self.compute, self.compute_bits)
        self.params = {s.name: self._compute_view(s) for s in self.specs}
        # the 16-bit views the GEMMs read of the tensors served both ways (gemm_16_bit; none off a device)
        self.params_16_bit = {
            s.name: self.compute[s.offset : s.offset + s.size].reshape(s.local_shape)
            for s in self.specs
            if self.wide_runs is not None and gemm_16_bit(s) and not stored_16_bit(s)
        }
        self.grads = {
            s.name: self.grad_flat[s.offset : s.offset + s.size].reshape(s.local_shape)
            for s in self.specs
        }

    def _compute_view(self, s: ParamSpec):
        """spec s's tensor in the compute copy: in the 2-byte buffer, or packed in compute_wide (wide_runs)."""
        if self.wide_runs is None or stored_16_bit(s):
            return self.compute[s.offset : s.offset + s.size].reshape(s.local_shape)
        at = 0
        for a, b in self.wide_runs.runs:
            if a <= s.offset < b:
                at += s.offset - a
                return self.compute_wide[at : at + s.size].reshape(s.local_shape)
            at += b - a
        raise AssertionError(s.name)

    def _param(self, name: str) -> Param:
        return Param(self.params[name], self.grads[name])

    def _wte(self, gemm: bool) -> Param:
        """wte for the embedding (float32 rows), or for the tied head's GEMMs (gemm: its 16-bit view on a device).
        Frozen, it gets no gradient (grad None, like Block's frozen linears): under LoRA the head's dW would be a
        full V x C GEMM per micro-batch; its gradient buffer stays zero, which nothing reads as trained."""
        name = "wte.weight"
        value = self.params_16_bit.get(name, self.params[name]) if gemm else self.params[name]
        return Param(value, None if name in self.frozen else self.grads[name])

    def _chunk(self, vstage: int) -> Chunk:
        cfg, tp = self.cfg, self.tp_act
        first, last = vstage == 0, vstage == self.plan.n_virtual - 1
        embedding = head = None
        # a frozen token embedding gets no gradient (grad None, like Block's frozen linears): under LoRA the tied
        # head's dW would be a full V x C GEMM per micro-batch; its gradient buffer stays zero, which nothing reads
        # as trained (out of the optimizer's ranges and the norm). wpe's (a cheap sum) is computed, and ignored.
        if first:
            embedding = Embedding(
                self._wte(gemm=False),
                self._param("wpe.weight"),
                self.v0,
                tp,
                cfg.dropout,
                # the head on this rank (the same chunk, or the V's other end) writes wte's gradient first
                head_writes_wte=self.plan.n_virtual - 1 in self.plan.chunks,
                sequence_parallel=self.sequence_parallel,
            )
        blocks = []
        offsets = {}
        for i in self.plan.layers[vstage]:
            p = f"h.{i}."
            blocks.append(
                Block(
                    {k[len(p) :]: self._param(k) for k in self.params if k.startswith(p)},
                    i,
                    cfg.n_head,
                    tp,
                    cfg.dropout,
                    self.prec,
                    lora_scale=cfg.lora_scale,
                    frozen={k[len(p) :] for k in self.frozen if k.startswith(p)},
                    selective=self.recompute == "selective",
                    sequence_parallel=self.sequence_parallel,
                )
            )
            offsets[i] = self.spec[p + "attn.c_attn.weight"].offset  # the block's first tensor
        if last:
            ln_f_bias = self._param("ln_f.bias") if cfg.bias else NO_PARAM
            head = Head(
                self._param("ln_f.weight"),
                ln_f_bias,
                self._wte(gemm=True),
                self.v0,
                cfg.vocab_size,
                tp,
                self.prec,
                self.sequence_parallel,
            )
            offsets["head"] = self.spec["ln_f.weight"].offset
        return Chunk(vstage, embedding, blocks, head, offsets, self.recompute)

    # -- parameters ----------------------------------------------------------------------------------------------------

    def local_view(self, flat, spec: ParamSpec):
        """spec's shard inside a flat buffer laid out like self.flat (parameters, gradients, Adam moments)."""
        return self.io.local_view(flat, spec)

    def shard(self, full: np.ndarray, spec: ParamSpec) -> np.ndarray:
        return self.io.shard(full, spec)

    def kept_ranges(self) -> list[tuple[int, int]]:
        """The ranges of the flat buffers whose parameters this rank keeps: all, or (ZeRO-3) its shard."""
        return [(0, self.local_size)] if self.kept is None else self.kept

    def init_weights(self, seed: int) -> None:
        """Each rank makes the full tensor and keeps its shard: the same logical model on any layout (ZeRO-3: only
        the elements of its kept ranges are written, so the rest of the buffer is never resident)."""
        kept = self.kept_ranges()
        for s in self.specs:
            full = init_tensor(s, seed, self.cfg.vocab_size).astype(self.dtype)
            shard = self.shard(full, s).reshape(-1)
            for a, b in intersect_ranges(kept, [(s.offset, s.offset + s.size)]):
                self.flat[a:b] = to_device(shard[a - s.offset : b - s.offset], self.xp)
        self.refresh_compute()

    def refresh_compute(self) -> None:
        """The compute copy of the kept weights from the master weights (bf16/fp16: rounded to the format); nothing
        to do in fp32."""
        if self.wide_runs is not None:
            device.refresh_compute(
                self.xp, self.flat, self.compute, self.compute_wide, self.wide_runs, self.prec
            )
        elif self.compute is not self.flat:
            # in pieces on NumPy (no full-size temporaries); whole ranges on a device (a piece is 3 launches)
            piece = 1 << 20 if self.xp.__name__ == "numpy" else max(self.local_size, 1)
            for lo, hi in self.kept_ranges():
                for a in range(lo, hi, piece):
                    b = min(a + piece, hi)
                    bits = None if self.compute_bits is None else self.compute_bits[a:b]
                    self.prec.operand(self.flat[a:b], self.compute[a:b], bits)

    def clear_grads(self) -> None:
        """Zero the gradient buffer (ZeRO-2/3: its pages given back)."""
        release(self.grad_flat, 0, self.local_size)

    def check_shapes(self, shapes: dict, what: str = "parameters") -> None:
        """shapes: {name: full shape} must be exactly the whole model's (ShardIO.check_shapes)."""
        self.io.check_shapes(shapes, what)

    def load_flat(self, flat, tensors: dict, what: str = "parameters") -> None:
        """Copy named full tensors into a flat buffer laid out like self.flat, each rank taking its shard."""
        self.io.load_flat(flat, tensors, what)

    def read_flat(self, flat, read, shapes: dict, what: str, ranges=None) -> None:
        """This rank's shards of a flat buffer laid out like self.flat, from a reader of full tensors' hyperslabs
        (ShardIO.read_flat)."""
        self.io.read_flat(flat, read, shapes, what, ranges)

    def load_state(self, tensors: dict) -> None:
        self.load_flat(self.flat, tensors)
        self.refresh_compute()

    def full_tensors(self, flat) -> dict:
        """{name: full tensor} (host copies) from a flat buffer laid out like self.flat, gathered over the TP group
        (ShardIO.full_tensors)."""
        return self.io.full_tensors(flat)

    def decay_ranges(self) -> list[tuple[int, int]]:
        """Contiguous [start, stop) ranges of the flat buffer that get weight decay."""
        return merge_ranges((s.offset, s.offset + s.size) for s in self.specs if s.decay)

    def trainable_ranges(self) -> list[tuple[int, int]]:
        """Contiguous [start, stop) ranges of the flat buffer holding the trained parameters (all of it, unless
        train.freeze or LoRA freeze some)."""
        return merge_ranges(
            (s.offset, s.offset + s.size) for s in self.specs if s.name not in self.frozen
        )

    def replicated_ranges(self) -> list[tuple[int, int]]:
        """Ranges of the flat buffer holding tensors every TP rank has in full (counted once in a global norm)."""
        return merge_ranges((s.offset, s.offset + s.size) for s in self.specs if s.tp_axis is None)

    def tied_copy_range(self) -> tuple[int, int] | None:
        """The last stage's copy of the tied embedding (pp > 1), counted once (on the first stage) in a global norm."""
        if self.has_embedding or not self.has_head:
            return None
        s = self.spec["wte.weight"]
        return s.offset, s.offset + s.size

    def act_shape(self, rows: int, T: int) -> tuple:
        """The shape of an activation between (virtual) pipeline stages for `rows` sequences of T positions: what a
        stage receives, sends, and what its input gradient is. Sequence parallel: this rank's slice of positions."""
        return (rows, T // self.tp.size if self.sequence_parallel else T, self.cfg.n_embd)

    def flops_per_token(self, T: int | None = None) -> float:
        """layout.flops_per_token of this model's config."""
        return flops_per_token(self.cfg, T)

    def check_tokens(self, idx, pos0: int = 0) -> None:
        T = idx.shape[1]
        if pos0 + T > self.cfg.block_size:
            raise UserError(
                f"sequence length {pos0 + T} exceeds model.block_size={self.cfg.block_size}"
            )
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = hi if hi >= self.cfg.vocab_size else lo
            raise UserError(f"token id {bad} outside the vocabulary [0, {self.cfg.vocab_size})")

    # -- the whole model on one rank's chunk: forward / backward ------------------------------------------------------

    def _whole(self) -> Chunk:
        if len(self.chunks) != 1 or not (self.has_embedding and self.has_head):
            raise RuntimeError(
                "this rank holds a pipeline stage, not the whole model: run it through "
                "parallel.pipeline"
            )
        return self.chunks[0]

    def forward(self, idx, targets=None, rng=None, keep_cache: bool = False):
        """idx (B, T) int -> logits (B, T, vocab) if targets is None, else the mean cross-entropy loss (a float).
        keep_cache=True keeps what backward needs (training). Dropout applies when rng is given (a
        layers.DropoutRNG for this rank's rows, or any Generator) and model.dropout > 0."""
        out, cache = self._whole().forward(idx, targets, rng, keep_cache)
        if keep_cache and targets is not None:
            self._cache = cache
        return out

    def backward(self, loss_scale: float = 1.0, accumulate: bool = False, grad_ready=None) -> None:
        """Gradients of loss_scale * (the last forward's loss) into `self.grads`; accumulate=False overwrites them.
        grad_ready(offset), if given, is called as soon as every gradient from `offset` to the end of the flat
        buffer is final (after ln_f and after each block, from the last), so data-parallel buckets can start
        reducing early; when backward returns, all are final (the embeddings' only then)."""
        if self._cache is None:
            raise RuntimeError("backward() needs a forward(..., keep_cache=True) first")
        cache, self._cache = self._cache, None
        self._whole().backward(None, cache, loss_scale, accumulate, grad_ready)

    def split_logits(self, idx):
        """This rank's vocabulary slice of the logits at every position, (B * T, padded_vocab / tp), -inf on the
        padding; inference (nothing kept for a backward): a distillation teacher's (train/teacher.py)."""
        chunk = self._whole()
        x, _ = chunk.embedding.forward(idx)
        for block in chunk.blocks:
            x, _ = block.forward(x)
        logits, _ = chunk.head.forward(x, split=True)
        return logits.reshape(-1, logits.shape[-1])

    # -- a small API for scripts and notebooks -------------------------------------------------------------------------

    def logits(self, idx):
        idx = self.xp.asarray(idx)
        self.check_tokens(idx)
        return self.forward(idx)

    def loss(self, idx, targets) -> float:
        idx, targets = self.xp.asarray(idx), self.xp.asarray(targets)
        self.check_tokens(idx)
        self.check_tokens(targets)
        return self.forward(idx, targets)

    def gradients(self, idx, targets) -> dict:
        """{name: gradient} of the mean loss on (idx, targets), without dropout; copies, safe to keep."""
        idx, targets = self.xp.asarray(idx), self.xp.asarray(targets)
        self.check_tokens(idx)
        self.check_tokens(targets)
        self.forward(idx, targets, keep_cache=True)
        self.backward()
        return {name: g.copy() for name, g in self.grads.items()}

    # -- incremental decoding ------------------------------------------------------------------------------------------

    def forward_cached(
        self, idx, cache: KVCache, lengths=None, last: bool = False, split: bool = False
    ):
        """Logits (B, Tn, vocab) for the new tokens idx (B, Tn) at positions cache.lengths.., updating the cache.
        Equal to the matching rows of a full forward over all tokens so far: the same blocks, their attention
        reading the cached keys and values.

        lengths (B,): the real new tokens of each row (idx right-padded; default Tn): row b's come at its own
        positions, its cache grows by lengths[b] (0: the row only rides along), and causal attention keeps the
        padding out of the real tokens' results. last: only each row's last real token's logits, (B, vocab) (the
        head runs on B rows, not B * Tn). split: this rank's vocabulary slice of the logits, -inf on the padding
        (Head.forward), not gathered over the TP group."""
        chunk = self._whole()
        if self.sequence_parallel:
            raise RuntimeError(
                "decoding runs without sequence parallelism: build the model without it"
            )
        B, Tn = idx.shape
        n = (
            np.full(B, Tn, dtype=np.int64)
            if lengths is None
            else np.asarray(lengths, dtype=np.int64)
        )
        start = cache.lengths
        if B and int(start.max()) + Tn > self.cfg.block_size:
            raise UserError(
                f"sequence length {int(start.max()) + Tn} exceeds model.block_size={self.cfg.block_size}"
            )
        pos0 = int(start[0]) if B and (start == start[0]).all() else start.copy()
        x, _ = chunk.embedding.forward(idx, pos0=pos0)
        for block in chunk.blocks:
            x, _ = block.forward(x, kv=cache.kv[block.layer], pos0=pos0)
        cache.lengths = start + n
        if last:
            x = x[np.arange(B), np.maximum(n - 1, 0)][:, None]
        logits = chunk.head.forward(x, split=split)[0]
        return logits[:, 0] if last else logits
