"""A trainer's state in a checkpoint: the save (each writer collects every tensor block by block from the ranks that
hold it: checkpoint/placement.py), the restore (each rank reads its own hyperslabs and checksums its share), and the
resume (world rank 0's candidates, tried newest first, the next after one that fails verification).

The functions take the trainer's pieces explicitly (TrainerParts: model, optimizer, gradient sync, grid; the loop's
``state``: step, skipped_steps, loss scaler, metrics, as hpc_llm/train/state.py's TrainState has them) and know
nothing of the Trainer itself.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpc_llm.backend import to_host
from hpc_llm.checkpoint import format as fmt
from hpc_llm.checkpoint import rundir, writers
from hpc_llm.checkpoint.parts import HostStaging, PartsSave
from hpc_llm.checkpoint.placement import ElementPlacement
from hpc_llm.checkpoint.reader import CheckpointFile
from hpc_llm.checkpoint.slabs import Out, whole
from hpc_llm.checkpoint.writers import agreed
from hpc_llm.errors import UserError
from hpc_llm.parallel.compression import load_powersgd_state, powersgd_state

log = logging.getLogger("hpc_llm")

SLOTS = ("m", "v")


@dataclass(frozen=True)
class TrainerParts:
    """The objects whose memory a trainer's checkpoint is written from and read into: the model (flat buffer,
    specs, stage plan), the optimizer (moments m and v over its owned ranges, step counter t: hpc_llm/optim.py's
    AdamW), the gradient sync (ZeRO-1 ownership, PowerSGD state) and the grid."""

    model: Any
    opt: Any
    sync: Any
    grid: Any


@dataclass(frozen=True)
class RunRecord:
    """What a checkpoint's header records of the run beside the loop's state: the config (Config.to_dict()), the
    data's tokenizer (its meta) and path, the tokens of one step."""

    config: dict
    tokenizer: dict
    data_path: str
    tokens_per_step: int


@dataclass
class SaveTarget:
    """Where saves go: the run directory, the writer ("gather", "mpio" or "parts"), how many checkpoints are kept,
    the ones this run wrote and verified (pruning need not read them again; rank 0 adds each save), and the host
    buffer background saves stage this rank's share in (kept from one save to the next)."""

    out_dir: Path
    writer: str
    keep_last: int
    written: set[Path]
    staging: HostStaging = field(default_factory=HostStaging)


def auto_writer(writer: str, ranks: int, async_save: bool) -> str:
    """checkpoint.writer with "auto" resolved: the parts writer with several ranks or background saves (every rank
    writes its own share, no MPI-IO: docs/performance.md), else gather (one process: one file, as fast). The
    trainer and the planner alike."""
    if writer != "auto":
        return writer
    return "parts" if ranks > 1 or async_save else "gather"


@dataclass(frozen=True)
class Restored:
    """A restore's outcome: the file, and why this rank's PowerSGD state was reset (None: restored or not used)."""

    path: Path
    powersgd_line: str | None


# ---------------------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------------------


def _powersgd_meta(parts: TrainerParts) -> list:
    """Every world rank's PowerSGD state, as the save needs it on every rank: [{"layout", "arrays": {name: (shape,
    dtype)}} or None per rank] (compression.powersgd_state; all None for the other schemes)."""
    mine = powersgd_state(parts.sync)
    meta = (
        None
        if mine is None
        else {
            "layout": mine["layout"],
            "arrays": {
                k: (tuple(v.shape), np.dtype(v.dtype).str) for k, v in mine["arrays"].items()
            },
        }
    )
    return parts.grid.world.allgather_objects(meta)


def _powersgd_slice(
    sync, key: str, lo: int, hi: int
) -> np.ndarray:  # on the rank that holds the state
    return to_host(sync.powersgd.state()[key]).reshape(-1)[lo:hi]


def _state(parts: TrainerParts, state, run: RunRecord, psgd: list | None = None) -> dict:
    """The checkpoint's /state: the loop's counters, the data it read, the layout that wrote it."""
    g = parts.grid
    return {
        "powersgd": [None if m is None else m["layout"] for m in psgd]
        if psgd and any(psgd)
        else None,
        "step": state.step,
        "tokens_seen": state.step * run.tokens_per_step,
        "adam_t": parts.opt.t,
        "skipped_steps": state.skipped_steps,
        "loss_scaler": state.scaler.state() if state.scaler is not None else None,
        "tokenizer": run.tokenizer,
        "data_path": run.data_path,
        "layout": {
            "world": g.world.size,
            "pp": g.pp,
            "dp": g.dp,
            "tp": g.tp,
            "zero": run.config["parallel"]["zero"],
        },
    }


