"""Memory per rank, from the code's own shapes: what the trainer allocates, not a textbook formula.

- parameters and gradients: `param_specs` for the rank's TP shard of its pipeline stage (the flat buffers);
- AdamW moments: 2 x the ranges the rank owns, as `GradientSync` computes them (its own code, run on a stand-in
  communicator: ZeRO-1 pieces of every bucket), and AdamW's per-thread temporaries;
- activations: for each (micro-batch, chunk) in flight, the arrays its forward's cache holds, layer by layer as
  modules.py builds them (activations.py: `chunk_cache_bytes`; tests/plan/test_plan.py walks a real cache and finds the
  same bytes); how many are in flight at each moment comes from walking the rank's schedule op list (peak.py:
  `step_peak`);
- what a step allocates on top: the operation's working arrays (a block's backward keeps its local gradients until
  it returns; sequence parallelism's gathered and reduce-scattered temporaries), the pipeline's send buffers (at most
  schedule_timing.send_depth per neighbour and direction across an op), ZeRO-1's reduce-scatter receive buffers; and a
  save's staging blocks (checkpoint/slabs.py, writers.py), and a background save's host staging buffer
  (checkpoint/parts.py: the pieces the rank writes, kept from one save to the next).

Byte sizes are parameters (`Bytes`), so a precision the code does not have yet can be planned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace

from hpc_llm.checkpoint.format import VERIFY_BLOCK_BYTES, deal
from hpc_llm.checkpoint.slabs import MESSAGE_ELEMS
from hpc_llm.config import Config, ModelConfig, stage_layers
from hpc_llm.model.gpt import wide_runs
from hpc_llm.model.layout import StagePlan, param_specs
from hpc_llm.optim import CHUNK as ADAM_CHUNK
from hpc_llm.parallel import schedule as sched
from hpc_llm.parallel.data_parallel import GradientSync
from hpc_llm.parallel.zero import unit_ranges
from hpc_llm.plan.peak import schedule_peak, zero_receive, zero_unit_bytes


@dataclass(frozen=True)
class Bytes:
    """Bytes per element of each kind of array. fp32/fp64 (train.precision = "fp32"): everything in model.dtype.
    bf16/fp16 (model/precision.py): the flat buffers, moments and the compute dtype stay float32; the activations
    kept for backward are stored in the 2-byte format (act = 2), and GPT.compute is a second parameter-sized float32
    buffer holding the rounded weights (master = 4); on a device it is stored in 2 bytes (master = 2) with the tensors
    the fused kernels read in float32 kept beside it (master_wide = 4: model/gpt.compute_16_bit)."""

    param: int = 4
    grad: int = 4
    moment: int = 4
    act: int = 4  # activations kept in the precision's format (Precision.keep)
    master: int = 0  # GPT.compute, the rounded copy of the weights (0: none, the weights are used as they are)
    # the compute dtype: LayerNorm's rstd, the probabilities, the streams (dropout masks: 1 byte, bool)
    compute: int = 4
    # GPT.compute_wide: embeddings, biases, LayerNorm weights again (model/gpt.wide_runs)
    master_wide: int = 0
    # the arrays as the device path makes them (the fused attention's cache: activations.py)
    device: bool = False
    # bf16 on oneDNN (Cluster.reads_bf16): GPT.compute_bits, the compute copy's bf16 bits beside it (2; not ZeRO-3)
    master_bits: int = 0
    # ... and the linears' output gradients kept for a zero-bubble W as the products read them (2: bfloat16
    # arrays, Precision.gemm_operand; 0: the compute dtype)
    weight_dy: int = 0

    @staticmethod
    def of(dtype_bytes: int) -> Bytes:
        return Bytes(dtype_bytes, dtype_bytes, dtype_bytes, dtype_bytes, 0, dtype_bytes)


RECOMPUTES = ("none", "selective", "block")
ACT_COMMS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Layout:
    """One way to run: the grid, ZeRO-1, the pipeline schedule and its micro-batches, the local micro-batch rows,
    what is recomputed, sequence parallelism, the format of activation transfers and how many sends may be in
    flight."""

    pp: int = 1
    dp: int = 1
    tp: int = 1
    zero: int = 0
    schedule: str = "1f1b"
    virtual: int = 1
    micro_batches: int = 1  # train.grad_accum
    batch_size: int = 1  # train.batch_size: the global micro-batch (rows), split over dp
    bucket_mb: float = 25.0
    # "selective": the attention core and GELU's tanh recomputed in backward (the probabilities, their masks and the
    # tanh not kept); "block": keep each block's input only (the block recomputed in backward)
    recompute: str = "none"
    sequence_parallel: bool = False  # parallel.sequence_parallel (tp > 1)
    # parallel.act_comm: "fp32" (the compute dtype) or 16-bit pipeline and TP transfers
    act_comm: str = "fp32"
    # sends in flight per neighbour and direction: None the code's (schedule_timing.send_depth), 0 every send held
    # until the step's end (the code before bounded sends), k > 0 at most k
    send_depth: int | None = None
    reshard_after_forward: bool = True  # ZeRO-3: a unit's forward gather freed after its forward
    grad_comm: str = (
        "fp32"  # parallel.grad_comm: the data-parallel reduction's format (plan/grad_comm.py)
    )
    powersgd_rank: int = 4  # parallel.powersgd_rank

    @property
    def ranks(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def rows(self) -> int:
        return self.batch_size // self.dp

    @property
    def comm16(self) -> bool:
        """Pipeline messages and tensor-parallel activation collectives travel as 16-bit words."""
        return self.act_comm != "fp32"

    @classmethod
    def of(cls, cfg: Config, dp: int) -> Layout:
        """The layout a run's config describes, at data-parallel size dp (the world's ranks / (pp * tp))."""
        par, t = cfg.parallel, cfg.train
        return cls(
            par.pp,
            dp,
            par.tp,
            par.zero,
            par.schedule,
            par.virtual_stages,
            t.grad_accum,
            t.batch_size,
            par.bucket_mb,
            t.recompute,
            par.sequence_parallel,
            par.act_comm,
            reshard_after_forward=par.reshard_after_forward,
            grad_comm=par.grad_comm,
            powersgd_rank=par.powersgd_rank,
        )


def stage_plan(cfg: ModelConfig, lay: Layout, stage: int, pp_layers=()) -> StagePlan:
    return StagePlan(
        tuple(stage_layers(cfg.n_layer, lay.pp * lay.virtual, list(pp_layers))),
        lay.pp,
        stage,
        lay.virtual,
        lay.schedule in sched.V_SHAPED,
    )


@lru_cache(maxsize=4096)
def grad_sync(
    n: int, dp: int, dp_rank: int, bucket_elems: int, zero: int, units: tuple = ()
) -> GradientSync:
    """The trainer's GradientSync on a stand-in communicator: its buckets, counts and owned ranges, no MPI (ZeRO-2/3:
    units, the model's unit ranges, are its buckets)."""
    return GradientSync(
        SimpleNamespace(size=n),
        SimpleNamespace(size=dp, rank=dp_rank),
        bucket_elems,
        zero,
        units=units,
    )


