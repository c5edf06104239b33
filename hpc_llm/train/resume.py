"""Where a trainer's state comes from: a checkpoint restored (checkpoint/trainer_state.py), or a fresh start (the
seed's initialisation, or train.init_from's weights) when --resume auto finds none that verifies."""

from __future__ import annotations

from pathlib import Path

from hpc_llm import checkpoint as ckpt
from hpc_llm.checkpoint.trainer_state import Restored, TrainerParts
from hpc_llm.config import Config
from hpc_llm.data.prepare import TokenData
from hpc_llm.train.build import load_init_from
from hpc_llm.train.compat import check_compatible, open_init_from
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
