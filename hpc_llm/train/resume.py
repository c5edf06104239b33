"""Where a trainer's weights and state come from: train.init_from's weights, a checkpoint restored
(checkpoint/trainer_state.py), or a fresh start (the seed's initialisation, or train.init_from's weights) when
--resume auto finds none that verifies."""

from __future__ import annotations

from pathlib import Path

from hpc_llm import checkpoint as ckpt
from hpc_llm.checkpoint.trainer_restore import Restored
from hpc_llm.checkpoint.trainer_state import TrainerParts
from hpc_llm.config import Config
from hpc_llm.data.tokens import TokenData
from hpc_llm.runtime.faults import inject, phase
from hpc_llm.train.build import check_replicas_identical, load_init_from
from hpc_llm.train.compat import check_compatible, open_checkpoint, open_init_from
from hpc_llm.train.startup import StartInputs
from hpc_llm.train.state import TrainState


def restore_or_start_fresh(
    parts: TrainerParts,
    state: TrainState,
    saved: ckpt.CheckpointFile | None,
    candidates: list[Path] | None,
    cfg: Config,
    data: TokenData,
) -> tuple[TrainState, Restored | None]:
    """Restore ``saved`` (``candidates`` None) or the first of ``candidates`` that verifies into ``parts`` and
    ``state`` (checkpoint.resume_trainer); none: a fresh start. Returns the state to train on (``state``, filled, or
    a fresh one) and what was restored (None: started fresh)."""
    is_root = parts.grid.world.rank == 0

    def check_model(file) -> None:
        check_compatible(cfg.model, file, data, is_root)

    restored = ckpt.resume_trainer(parts, state, saved, candidates, check_model)
    if restored is not None:
        return state, restored
    return start_fresh(parts, cfg, data), None


def start_fresh(parts: TrainerParts, cfg: Config, data: TokenData) -> TrainState:
    """The state of a new trainer, after failed restores may have overwritten parameters and moments: the seed's
    initialisation (a fine-tuning config's: its train.init_from weights), zero moments, step 0, no history."""
    t, world = cfg.train, parts.grid.world
    parts.model.init_weights(t.seed)
    if t.init_from:
        saved = world.agree(
            lambda: open_init_from(cfg, data, world.rank == 0), "opening train.init_from"
        )
        load_init_from(parts.model, parts.grid, saved, t.init_from)
    parts.opt.m[...] = 0
    parts.opt.v[...] = 0
    parts.opt.t = 0
    return TrainState.fresh(t)


def begin(
    parts: TrainerParts,
    state: TrainState,
    inputs: StartInputs,
    auto: bool,
    cfg: Config,
    data: TokenData,
) -> tuple[TrainState, Restored | None]:
    """A new trainer's weights and state: train.init_from's weights into a fresh run, or --resume's checkpoint
    (``auto``: world rank 0's candidates tried newest first; none verifies: a fresh start)."""
    world = parts.grid.world
    if inputs.resume is None and inputs.init_from is not None:
        with phase("init_from"):
            load_init_from(parts.model, parts.grid, inputs.init_from, cfg.train.init_from)
    check_replicas_identical(parts.model, parts.grid, "initial parameters")
    if inputs.resume is None:
        return state, None
    with phase("resume"):
        inject("resume")
        candidates = None
        if auto:
            candidates = world.bcast_object(inputs.candidates if world.rank == 0 else None)
        state, restored = restore_or_start_fresh(parts, state, inputs.resume, candidates, cfg, data)
    if restored is not None:
        check_replicas_identical(parts.model, parts.grid, "resumed parameters")
    return state, restored


def restore_path(
    parts: TrainerParts, state: TrainState, path: Path, cfg: Config, data: TokenData
) -> tuple[TrainState, Restored | None]:
    """Trainer.restore: a checkpoint file (corrupt: UserError on every rank), or a run directory, as --resume auto
    (its newest checkpoint that verifies; none: a fresh start)."""
    world = parts.grid.world
    if world.bcast_object(path.is_dir()):
        candidates = ckpt.choose_candidates(world, path)
        out = restore_or_start_fresh(parts, state, None, candidates, cfg, data)
    else:
        saved = world.agree(lambda: open_checkpoint(path, cfg.model, data, world.rank == 0))
        out = restore_or_start_fresh(parts, state, saved, None, cfg, data)
    check_replicas_identical(parts.model, parts.grid, "restored parameters")
    return out
