"""GPT-2: the parameter layout (flat buffers), the model as chunks of layer objects, forward, backward, and
incremental decoding with a KV cache.

All parameters a rank holds live in one contiguous buffer `model.flat` and their gradients in `model.grad_flat` with
the same layout; `model.params[name]` and `model.grads[name]` are views. Under tensor parallelism a rank's buffers
hold its shards (`ParamSpec.local_shape`); under pipeline parallelism only the layers of its stages (`StagePlan`):
the embedding on the first stage, the head (with its copy of the tied embedding) on the last. `full_tensors` puts the
logical tensors of a stage back together. Parameter names are GPT-2's Hugging Face names without the `transformer.`
prefix, and weights are stored (in, out) like its Conv1D, so imported weights need no transpose.
"""

from __future__ import annotations

import fnmatch
import math
import zlib
from dataclasses import dataclass

import numpy as np

from hpc_llm.backend import to_device, to_host
from hpc_llm.config import ModelConfig
from hpc_llm.config_checks import LORA_TARGETS
from hpc_llm.errors import UserError
from hpc_llm.model import layers as L
from hpc_llm.model import tensor_parallel as TP
from hpc_llm.model.layers import Param
from hpc_llm.model.modules import Block, Chunk, Embedding, Head
from hpc_llm.model.precision import Precision
from hpc_llm.parallel.comm import Comm


@dataclass(frozen=True)
class ParamSpec:
    """One tensor in the flat buffer, with what initialisation, the optimizer and tensor parallelism need.

    tp_axis: the axis split over the tensor-parallel group (None: replicated). tp_blocks: that axis is made of this many
    equal blocks each split separately (3 for the fused q|k|v columns, so each rank gets its heads' q, k and v).
    """

    name: str
    shape: tuple  # the full, logical shape (checkpoints, initialisation)
    offset: int  # where this rank's shard starts in the flat buffer
    init_std: float  # > 0: normal(0, std); 0: zeros; -1: ones
    decay: bool  # AdamW weight decay applies (2-D weights only, as nanoGPT)
    tp_axis: int | None = None
    tp_blocks: int = 1
    local_shape: tuple = ()  # this rank's shard: shape with tp_axis divided by the TP size

    @property
    def size(self) -> int:
        """Elements of this rank's shard (the flat buffer's share)."""
        return math.prod(self.local_shape)


@dataclass(frozen=True)
class StagePlan:
    """The pipeline split: the layers of each of pp * virtual (virtual) stages, in model order, and which of them
    this rank holds: virtual stage c * pp + rank for each of its chunks c (Megatron's interleaving; one chunk
    without it). The default is the whole model on one stage."""

    layers: tuple  # (range, ...) per virtual stage
    pp: int = 1
    rank: int = 0
    virtual: int = 1

    @property
    def n_virtual(self) -> int:
        return self.pp * self.virtual

    @property
    def chunks(self) -> list[int]:
        """The virtual stages this rank holds, in its buffer's order."""
        return [c * self.pp + self.rank for c in range(self.virtual)]


def whole_model(cfg: ModelConfig) -> StagePlan:
    return StagePlan((range(cfg.n_layer),))


