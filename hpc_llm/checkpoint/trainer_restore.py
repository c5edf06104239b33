"""A trainer's checkpoint read back: the restore (each rank reads its own hyperslabs and checksums its share) and the
resume (world rank 0's candidates, tried newest first, the next after one that fails verification). What the save
wrote, and the trainer's parts these fill (TrainerParts), are trainer_state.py's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc_llm.checkpoint import rundir
from hpc_llm.checkpoint.reader import CheckpointFile
from hpc_llm.checkpoint.trainer_state import SLOTS, TrainerParts
from hpc_llm.errors import UserError
from hpc_llm.parallel.compression import load_powersgd_state

log = logging.getLogger("hpc_llm")


@dataclass(frozen=True)
class Restored:
    """A restore's outcome: the file, and why this rank's PowerSGD state was reset (None: restored or not used)."""

    path: Path
    powersgd_line: str | None


def restore_trainer(parts: TrainerParts, state, saved: CheckpointFile) -> str | None:
    """Each rank reads its own hyperslabs: its TP shard of every parameter and, of the Adam moments, the rows of
    that shard covering the ranges it owns (ZeRO-1: about 1/dp of them); and checksums its share of the file's
    datasets (those it read whole from the bytes it read). Run under agree(): a bad checksum on any rank fails
    the restore on all of them; the parameters and moments may then be partly overwritten, ``state`` (step,
    counters, history) is not. Closes ``saved``. Returns why this rank's PowerSGD state was reset, if it was."""
    world = parts.grid.world
    with saved:
        saved.share(world.rank, world.size)
        _read_tensors(parts, saved)
        entry = _powersgd_entry(parts, saved)
        saved.verify_share()
    if parts.opt.owned != [(0, parts.model.local_size)]:
        # frozen weights' gradients are never written: leave no moments in them
        parts.model.clear_grads()
    parts.model.refresh_compute()
    _fill_state(parts, state, saved)
    try:
        line = load_powersgd_state(parts.sync, entry)
    except ValueError as e:  # the same layout but other tensors: a file this code did not write
        raise UserError(f"{saved.path}: {e}") from None
    log.info("resumed from %s at step %d", saved.path, state.step)
    return line


def _read_tensors(parts: TrainerParts, saved: CheckpointFile) -> None:
    """The parameters, then the moments m and v, of this rank's share into the model's and optimizer's memory."""
    m, opt = parts.model, parts.opt

    def reader(group):
        return lambda name, index, out=None: saved.read(group, name, index, out)

    # ZeRO-3: only this rank's pieces (model.kept)
    m.read_flat(
        m.flat, reader("params"), saved.shapes["params"], f"{saved.path} parameters", m.kept
    )
    dense = opt.owned == [(0, m.local_size)]  # moments laid out like the flat buffer
    for slot in SLOTS:
        group = f"optimizer/{slot}"
        # dense: read straight into the moments; else (ZeRO-1's shard, frozen tensors' lack of moments) into the
        # gradient buffer (laid out alike, and scratch between steps: each step's first backward overwrites
        # it), of which the ranges with moments are kept: m first, then v
        flat = getattr(opt, slot) if dense else m.grad_flat
        m.read_flat(
            flat,
            reader(group),
            saved.shapes.get(group, {}),
            f"{saved.path} optimizer {slot}",
            ranges=opt.owned,
        )
        if not dense:
            opt.load_moments_flat(slot, flat)
            saved.settle()  # checksums still reading the buffer finish before v overwrites it


def _powersgd_entry(parts: TrainerParts, saved: CheckpointFile) -> dict | None:
    """This rank's PowerSGD state, if the file has it (compression.load_powersgd_state decides what to do)."""
    rank = parts.grid.world.rank
    layouts = saved.state.get("powersgd") or []
    group = f"powersgd/rank{rank}"
    if getattr(parts.sync, "powersgd", None) is None or rank >= len(layouts) or not layouts[rank]:
        return None
    return {
        "layout": layouts[rank],
        "arrays": {name.replace(":", "/"): saved.read(group, name) for name in saved.names(group)},
    }


def _fill_state(parts: TrainerParts, state, saved: CheckpointFile) -> None:
    """The counters, the loss scaler and the history of a verified file into ``state`` and the optimizer."""
    st = saved.state
    state.step = st["step"]
    parts.opt.t = st["adam_t"]
    state.skipped_steps = st.get("skipped_steps", 0)
    # saved by an fp16 run; any other starts afresh
    if state.scaler is not None and st.get("loss_scaler"):
        state.scaler.load(st["loss_scaler"])
    for table in ("train", "eval"):
        got = saved.metrics.get(table, {})
        for k, column in getattr(state.metrics, table).items():
            # a column a file from an older version lacks: its neutral value for the steps it holds
            column[:] = (
                list(np.asarray(got[k]).tolist())
                if k in got
                else [{"loss_scale": 1.0, "skipped_steps": 0}.get(k, float("nan"))]
                * len(got.get("step", []))
            )


def choose_candidates(world, out_dir: Path) -> list[Path]:
    """World rank 0's list of the checkpoints of ``out_dir`` to try (rundir.resume_candidates: header checks only),
    broadcast: every rank tries the same files in the same order."""
    found = world.agree(
        lambda: rundir.resume_candidates(out_dir) if world.rank == 0 else None,
        "listing checkpoints to resume",
    )
    return world.bcast_object(found)


def resume_trainer(
    parts: TrainerParts,
    state,
    saved: CheckpointFile | None,
    candidates: list[Path] | None,
    check_model: Callable[[CheckpointFile], None],
) -> Restored | None:
    """Restore a checkpoint into ``parts`` and ``state`` on every rank; returns what was restored, or None when
    nothing was: the caller then starts fresh (failed restores may have overwritten parameters and moments).

    ``candidates`` None: ``saved`` alone (a file the user named); any failure is a UserError on every rank.
    Else (``--resume auto``) the files to try, world rank 0's list (the same on every rank), newest first; ``saved``,
    the file this rank opened already (or None), is used when it is the one tried. A file that cannot be opened or
    fails verification (agreed on all ranks) is logged in one line and the next is tried; a model that does not
    match the config (``check_model`` raises) is a UserError. None left: None, logged."""
    world = parts.grid.world
    if candidates is None:
        line = world.agree(lambda: restore_trainer(parts, state, saved), "restoring the checkpoint")
        return Restored(saved.path, line)
    for path in candidates:
        held = [saved] if saved is not None and saved.path == path else []
        if saved is not None and not held:
            saved.close()
        saved = None
        try:
            world.agree(lambda: held or held.append(CheckpointFile(path)), "opening a checkpoint")
        except UserError as e:
            for f in held:
                f.close()
            if world.rank == 0:
                log.warning("resume: skipping a checkpoint: %s", e)
            continue
        try:
            world.agree(lambda: check_model(held[0]), "checking the checkpoint's model")
        except UserError:
            held[0].close()
            raise
        try:
            line = world.agree(
                lambda: restore_trainer(parts, state, held[0]), "restoring the checkpoint"
            )
            return Restored(path, line)
        except UserError as e:
            if world.rank == 0:
                log.warning("resume: skipping a checkpoint: %s", e)
    if saved is not None:
        saved.close()
    log.info(
        "resume auto: none of the %d checkpoints found verifies, starting fresh", len(candidates)
    )
    return None
