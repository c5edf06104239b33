"""The parameter layout: which tensors a rank's flat buffer holds, where, and how each is initialised, trained and
split.

All parameters a rank holds live in one contiguous buffer and their gradients in another with the same layout (see
model/gpt.py). Under tensor parallelism a rank's buffers hold its shards (`ParamSpec.local_shape`); under pipeline
parallelism only the layers of its stages (`StagePlan`): the embedding on the first stage, the head (with its copy of
the tied embedding) on the last. Parameter names are GPT-2's Hugging Face names without the `transformer.` prefix,
and weights are stored (in, out) like its Conv1D, so imported weights need no transpose.
"""

from __future__ import annotations

import fnmatch
import math
import zlib
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import numpy as np

from hpc_llm.config import ModelConfig
from hpc_llm.config.checks import LORA_TARGETS
from hpc_llm.parallel.schedule import stage_rank, virtual_stage


class Init(Enum):
    """How a tensor starts: normal(0, std), all zeros, or all ones (LayerNorm gains)."""

    NORMAL = "normal"
    ZEROS = "zeros"
    ONES = "ones"


@dataclass(frozen=True)
class ParamSpec:
    """One tensor in the flat buffer, with what initialisation, the optimizer and tensor parallelism need.

    tp_axis: the axis split over the tensor-parallel group (None: replicated). tp_blocks: that axis is made of this many
    equal blocks each split separately (3 for the fused q|k|v columns, so each rank gets its heads' q, k and v).
    """

    name: str
    shape: tuple  # the full, logical shape (checkpoints, initialisation)
    offset: int  # where this rank's shard starts in the flat buffer
    init: Init
    std: float  # the standard deviation of Init.NORMAL (0 for the others)
    decay: bool  # AdamW weight decay applies (2-D weights only, as nanoGPT)
    tp_axis: int | None = None
    tp_blocks: int = 1
    local_shape: tuple = ()  # this rank's shard: shape with tp_axis divided by the TP size

    @property
    def size(self) -> int:
        """Elements of this rank's shard (the flat buffer's share)."""
        return math.prod(self.local_shape)


class LayoutRow(NamedTuple):
    """One tensor of the layout before offsets are assigned (param_specs' table)."""

    name: str
    shape: tuple
    init: Init
    std: float
    decay: bool
    tp_axis: int | None = None
    tp_blocks: int = 1


def _weight(name: str, shape: tuple, std: float, tp_axis=None, tp_blocks: int = 1) -> LayoutRow:
    """A 2-D weight: normal(0, std), decayed."""
    return LayoutRow(name, shape, Init.NORMAL, std, True, tp_axis, tp_blocks)


def _ones(name: str, shape: tuple) -> LayoutRow:
    return LayoutRow(name, shape, Init.ONES, 0.0, False)


def _zeros(name: str, shape: tuple, tp_axis=None, tp_blocks: int = 1) -> LayoutRow:
    return LayoutRow(name, shape, Init.ZEROS, 0.0, False, tp_axis, tp_blocks)


@dataclass(frozen=True)
class StagePlan:
    """The pipeline split: the layers of each of pp * virtual (virtual) stages, in model order, and which of them
    this rank holds: virtual stage c * pp + rank for each of its chunks c (Megatron's interleaving; one chunk
    without it), or with v_shape (schedule "zbv", two chunks) rank and 2 pp - 1 - rank (schedule.virtual_stage).
    The default is the whole model on one stage."""

    layers: tuple  # (range, ...) per virtual stage
    pp: int = 1
    rank: int = 0
    virtual: int = 1
    v_shape: bool = False

    @property
    def n_virtual(self) -> int:
        return self.pp * self.virtual

    @property
    def chunks(self) -> list[int]:
        """The virtual stages this rank holds, in its buffer's order."""
        return [virtual_stage(self.pp, self.rank, c, self.v_shape) for c in range(self.virtual)]

    def rank_of(self, s: int) -> int:
        """The pipeline rank holding virtual stage s."""
        return stage_rank(self.pp, s, self.v_shape)


def whole_model(cfg: ModelConfig) -> StagePlan:
    return StagePlan((range(cfg.n_layer),))


def param_specs(cfg: ModelConfig, tp: int = 1, plan: StagePlan | None = None) -> list[ParamSpec]:
    """The flat-buffer layout of one rank (every rank of a TP group has the same layout): the token embedding first
    where the rank holds the embedding or the head (the tied copy: offset 0, so the data-parallel bucket holding it
    is reduced only after the copies' gradients are summed), the position embedding with the embedding, then the
    blocks of its chunks in forward order, the final LayerNorm with the head. Within a block the decayed weights
    come first and the LayerNorm/bias parameters after, so weight decay touches a few contiguous ranges; blocks are
    in forward order, so a gradient bucket taken from the end of the buffer is complete early in backward.

    LoRA (model.lora_rank = r > 0): each target linear layer's adapters follow the block's weights (_lora_rows)."""
    plan = plan if plan is not None else whole_model(cfg)
    first, last = 0 in plan.chunks, plan.n_virtual - 1 in plan.chunks
    C, V, std = cfg.n_embd, cfg.padded_vocab, 0.02
    rows = [_weight("wte.weight", (V, C), std, tp_axis=0)] if first or last else []
    if first:
        rows.append(_weight("wpe.weight", (cfg.block_size, C), std))
    for i in (i for v in plan.chunks for i in plan.layers[v]):
        rows += _block_rows(cfg, f"h.{i}.")
    if last:
        rows += [_ones("ln_f.weight", (C,)), _zeros("ln_f.bias", (C,))]
    if not cfg.bias:  # nanoGPT's bias=False: no biases in the linear layers and LayerNorms
        rows = [r for r in rows if not r.name.endswith(".bias")]
    specs, offset = [], 0
    for row in rows:
        local = list(row.shape)
        if row.tp_axis is not None:
            local[row.tp_axis] //= tp
        spec = ParamSpec(row.name, row.shape, offset, *row[2:], local_shape=tuple(local))
        specs.append(spec)
        offset += spec.size
    return specs