def stage_sync(specs, lay: Layout, dp_rank: int, by: Bytes) -> GradientSync:
    """The GradientSync of a stage's rank (its buckets and ZeRO pieces)."""
    n = sum(s.size for s in specs)
    units = tuple(unit_ranges(specs).values()) if lay.zero >= 2 else ()
    return grad_sync(n, lay.dp, dp_rank, bucket_elems(lay.bucket_mb, by.grad), lay.zero, units)


def specs_of(cfg: ModelConfig, tp: int, plan: StagePlan) -> list:
    """param_specs, remembered: a search asks for the same stage of the same model thousands of times."""
    # lists (model.lora_targets) as tuples: the key must be hashable
    return _specs(
        tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in vars(cfg).items())),
        tp,
        plan,
    )


@lru_cache(maxsize=4096)
def _specs(cfg_items: tuple, tp: int, plan: StagePlan) -> list:
    return param_specs(
        ModelConfig(**{k: list(v) if isinstance(v, tuple) else v for k, v in cfg_items}), tp, plan
    )


def bucket_elems(bucket_mb: float, grad_bytes: int) -> int:
    return int(bucket_mb * 2**20) // grad_bytes  # as Trainer.__init__


# -- activations: what each layer's cache holds ----------------------------------------------------------------


# -- the step: walk the schedule ---------------------------------------------------------------------------------