def param_specs(cfg: ModelConfig, tp: int = 1, plan: StagePlan | None = None) -> list[ParamSpec]:
    """The flat-buffer layout of one rank (every rank of a TP group has the same layout): the token embedding first
    where the rank holds the embedding or the head (the tied copy: offset 0, so the data-parallel bucket holding it
    is reduced only after the copies' gradients are summed), the position embedding with the embedding, then the
    blocks of its chunks in forward order, the final LayerNorm with the head. Within a block the decayed weights
    come first and the LayerNorm/bias parameters after, so weight decay touches a few contiguous ranges; blocks are
    in forward order, so a gradient bucket taken from the end of the buffer is complete early in backward.

    LoRA (model.lora_rank = r > 0): each target linear layer's adapters follow the block's weights, A (in, r) and
    B (r, out), sharded like the layer they adapt: beside a column-parallel weight (split along out) A is replicated
    and B split along axis 1 in the weight's blocks; beside a row-parallel one (split along in) A is split along axis
    0 and B replicated. A ~ normal(0, 1/sqrt(3 in)) (the variance of PEFT's Kaiming-uniform), B = 0: the adapted
    model starts equal to the base. Decayed like every 2-D weight."""
    plan = plan if plan is not None else whole_model(cfg)
    first, last = 0 in plan.chunks, plan.n_virtual - 1 in plan.chunks
    C, V = cfg.n_embd, cfg.padded_vocab
    std, proj_std = 0.02, 0.02 / math.sqrt(2 * cfg.n_layer)
    rows = [("wte.weight", (V, C), std, True, 0, 1)] if first or last else []
    if first:
        rows.append(("wpe.weight", (cfg.block_size, C), std, True, None, 1))
    for i in (i for v in plan.chunks for i in plan.layers[v]):
        p = f"h.{i}."
        rows += [
            (p + "attn.c_attn.weight", (C, 3 * C), std, True, 1, 3),
            (p + "attn.c_proj.weight", (C, C), proj_std, True, 0, 1),
            (p + "mlp.c_fc.weight", (C, 4 * C), std, True, 1, 1),
            (p + "mlp.c_proj.weight", (4 * C, C), proj_std, True, 0, 1),
            *_lora_rows(cfg, p),
            (p + "ln_1.weight", (C,), -1, False, None, 1),
            (p + "ln_1.bias", (C,), 0, False, None, 1),
            (p + "attn.c_attn.bias", (3 * C,), 0, False, 0, 3),
            (p + "attn.c_proj.bias", (C,), 0, False, None, 1),
            (p + "ln_2.weight", (C,), -1, False, None, 1),
            (p + "ln_2.bias", (C,), 0, False, None, 1),
            (p + "mlp.c_fc.bias", (4 * C,), 0, False, 0, 1),
            (p + "mlp.c_proj.bias", (C,), 0, False, None, 1),
        ]
    if last:
        rows += [("ln_f.weight", (C,), -1, False, None, 1), ("ln_f.bias", (C,), 0, False, None, 1)]
    if not cfg.bias:  # nanoGPT's bias=False: no biases in the linear layers and LayerNorms
        rows = [r for r in rows if not r[0].endswith(".bias")]
    specs, offset = [], 0
    for name, shape, init_std, decay, tp_axis, tp_blocks in rows:
        local = list(shape)
        if tp_axis is not None:
            local[tp_axis] //= tp
        spec = ParamSpec(name, shape, offset, init_std, decay, tp_axis, tp_blocks, tuple(local))
        specs.append(spec)
        offset += spec.size
    return specs


# each LoRA target (config_checks.LORA_TARGETS, its canonical order): (input
# features, output features, the weight's tp_axis, its tp_blocks), in units of n_embd
LORA_LAYERS = dict(
    zip(LORA_TARGETS, ((1, 3, 1, 3), (1, 1, 0, 1), (1, 4, 1, 1), (4, 1, 0, 1)), strict=True)
)


def _lora_rows(cfg: ModelConfig, prefix: str) -> list[tuple]:
    """The adapters of one block (param_specs' rows), in the order of model.lora_targets' canonical order."""
    r, C = cfg.lora_rank, cfg.n_embd
    if r <= 0:
        return []
    rows = []
    for target, (n_in, n_out, axis, blocks) in LORA_LAYERS.items():
        if target not in cfg.lora_targets:
            continue
        a_axis, b_axis = (
            (None, 1) if axis == 1 else (0, None)
        )  # column-parallel: B split; row-parallel: A split
        rows += [
            (
                f"{prefix}{target}.lora_A",
                (n_in * C, r),
                1.0 / math.sqrt(3 * n_in * C),
                True,
                a_axis,
                1,
            ),
            (f"{prefix}{target}.lora_B", (r, n_out * C), 0, True, b_axis, blocks if b_axis else 1),
        ]
    return rows


