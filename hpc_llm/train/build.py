"""A rank's compute objects for a checked config: its pipeline stage's model, the micro-batch schedule, the gradient
sync (data-parallel buckets, ZeRO-1, compression), the optimizer, the gradient norm's share; train.init_from's weights
read into the model; the proof that replicas hold the same parameters."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

import numpy as np

from hpc_llm.backend import to_host
from hpc_llm.config import Config, stage_layers
from hpc_llm.errors import UserError
from hpc_llm.model.gpt import GPT
from hpc_llm.model.layout import StagePlan, intersect_ranges, is_lora, merge_ranges
from hpc_llm.optim import AdamW
from hpc_llm.parallel.data_parallel import GradientSync
from hpc_llm.parallel.grid import Grid
from hpc_llm.parallel.pipeline_comm import PipelineComm
from hpc_llm.parallel.schedule import V_SHAPED, schedule
from hpc_llm.parallel.schedule_timing import send_depth
from hpc_llm.parallel.zero import ZeroHooks, unit_ranges

log = logging.getLogger("hpc_llm")


@dataclass
class Engine:
    """plan: this rank's pipeline stage; ops: its schedule of forward/backward ops; pipe: the stage-to-stage
    transfers (None with one stage; on parallel.act_comm's wire, schedule_timing.send_depth's bound); norm: (the ranges
    of the flat gradient whose squares this rank adds to the global norm, the group over which they are summed)."""

    plan: StagePlan
    model: GPT
    ops: list
    pipe: PipelineComm | None
    sync: GradientSync
    opt: AdamW
    norm: tuple
    zero: ZeroHooks | None  # ZeRO-2/3's hooks around the model's parts (None below stage 2)


def build_engine(cfg: Config, grid: Grid, xp) -> Engine:
    t, par = cfg.train, cfg.parallel
    plan = StagePlan(
        tuple(stage_layers(cfg.model.n_layer, par.pp * par.virtual_stages, par.pp_layers)),
        par.pp,
        grid.pp_rank,
        par.virtual_stages,
        par.schedule in V_SHAPED,
    )
    if plan.v_shape and grid.emb_comm is not None:
        raise RuntimeError(
            "a V-shaped pipeline (one embedding copy) on a grid made with an embedding group"
        )
    stage = par.zero if grid.dp > 1 else 0
    # ZeRO-2: the gradient buffer only partly resident; ZeRO-3: the parameter buffers too (parallel/zero.py)
    releasable = {2: {"grads"}, 3: {"grads", "params"}}.get(stage, set())
    model = GPT(
        cfg.model,
        xp,
        seed=None,  # initialised below, once this rank knows what it keeps
        tp_comm=grid.tp_comm,
        tp_act=grid.tp_comm.with_wire(par.act_comm),
        plan=plan,
        recompute=t.recompute,
        precision=t.precision,
        freeze=t.freeze,
        sequence_parallel=par.sequence_parallel,
        releasable=frozenset(releasable),
    )
    sync = _gradient_sync(cfg, grid, model)
    if stage >= 3:
        model.kept = sorted(sync.owned)
    model.init_weights(t.seed)
    zero = None
    if stage >= 2:
        zero = ZeroHooks(model, sync, grid.dp_comm, par.reshard_after_forward)
        for chunk in model.chunks:
            chunk.hooks = zero
    ops = schedule(par.schedule, par.pp, grid.pp_rank, t.grad_accum, par.virtual_stages)
    pipe = None
    if par.pp > 1:  # at most send_depth sends per direction in flight (docs/architecture.md)
        depth = send_depth(par.schedule, par.pp, t.grad_accum, par.virtual_stages)
        pipe = PipelineComm(
            grid.pp_comm.with_wire(par.act_comm), plan.n_virtual, depth, plan.rank_of
        )
    # Adam moments only for what this rank updates (its ZeRO-1 shard) and trains (not frozen)
    opt = AdamW(
        model.flat,
        model.grad_flat,
        model.decay_ranges(),
        t,
        owned=intersect_ranges(sync.owned, model.trainable_ranges()),
    )
    return Engine(plan, model, ops, pipe, sync, opt, _norm_ranges(model, grid, sync, opt), zero)


def _gradient_sync(cfg: Config, grid: Grid, model: GPT) -> GradientSync:
    par = cfg.parallel
    return GradientSync(
        model.grad_flat,
        grid.dp_comm,
        int(par.bucket_mb * 2**20) // model.dtype.itemsize,
        zero=par.zero,
        scheme=par.grad_comm,
        specs=model.specs,
        powersgd_rank=par.powersgd_rank,
        powersgd_start=par.powersgd_start,
        seed=cfg.train.seed,
        units=unit_ranges(model.specs).values(),
        layout={
            "pp": grid.pp,
            "dp": grid.dp,
            "tp": grid.tp,
            "pp_rank": grid.pp_rank,
            "dp_rank": grid.dp_rank,
            "tp_rank": grid.tp_rank,
        },
    )


def _norm_ranges(model: GPT, grid: Grid, sync: GradientSync, opt: AdamW):
    """Ranges of the flat gradient whose squares this rank adds to the global norm, and over which group: each
    element of the whole model counted once (a replicated tensor on TP rank 0 only; ZeRO: this rank's shard)."""
    # the last stage's copy of the embedding: the first stage counts it
    tied = model.tied_copy_range()
    counted = merge_ranges(
        (s.offset, s.offset + s.size)
        for s in model.specs
        if (grid.tp_rank == 0 or s.tp_axis is not None) and (tied is None or s.offset != tied[0])
    )
    keep = intersect_ranges(opt.owned, counted)  # owned: trained and (ZeRO-1) this rank's shard
    return keep, grid.world if sync.zero else grid.mp_comm


def load_init_from(model: GPT, grid: Grid, saved, init_from: str) -> None:
    """Each rank reads its hyperslabs of the checkpoint's weights (wpe's first block_size rows) and checksums its
    share of the file; agreed, so a bad checksum anywhere fails the start on every rank. Adapters the file lacks
    keep their initialisation from the seed. Closes ``saved``."""
    world = grid.world

    def load():
        with saved:
            saved.share(world.rank, world.size)
            shapes = dict(saved.shapes["params"])
            if "wpe.weight" in shapes:  # cropped: only rows [0, block_size) are read
                shapes["wpe.weight"] = model.logical["wpe.weight"]
            fresh = [n for n in model.logical if is_lora(n) and n not in shapes]
            shapes.update({n: model.logical[n] for n in fresh})
            ranges = intersect_ranges(
                merge_ranges(
                    (s.offset, s.offset + s.size) for s in model.specs if s.name not in fresh
                ),
                model.kept_ranges(),  # ZeRO-3: only this rank's pieces
            )
            model.read_flat(
                model.flat,
                lambda name, index, out=None: saved.read("params", name, index, out),
                shapes,
                f"train.init_from={init_from}: parameters",
                ranges=ranges,
            )
            try:
                saved.verify_share()
            except UserError as e:
                raise UserError(f"train.init_from: {e}") from None
        model.refresh_compute()

    world.agree(load, "reading train.init_from")
    if world.rank == 0:
        log.info(
            "initialised from %s (its model weights; fresh optimizer state, step 0)", saved.path
        )


def check_replicas_identical(model: GPT, grid: Grid, what: str) -> None:
    """Data-parallel replicas must hold bitwise the same parameters (identical by construction: initialisation
    depends only on the seed, a resume reads the same file); one small allgather of a checksum proves it."""

    def crc(x) -> int:
        return zlib.crc32(np.ascontiguousarray(to_host(x)).view(np.uint8))

    # ZeRO-3's replicas hold different pieces of the parameters, by design
    if grid.dp > 1 and model.kept is None:
        crcs = grid.dp_comm.allgather_objects(crc(model.flat))
        if len(set(crcs)) != 1:
            raise RuntimeError(
                f"{what} differ across data-parallel ranks (crc32 {crcs}): a bug, please report it"
            )
    if grid.emb_comm is not None:  # the tied embedding's copies on the first and the last stage
        crcs = grid.emb_comm.allgather_objects(crc(model.params["wte.weight"]))
        if len(set(crcs)) != 1:
            raise RuntimeError(
                f"{what}: the tied embedding's copies on the first and last pipeline stage differ "
                f"(crc32 {crcs}): a bug, please report it"
            )