@dataclass
class RankMemory:
    """Bytes on one rank: persistent buffers, the step's peak on top of them, checkpoint scratch."""

    params: int
    grads: int
    master: int
    moments: int
    optimizer_temps: int
    activations: int  # caches in flight at the step's peak
    workspace: int  # the running operation's temporaries at the peak
    pipeline_buffers: int  # send buffers held until the step's end, at the peak
    zero_buffers: int  # ZeRO-1 reduce-scatter receive buffers at the peak
    checkpoint_scratch: int  # kept after the first save (a background save's host staging buffer)
    # at a save only (activations freed then): full tensors assembled on world rank 0
    checkpoint_assembly: int
    runtime: int = 0  # interpreter and libraries (from the cluster file)
    # False: the checkpoint's host arrays are not device memory (GPUs) or not planned
    save_on_device: bool = True
    teacher: int = 0  # train.teacher on the last stage: its weights and the distillation loss's logits (teacher_bytes)

    @property
    def persistent(self) -> int:
        return (
            self.params
            + self.grads
            + self.master
            + self.moments
            + self.optimizer_temps
            + self.teacher
        )

    @property
    def step_peak(self) -> int:
        return (
            self.persistent
            + self.activations
            + self.workspace
            + self.pipeline_buffers
            + self.zero_buffers
        )

    @property
    def peak(self) -> int:
        if not self.save_on_device:
            return self.step_peak + self.runtime
        save = self.persistent + self.checkpoint_scratch + self.checkpoint_assembly
        return max(self.step_peak + self.checkpoint_scratch, save) + self.runtime

    def breakdown(self) -> dict:
        keys = (
            "params",
            "grads",
            "master",
            "moments",
            "optimizer_temps",
            "activations",
            "workspace",
            "pipeline_buffers",
            "zero_buffers",
            "checkpoint_scratch",
            "checkpoint_assembly",
            "runtime",
            "teacher",
        )
        return {k: getattr(self, k) for k in keys} | {"peak": self.peak}


