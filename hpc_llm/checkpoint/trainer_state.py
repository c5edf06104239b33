"""A trainer's state in a checkpoint, the save: each writer collects every tensor block by block from the ranks that
hold it (checkpoint/placement.py). Its restore and resume are trainer_restore.py's.

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
from hpc_llm.checkpoint.slabs import Out, whole
from hpc_llm.checkpoint.writers import agreed
from hpc_llm.parallel.compression import powersgd_state

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