def _block_rows(cfg: ModelConfig, p: str) -> list[LayoutRow]:
    """Block p's tensors: the decayed weights (and LoRA's adapters) first, then the LayerNorms and biases. The
    projections into the residual stream start smaller (GPT-2's 1/sqrt(2 n_layer) scaling)."""
    C, std, proj_std = cfg.n_embd, 0.02, 0.02 / math.sqrt(2 * cfg.n_layer)
    A, M = cfg.attn_width, cfg.mlp_width  # C and 4 C, unless pruned
    return [
        _weight(p + "attn.c_attn.weight", (C, 3 * A), std, tp_axis=1, tp_blocks=3),
        _weight(p + "attn.c_proj.weight", (A, C), proj_std, tp_axis=0),
        _weight(p + "mlp.c_fc.weight", (C, M), std, tp_axis=1),
        _weight(p + "mlp.c_proj.weight", (M, C), proj_std, tp_axis=0),
        *_lora_rows(cfg, p),
        _ones(p + "ln_1.weight", (C,)),
        _zeros(p + "ln_1.bias", (C,)),
        _zeros(p + "attn.c_attn.bias", (3 * A,), tp_axis=0, tp_blocks=3),
        _zeros(p + "attn.c_proj.bias", (C,)),
        _ones(p + "ln_2.weight", (C,)),
        _zeros(p + "ln_2.bias", (C,)),
        _zeros(p + "mlp.c_fc.bias", (M,), tp_axis=0),
        _zeros(p + "mlp.c_proj.bias", (C,)),
    ]


class LoraLayer(NamedTuple):
    """A LoRA target's linear layer: how its weight is split over TP."""

    tp_axis: int  # 1: column-parallel (split along out), 0: row-parallel (split along in)
    tp_blocks: int


# each LoRA target, in config.LORA_TARGETS' canonical order
LORA_LAYERS = dict(
    zip(
        LORA_TARGETS,
        (LoraLayer(1, 3), LoraLayer(0, 1), LoraLayer(1, 1), LoraLayer(0, 1)),
        strict=True,
    )
)


def linear_shape(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """A block's linear layer's weight (in, out): C the residual width, A the attention's, M the MLP's."""
    C, A, M = cfg.n_embd, cfg.attn_width, cfg.mlp_width
    shapes = {
        "attn.c_attn": (C, 3 * A),
        "attn.c_proj": (A, C),
        "mlp.c_fc": (C, M),
        "mlp.c_proj": (M, C),
    }
    return shapes[target]


def _lora_rows(cfg: ModelConfig, prefix: str) -> list[LayoutRow]:
    """The adapters of one block, in LORA_TARGETS' order: A (in, r) and B (r, out) per target, sharded like the layer
    they adapt: beside a column-parallel weight (split along out) A is replicated and B split along axis 1 in the
    weight's blocks; beside a row-parallel one (split along in) A is split along axis 0 and B replicated.
    A ~ normal(0, 1/sqrt(3 in)) (the variance of PEFT's Kaiming-uniform), B = 0: the adapted model starts equal to
    the base. Decayed like every 2-D weight."""
    r = cfg.lora_rank
    if r <= 0:
        return []
    rows = []
    for target, layer in LORA_LAYERS.items():
        if target not in cfg.lora_targets:
            continue
        column_parallel = layer.tp_axis == 1
        a_axis, b_axis = (None, 1) if column_parallel else (0, None)
        b_blocks = layer.tp_blocks if column_parallel else 1
        n_in, n_out = linear_shape(cfg, target)
        rows += [
            _weight(f"{prefix}{target}.lora_A", (n_in, r), 1.0 / math.sqrt(3 * n_in), a_axis),
            LayoutRow(
                f"{prefix}{target}.lora_B", (r, n_out), Init.ZEROS, 0.0, True, b_axis, b_blocks
            ),
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


def flops_per_token(cfg: ModelConfig, T: int | None = None) -> float:
    """6N + 12 L T C (nanoGPT/PaLM; C the attention's width) of the whole model at sequence length T (default
    block_size), N the parameters without the position embedding."""
    T = cfg.block_size if T is None else T
    n = sum(math.prod(s.shape) for s in param_specs(cfg) if s.name != "wpe.weight")
    return 6 * n + 12 * cfg.n_layer * T * cfg.attn_width


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
    if spec.init is Init.ZEROS:
        return np.zeros(spec.shape)
    if spec.init is Init.ONES:
        return np.ones(spec.shape)
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    t = rng.standard_normal(spec.shape) * spec.std
    if spec.name == "wte.weight":
        t[vocab_size:] = 0  # pad rows: never a target, masked out of the softmax
    return t