def is_lora(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def frozen_names(cfg: ModelConfig, freeze=()) -> set[str]:
    """The whole model's parameters that are not trained: with LoRA every base parameter, and those train.freeze's
    fnmatch patterns match (the start-up, train/startup.check_freeze, has checked that each matches something)."""
    names = [s.name for s in param_specs(cfg)]
    frozen = {n for n in names if cfg.lora_rank > 0 and not is_lora(n)}
    for pattern in freeze:
        frozen.update(fnmatch.filter(names, pattern))
    return frozen


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """Sorted [start, stop) ranges with touching neighbours merged."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [tuple(r) for r in out]


def intersect_ranges(ranges, others) -> list[tuple[int, int]]:
    """The [start, stop) ranges both sorted lists cover."""
    return merge_ranges(
        (max(a, c), min(b, d)) for a, b in ranges for c, d in others if max(a, c) < min(b, d)
    )


def init_tensor(spec: ParamSpec, seed: int, vocab_size: int) -> np.ndarray:
    """The full tensor for `spec`, from a stream keyed by (seed, name): the same whatever the layout or backend."""
    if spec.init_std == 0:
        return np.zeros(spec.shape)
    if spec.init_std == -1:
        return np.ones(spec.shape)
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    t = rng.standard_normal(spec.shape) * spec.init_std
    if spec.name == "wte.weight":
        t[vocab_size:] = 0  # pad rows: never a target, masked out of the softmax
    return t


class KVCache:
    """Keys and values of the positions decoded so far, per layer: (B, H, block_size, hd) each, and each row's
    length (rows of a batch of prompts of different lengths fill their caches at their own pace)."""

    def __init__(self, model: GPT, batch: int, reuse: bool = False):
        """reuse: take the memory from the model's pool (`release()` gives it back), not fresh memory: first
        touching hundreds of MB of new pages costs more than a GPT-2 small prefill's attention (docs/performance.md,
        issue 14). The pool keeps one flat buffer per dtype, the largest released, and a cache of any batch is a
        view of its first elements: caches of many sizes (generate's rebuilt rows, a last smaller batch) pin no more
        than the largest of them. A reused buffer holds stale keys and values beyond each row's length, which are
        never read: a query sees only the positions up to its own, all written for this sequence."""
        cfg = model.cfg
        hd = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, 2, batch, model.heads, cfg.block_size, hd)
        dtype, size = np.dtype(model.dtype), math.prod(shape)
        self._pool = model.__dict__.setdefault("_kv_pool", {}) if reuse else None
        free = self._pool.pop(dtype.str, None) if reuse else None
        if free is not None and free.size < size:
            free = None  # too small: freed before the larger one is allocated (which replaces it on release)
        self._buf = free if free is not None else model.xp.zeros(size, dtype=dtype)
        self.kv = self._buf[:size].reshape(shape)
        self.lengths = np.zeros(batch, dtype=np.int64)

    def release(self) -> None:
        """Give a reused buffer back to the model's pool, unless it holds a larger one; the cache is unusable
        after."""
        if self._pool is not None and self._buf is not None:
            held = self._pool.get(self._buf.dtype.str)
            if held is None or held.size < self._buf.size:
                self._pool[self._buf.dtype.str] = self._buf
        self.kv = self._buf = None

    @property
    def length(self) -> int:
        """The longest row's length (every row's, when they are all the same)."""
        return int(self.lengths.max()) if self.lengths.size else 0

    def take(self, rows, other: KVCache) -> None:
        """Rows `rows` of this cache become other's rows 0, 1, ... (a rebuilt context), up to other's length."""
        n = other.length
        for i, r in enumerate(rows):
            self.kv[:, :, r, :, :n] = other.kv[:, :, i, :, :n]
            self.lengths[r] = other.lengths[i]


class GPT:
    """GPT-2 on one rank of a tensor-parallel group (`tp_comm`; none: the whole model on this process), holding the
    chunks of the pipeline `plan` that are this rank's (default: the whole model).

    A rank holds its shard of every split tensor (heads of qkv and the MLP, rows of the projections, a slice of the
    vocabulary) and a full copy of the rest; the f/g mappings of tensor_parallel.py join them. `chunks` are its
    pipeline stages (modules.Chunk); forward/backward below run the whole model when it is one chunk, the pipeline
    runs chunks one by one (parallel/pipeline.py).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        xp=np,
        seed: int | None = 0,
        tp_comm: Comm | None = None,
        plan: StagePlan | None = None,
        recompute: bool = False,
        precision: str = "fp32",
        freeze=(),
    ):
        if cfg.vocab_size <= 0:
            raise UserError(
                "model.vocab_size: expected a positive integer (set it, or prepare data first)"
            )
        self.cfg = cfg
        self.xp = xp
        self.tp = tp_comm if tp_comm is not None else Comm(None)
        self.plan = plan if plan is not None else whole_model(cfg)
        self.recompute = (
            recompute  # train.recompute = "block": each block's forward again in backward
        )
        self.prec = Precision(precision)
        self.dtype = np.dtype(cfg.dtype)
        self.logical = {
            s.name: s.shape for s in param_specs(cfg)
        }  # the whole model's tensors, whatever we hold
        self.specs = param_specs(cfg, self.tp.size, self.plan)
        self.spec = {s.name: s for s in self.specs}
        # not trained (LoRA's base, train.freeze): no optimizer state, no update, out of the gradient norm; their
        # linear layers skip the weight gradient (modules.Block), a frozen wte its head's and embedding's (_chunk)
        self.frozen = frozen_names(cfg, freeze)
        self.num_trainable = sum(
            math.prod(shape) for n, shape in self.logical.items() if n not in self.frozen
        )
        self.num_params = sum(
            math.prod(shape) for shape in self.logical.values()
        )  # the whole model's
        self.local_size = sum(s.size for s in self.specs)  # this rank's flat buffer
        self.heads = cfg.n_head // self.tp.size  # this rank's attention heads
        self.v0 = self.tp.rank * (
            cfg.padded_vocab // self.tp.size
        )  # first vocabulary row held here
        self.flat = xp.zeros(
            self.local_size, dtype=self.dtype
        )  # the master weights (the optimizer's, saved)
        self.grad_flat = xp.zeros(self.local_size, dtype=self.dtype)
        # what forward and backward compute with: the master weights themselves, or (bf16/fp16) a copy of them
        # rounded to the format, refreshed by refresh_compute() whenever the master weights change
        self.compute = self.flat if self.prec.low is None else xp.zeros_like(self.flat)
        self.params = {
            s.name: self.compute[s.offset : s.offset + s.size].reshape(s.local_shape)
            for s in self.specs
        }
        self.grads = {
            s.name: self.grad_flat[s.offset : s.offset + s.size].reshape(s.local_shape)
            for s in self.specs
        }
        self.chunks = [self._chunk(v) for v in self.plan.chunks]
        self.has_embedding = self.chunks[0].embedding is not None
        self.has_head = self.chunks[-1].head is not None
        self._cache = None
        if seed is not None:
            self.init_weights(seed)

    def _param(self, name: str) -> Param:
        return Param(self.params[name], self.grads[name])

    def _chunk(self, vstage: int) -> Chunk:
        cfg, tp = self.cfg, self.tp
        first, last = vstage == 0, vstage == self.plan.n_virtual - 1
        embedding = head = None
        # a frozen token embedding gets no gradient (grad None, like Block's frozen linears): under LoRA the tied
        # head's dW would be a full V x C GEMM per micro-batch; its gradient buffer stays zero, which nothing reads
        # as trained (out of the optimizer's ranges and the norm). wpe's (a cheap sum) is computed, and ignored.
        wte = Param(self.params["wte.weight"], None) if "wte.weight" in self.frozen else None
        if first:
            embedding = Embedding(
                wte or self._param("wte.weight"),
                self._param("wpe.weight"),
                self.v0,
                tp,
                cfg.dropout,
                head_writes_wte=last,
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
                )
            )
            offsets[i] = self.spec[p + "attn.c_attn.weight"].offset  # the block's first tensor
        if last:
            ln_f_bias = self._param("ln_f.bias") if cfg.bias else L.NO_PARAM
            head = Head(
                self._param("ln_f.weight"),
                ln_f_bias,
                wte or self._param("wte.weight"),
                self.v0,
                cfg.vocab_size,
                tp,
                self.prec,
            )
            offsets["head"] = self.spec["ln_f.weight"].offset
        return Chunk(vstage, embedding, blocks, head, offsets, self.recompute)

    # -- parameters ----------------------------------------------------------------------------------------------------

    def local_view(self, flat, spec: ParamSpec):
        """spec's shard inside a flat buffer laid out like self.flat (parameters, gradients, Adam moments)."""
        return flat[spec.offset : spec.offset + spec.size].reshape(spec.local_shape)

    def shard(self, full: np.ndarray, spec: ParamSpec) -> np.ndarray:
        return TP.shard(full, spec, self.tp.size, self.tp.rank)

    def init_weights(self, seed: int) -> None:
        """Each rank makes the full tensor and keeps its shard: the same logical model on any layout."""
        for s in self.specs:
            full = init_tensor(s, seed, self.cfg.vocab_size).astype(self.dtype)
            self.local_view(self.flat, s)[...] = to_device(self.shard(full, s), self.xp)
        self.refresh_compute()

    def refresh_compute(self) -> None:
        """The compute copy from the master weights (bf16/fp16: rounded to the format); nothing to do in fp32."""
        if self.compute is not self.flat:
            for a in range(0, self.local_size, 1 << 20):  # in pieces: no full-size temporaries
                self.compute[a : a + (1 << 20)] = self.prec.operand(self.flat[a : a + (1 << 20)])

    def check_shapes(self, shapes: dict, what: str = "parameters") -> None:
        """shapes: {name: full shape} of a source of tensors; it must hold exactly the whole model's, in its shapes
        (whatever part of it this rank holds)."""
        missing = [n for n in self.logical if n not in shapes]
        extra = [n for n in shapes if n not in self.logical]
        if missing or extra:
            raise UserError(
                f"{what} do not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for name, shape in shapes.items():
            if tuple(shape) != self.logical[name]:
                raise UserError(
                    f"{what}: {name} has shape {tuple(shape)}, the config gives {self.logical[name]}"
                )

    def load_flat(self, flat, tensors: dict, what: str = "parameters") -> None:
        """Copy named full tensors into a flat buffer laid out like self.flat, each rank taking its shard."""

        def read(name, index, out=None):
            part = np.asarray(tensors[name])[index]
            if out is None:
                return part
            out[...] = part
            return out

        self.read_flat(flat, read, {n: np.shape(t) for n, t in tensors.items()}, what)

    def read_flat(self, flat, read, shapes: dict, what: str, ranges=None) -> None:
        """Fill this rank's shards in a flat buffer laid out like self.flat from a reader of full tensors:
        read(name, index, out=None) returns full[index] for a hyperslab index (an HDF5 dataset's slicing), into
        `out` when given (whole rows of a single slab are read straight into the buffer), and only the rows of this
        rank's shards that cover `ranges` of the flat buffer are read (default: all of it; ZeRO-1: the ranges this
        rank owns). shapes: {name: full shape} of what the source holds, checked first."""
        self.check_shapes(shapes, what)
        for s in self.specs:
            row = s.size // s.local_shape[0]  # elements per row (along axis 0) of the local shard
            dest = self.local_view(flat, s).reshape(-1)
            slabs = TP.shard_slices(s.shape, s.tp_axis, s.tp_blocks, self.tp.size, self.tp.rank)
            for a, b in ranges if ranges is not None else [(0, self.local_size)]:
                lo, hi = max(a, s.offset) - s.offset, min(b, s.offset + s.size) - s.offset
                if lo >= hi:
                    continue
                r0, r1 = lo // row, -(-hi // row)
                if (
                    self.xp is np
                    and lo == r0 * row
                    and hi == r1 * row
                    and len(slabs) == 1
                    and (s.tp_axis != 0 or self.tp.size == 1)
                ):  # whole rows of one slab: read in place
                    read(
                        s.name,
                        (slice(r0, r1),) + slabs[0][1:],
                        dest[lo:hi].reshape((r1 - r0,) + s.local_shape[1:]),
                    )
                    continue
                rows = self._read_local_rows(read, s, slabs, r0, r1).reshape(-1)
                dest[lo:hi] = to_device(
                    np.asarray(rows[lo - r0 * row : hi - r0 * row], dtype=self.dtype), self.xp
                )

    def _read_local_rows(self, read, s: ParamSpec, slabs: list, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of this rank's shard of s (its `slabs`, TP.shard_slices), read as hyperslabs of the full
        tensor."""
        if (
            s.tp_axis != 0 or self.tp.size == 1
        ):  # axis 0 whole: the rows, times this rank's slab(s) of the split axis
            pieces = [read(s.name, (slice(r0, r1),) + slab[1:]) for slab in slabs]
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=s.tp_axis)
        rows = np.concatenate([np.arange(slab[0].start, slab[0].stop) for slab in slabs])[r0:r1]
        runs = np.split(
            rows, np.flatnonzero(np.diff(rows) != 1) + 1
        )  # contiguous runs of full-tensor rows
        return np.concatenate(
            [read(s.name, (slice(int(run[0]), int(run[-1]) + 1),)) for run in runs]
        )

    def load_state(self, tensors: dict) -> None:
        self.load_flat(self.flat, tensors)
        self.refresh_compute()

    def full_tensors(self, flat) -> dict:
        """{name: full tensor} (host arrays, copies) from a flat buffer laid out like self.flat: the shards of the TP
        group are gathered (one allgather of the flat buffer) and put back together. Every TP rank gets the result.
        For tests and small models: checkpoints never build full tensors (checkpoint/writers.py)."""
        P = self.tp.size
        host = to_host(flat)
        if P > 1:
            every = np.empty((P, host.size), dtype=host.dtype)
            every[self.tp.rank] = host
            self.tp.allgather_(every.reshape(-1), [host.size] * P)
        out = {}
        for s in self.specs:
            if P == 1 or s.tp_axis is None:
                out[s.name] = host[s.offset : s.offset + s.size].reshape(s.shape).copy()
                continue
            full = np.empty(s.shape, dtype=host.dtype)
            for r in range(P):
                full[TP.shard_index(s.shape, s.tp_axis, s.tp_blocks, P, r)] = every[
                    r, s.offset : s.offset + s.size
                ].reshape(s.local_shape)
            out[s.name] = full
        return out

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

    def flops_per_token(self, T: int | None = None) -> float:
        """6N + 12 L T C (nanoGPT/PaLM) of the whole model, N without the position embedding."""
        c = self.cfg
        T = c.block_size if T is None else T
        n = self.num_params - math.prod(self.logical["wpe.weight"])
        return 6 * n + 12 * c.n_layer * T * c.n_embd

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