def teacher_bytes(teacher: ModelConfig, lay: Layout, by: Bytes) -> int:
    """A distillation teacher on a last-stage rank (train/teacher.py): its TP shard of the whole model's weights in
    its dtype, and, while a micro-batch's loss is in flight, the teacher's logits slice and the two more
    probability slices the distillation loss keeps beside the cross-entropy's (model/distill.py): 3 (rows T, Vl)
    arrays in the compute dtype."""
    weights = sum(s.size for s in param_specs(teacher, lay.tp)) * (
        8 if teacher.dtype == "float64" else 4
    )
    logits = lay.rows * teacher.block_size * (teacher.padded_vocab // lay.tp)
    return weights + 3 * logits * by.compute


def staging_bytes(specs, lay: Layout, stage: int, by: Bytes, dp_rank: int, owned: int) -> int:
    """A background save's host staging buffer on data-parallel rank ``dp_rank`` of a stage (its TP rank 0, which
    writes the replicated tensors): the pieces it writes, as checkpoint/trainer_state.py deals them. A tensor held
    by every replica (parameters; the moments without ZeRO) is written by the replica the stage's tensors are dealt
    to by size (all three slots dealt together, as the checkpoint lists them); with ZeRO the moments by their
    owners (``owned`` elements each), with ZeRO-3 the parameters too. Later stages do not write the tied
    embedding's copy: counted all the same (an upper bound)."""
    slots = (("params", by.param), ("m", by.moment), ("v", by.moment))
    items = [
        (spec, slot, nbytes)
        for slot, nbytes in slots
        for spec in specs
        if stage == 0 or spec.name != "wte.weight"
    ]
    owner = deal([math.prod(spec.shape) for spec, _slot, _n in items], lay.dp)
    dealt = sum(
        spec.size * nbytes
        for (spec, slot, nbytes), d in zip(items, owner)
        if d == dp_rank and (slot == "params" and lay.zero < 3 or slot != "params" and not lay.zero)
    )
    held = 2 * owned * by.moment if lay.zero else 0
    return dealt + held + (owned * by.param if lay.zero >= 3 else 0)


def rank_memory(
    cfg: ModelConfig,
    lay: Layout,
    stage: int,
    by: Bytes,
    dp_rank: int = 0,
    pp_layers=(),
    optimizer_threads: int = 1,
    runtime: int = 0,
    writer: str = "gather",
    save_on_device: bool = True,
    async_save: bool = False,
    teacher: ModelConfig | None = None,
) -> RankMemory:
    """Memory of pipeline stage `stage`, data-parallel rank `dp_rank` (0 owns the largest ZeRO-1 pieces); writer
    "gather", "mpio" or "parts" (resolved: trainer_state.auto_writer), async_save its background saves; teacher:
    train.teacher's model (held by the last stage), with the student's block_size and dtype."""
    plan = stage_plan(cfg, lay, stage, pp_layers)
    specs = specs_of(cfg, lay.tp, plan)
    n = sum(s.size for s in specs)
    sync = stage_sync(specs, lay, dp_rank, by)
    owned = sum(b - a for a, b in sync.owned)
    units = None
    if sync.stage >= 2:
        units = [
            zero_unit_bytes(specs, plan, lay, by, dp_rank, v) for c, v in enumerate(plan.chunks)
        ]
    peak = schedule_peak(
        cfg, lay, stage, by, plan, zero_receive(specs, sync, n, dp_rank, by), units
    )
    # ZeRO-2 keeps only its pieces' gradients between uses, ZeRO-3 its pieces' parameters too
    kept = owned if sync.stage >= 3 else n
    params, grads = kept * by.param, (owned if sync.stage >= 2 else n) * by.grad
    master = (
        kept * (by.master + by.master_bits)
        + sum(b - a for a, b in wide_runs(specs)) * by.master_wide
    )
    moments = 2 * owned * by.moment
    temps = optimizer_threads * 2 * max(1, min(ADAM_CHUNK, n)) * by.param
    # saves never build a full tensor (checkpoint/writers.py, parts.py): a writing rank (world rank 0 with the
    # gather writer, every rank with mpio) holds two staging slabs and two verification slabs; the parts writer
    # writes from the rank's own buffers and reads its part back in two verification slabs. Only a background
    # save keeps something between saves: its staging buffer.
    scratch = staging_bytes(specs, lay, stage, by, dp_rank, owned) if async_save else 0
    if writer == "parts":
        assembly = 2 * VERIFY_BLOCK_BYTES
    elif writer == "mpio" or (stage == 0 and dp_rank == 0):
        assembly = 2 * MESSAGE_ELEMS * by.param + 2 * VERIFY_BLOCK_BYTES
    else:
        assembly = 0
    return RankMemory(
        params,
        grads,
        master,
        moments,
        temps,
        peak.activations,
        peak.workspace,
        peak.pipeline,
        peak.zero,
        scratch,
        assembly,
        runtime,
        save_on_device,
        teacher_bytes(teacher, lay, by) if teacher is not None and stage == lay.pp - 1 else 0,
    )


def max_rank_memory(cfg: ModelConfig, lay: Layout, by: Bytes, **kw) -> tuple[int, RankMemory]:
    """The pipeline stage with the largest peak (data-parallel rank 0: ZeRO-1's largest pieces) and its memory:
    the first, the second and the last stage (with an even split the middle stages differ only in how many
    micro-batches they hold, which falls with the stage index)."""
    stages = sorted({0, min(1, lay.pp - 1), lay.pp - 1})
    return max(((s, rank_memory(cfg, lay, s, by, **kw)) for s in stages), key=lambda x: x[1].peak)