def checkpoint_outs(
    parts: TrainerParts, metrics, writer: str, psgd: list | None = None
) -> list[Out]:
    """Every dataset of the trainer's checkpoint, in file order (stage 0's tensors, then stage 1's, ... (the last
    stage's copy of the tied embedding is the first's); the moments m, v alike; the metrics), with its writer (rank
    0; mpio: dealt out by size; parts: none, each rank writes what it holds, a replicated tensor's copy chosen by
    dealing each stage's tensors over its replicas by size) and where each block's elements live. Every rank builds
    the same list."""
    mpio = writer == "mpio"
    world = parts.grid.world
    grid = ElementPlacement(parts)
    tensors = [
        (f"{group}/{spec.name}", s, spec, slot)
        for group, slot in (("params", "params"), *((f"optimizer/{m}", m) for m in SLOTS))
        for s, specs in enumerate(grid.specs)
        for spec in specs
        if s == 0 or spec.name != "wte.weight"
    ]
    lengths = {
        table: {col: len(v) for col, v in cols.items()} for table, cols in metrics.as_dict().items()
    }
    if world.size > 1:
        lengths = world.bcast_object(lengths)  # rank 0 holds (and sends) the metrics: its shapes
    columns = [
        (f"metrics/{table}/{col}", table, col, n)
        for table, cols in lengths.items()
        for col, n in cols.items()
    ]
    dtype = parts.model.dtype
    sizes = [math.prod(spec.shape) * dtype.itemsize for _p, _s, spec, _slot in tensors] + [
        8 * n for *_x, n in columns
    ]
    owner = fmt.deal(sizes, world.size) if mpio else [0] * len(sizes)
    spread = list(range(len(tensors)))
    if writer == "parts":
        owner = [None] * len(sizes)
        for s in range(grid.pp):
            mine = [i for i, t in enumerate(tensors) if t[1] == s]
            for i, d in zip(mine, fmt.deal([sizes[i] for i in mine], grid.dp)):
                spread[i] = d
    outs = []
    for i, (path, s, spec, slot) in enumerate(tensors):
        outs.append(
            Out(
                path,
                spec.shape,
                getattr(parts.opt, slot).dtype if slot != "params" else dtype,
                owner[i],
                grid.tensor_parts(s, spec, slot, owner[i], spread[i]),
            )
        )

    def column(table, col, lo, hi):  # on rank 0
        return np.asarray(metrics.as_dict()[table][col][lo:hi], dtype=np.float64)

    for j, (path, table, col, n) in enumerate(columns, start=len(tensors)):
        outs.append(
            Out(
                path,
                (n,),
                np.float64,
                owner[j] or 0,
                whole(0, functools.partial(column, table, col)),
            )
        )
    return outs + _powersgd_outs(parts.sync, mpio, psgd)


def _powersgd_outs(sync, mpio: bool, psgd: list | None) -> list[Out]:
    """PowerSGD's per-rank state (error feedback, Q): /powersgd/rank<R>/<name with / as :>, from rank R (mpio: R
    writes it), so a resume at the same layout continues exactly."""
    outs = []
    for r, meta in enumerate(psgd or []):
        for key, (shape, dt) in (meta or {"arrays": {}})["arrays"].items():
            outs.append(
                Out(
                    f"powersgd/rank{r}/{key.replace('/', ':')}",
                    shape,
                    dt,
                    r if mpio else 0,
                    whole(r, functools.partial(_powersgd_slice, sync, key)),
                )
            )
    return outs


@dataclass
class PendingSave:
    """A save the parts writer is finishing in the background, in two rounds: every rank's part, then rank 0's
    master, `latest` and pruning. ``ready()`` (collective) says whether the round is done, ``advance()``
    (collective, once ready) starts the second round or ends the save, ``finish()`` (collective) ends it now; both
    return the path once published (SaveFailed on every rank if it failed)."""

    step: int
    save: Any
    publish: Callable[[Callable[[], None]], Path]
    update: Callable[[], None]  # rank 0: `latest` and pruning
    update_error: list = field(default_factory=list)

    def ready(self) -> bool:
        return self.save.ready()

    def advance(self) -> Path | None:
        if self.save.publishing:
            return self.finish()
        self.save.commit(self._update_in_background)
        return None

    def finish(self) -> Path:
        if not self.save.publishing:
            self.save.finish()
            return self.publish(self.update)
        self.save.finish()
        return self.publish(self._updated)

    def _update_in_background(self) -> None:
        try:
            self.update()
        except Exception as e:  # noqa: BLE001 - agreed by publish, on every rank
            self.update_error.append(e)

    def _updated(self) -> None:
        if self.update_error:
            raise self.update_error[0]


def save_trainer(
    parts: TrainerParts, state, run: RunRecord, target: SaveTarget, background: bool = False
) -> Path | PendingSave:
    """Write the trainer's checkpoint of ``state.step``, ``target.out_dir/ckpt_<step>.h5``, from every rank (the
    gather, mpio or parts writer), then point ``latest`` at it and prune old ones (rank 0). A failure on any rank
    raises SaveFailed on every rank (the previous checkpoint untouched). ``background`` (the parts writer): each rank
    copies its share into ``target.staging`` and a thread writes it; returns the PendingSave to finish later."""
    t0 = time.perf_counter()
    world = parts.grid.world
    path = rundir.checkpoint_path(target.out_dir, state.step)
    psgd = _powersgd_meta(parts)
    outs = checkpoint_outs(parts, state.metrics, target.writer, psgd)

    def header():
        return fmt.make_header(_state(parts, state, run, psgd), run.config)

    def update():
        if world.rank == 0:
            target.written.add(path)
            rundir.write_latest(target.out_dir, path)
            rundir.prune_checkpoints(target.out_dir, target.keep_last, verified=target.written)

    def publish(done: Callable[[], None]) -> Path:
        """done(): ``update`` now, or raising what it raised in the background."""
        agreed(
            world,
            done,
            "updating latest",
            f"checkpoint {path} written, but updating {target.out_dir}/latest or pruning failed",
        )
        log.info("checkpoint %s (%s writer, %.2f s)", path, target.writer, time.perf_counter() - t0)
        return path

    if target.writer != "parts":
        mpio = target.writer == "mpio"
        writers.write_checkpoint(path, outs, header, world, mpio=mpio, step=state.step)
        return publish(update)
    staging = target.staging if background else None
    save = PartsSave(path, outs, header, world, state.step, staging).start()
    pending = PendingSave(state.step, save, publish, update)
    return pending if background else pending.finish()


# ---------------------------------------------------------------------------------------------------------------
# restore and resume
# ---------------------------------------------------------------------------------------------------------------


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
