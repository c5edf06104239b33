"""A run's start-up: a validated Config plus --resume / train.init_from turned into plain, checked inputs before any
compute: the run directory's lock, the data, the checkpoint(s) opened and checked, model.vocab_size resolved (the
final config), the checkpoint writer, the batch and split sizes. Every check runs on every rank and the verdict is
agreed (a UserError on any rank is raised on all); files opened here are closed when a later check fails."""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from hpc_llm import checkpoint as ckpt
from hpc_llm.checkpoint.trainer_state import auto_writer
from hpc_llm.config import Config, ModelConfig
from hpc_llm.config.checks import check_config
from hpc_llm.data.sampler import check_split_size
from hpc_llm.data.tokens import TokenData
from hpc_llm.errors import UserError
from hpc_llm.model.layout import frozen_names, param_specs
from hpc_llm.parallel.grid import Grid, check_layout
from hpc_llm.runtime.faults import PHASE, inject
from hpc_llm.runtime.fsio import DirectoryLock, atomic_write_bytes, check_writable
from hpc_llm.train.compat import checkpoint_vocab, open_checkpoint, open_init_from, open_teacher

log = logging.getLogger("hpc_llm")


@dataclass
class StartInputs:
    """What the start-up hands the Trainer. cfg: the final config (model.vocab_size resolved, checked again);
    lock: world rank 0's lock on train.out_dir (None elsewhere); resume: --resume's first file, opened and checked
    (None: a fresh run); candidates: --resume auto's files to try (world rank 0's full list, the first elsewhere);
    init_from: train.init_from's file, opened and checked (fresh runs only); writer: "gather" or "mpio"."""

    cfg: Config
    lock: DirectoryLock | None
    data: TokenData
    train_tokens: object
    val_tokens: object
    resume: ckpt.CheckpointFile | None
    candidates: list[Path] | None
    init_from: ckpt.CheckpointFile | None
    writer: str
    teacher: ckpt.CheckpointFile | None = None  # train.teacher's file, opened and checked


def open_inputs(cfg: Config, grid: Grid, resume: str | None) -> StartInputs:
    """Everything that can fail on bad input, checked on every rank and agreed, before any compute."""
    opened: list = []  # the checkpoints opened so far: closed if a later check fails, here or on another rank
    try:
        return grid.world.agree(lambda: _load_inputs(cfg, grid, resume, opened))
    except BaseException:
        for f in opened:
            f.close()
        raise


def _load_inputs(cfg: Config, grid: Grid, resume: str | None, opened: list) -> StartInputs:
    t, is_root = cfg.train, grid.world.rank == 0
    check_freeze(cfg.model, t.freeze)
    lock = _lock_out_dir(t.out_dir) if is_root else None  # a live run's directory: refused first
    PHASE.name = "data loading"
    inject("data")
    try:
        data = TokenData(cfg.data.path)
    except UserError as e:
        raise UserError(f"data.path: {e}") from None
    train_tokens, val_tokens = data.split("train"), data.split("val")
    resume_path, candidates = _resume_path(resume, Path(t.out_dir), is_root)
    saved = open_checkpoint(resume_path, cfg.model, data, is_root) if resume_path else None
    opened += [saved] if saved is not None else []
    # train.init_from: only for a fresh run (a resume continues its own checkpoint, which holds the weights)
    init_from = open_init_from(cfg, data, is_root) if resume_path is None and t.init_from else None
    opened += [init_from] if init_from is not None else []
    # model.vocab_size = 0: the checkpoint's (resumed or init_from), else the data's
    source = saved if saved is not None else init_from
    vocab = cfg.model.vocab_size or (checkpoint_vocab(source) if source is not None else 0)
    cfg = cfg.with_vocab(resolve_vocab(vocab, data))
    check_config(cfg)
    par = cfg.parallel
    m = cfg.model
    check_layout(grid.world.size, par.tp, par.pp, m.n_head, m.padded_vocab, m.mlp_width)
    writer = choose_writer(cfg, grid)
    _check_batch(cfg, grid, train_tokens, val_tokens)
    teacher = open_teacher(cfg, data, cfg.model.vocab_size, is_root) if t.teacher else None
    opened += [teacher] if teacher is not None else []
    if resume_path is None and ckpt.list_checkpoints(t.out_dir):
        raise UserError(
            f"train.out_dir={t.out_dir} already holds checkpoints of another run: resume it with "
            f"--resume auto, or choose another train.out_dir"
        )
    return StartInputs(
        cfg, lock, data, train_tokens, val_tokens, saved, candidates, init_from, writer, teacher
    )


def check_freeze(m: ModelConfig, freeze: list[str]) -> None:
    """train.freeze's patterns: each must match a parameter of the model, and something must be left to train."""
    if not freeze:
        return
    # the whole model's (names do not depend on the vocabulary)
    names = [s.name for s in param_specs(m)]
    for pattern in freeze:
        if not fnmatch.filter(names, pattern):
            raise UserError(
                f"config field train.freeze: pattern {pattern!r} matches no parameter (names like "
                f"{names[1]!r}, 'h.0.attn.c_attn.weight', 'h.*.mlp.*')"
            )
    if len(frozen_names(m, freeze)) == len(names):  # a run that would update nothing
        raise UserError(
            f"config field train.freeze: {freeze!r} freezes every parameter"
            + (
                " (model.lora_rank > 0 freezes the base: these patterns also cover every LoRA adapter)"
                if m.lora_rank > 0
                else ""
            )
            + ": nothing left to train"
        )


def _lock_out_dir(out_dir: str) -> DirectoryLock:
    out = Path(out_dir)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"train.out_dir={out_dir}: {blocker} is a file, expected a directory")
    check_writable(out, f"train.out_dir={out_dir}")
    return DirectoryLock.lock(out, "train.out_dir", create=False)


def _resume_path(resume: str | None, out_dir: Path, is_root: bool):
    """(the file to open first, --resume auto's candidates): the file --resume names; for "auto" the newest in
    out_dir whose header checks pass (no checksums: each rank checks one file's header; world rank 0 lists them
    all, the candidates the resume broadcasts). (None, None): nothing to resume."""
    if resume is None:
        return None, None
    if resume != "auto":
        return Path(resume), None
    candidates = ckpt.resume_candidates(out_dir, first_only=not is_root)
    if not candidates:
        log.info("resume auto: no checkpoint in %s, starting fresh", out_dir)
        return None, candidates
    return candidates[0], candidates


def resolve_vocab(vocab_size: int, data: TokenData) -> int:
    """model.vocab_size = 0 means the data's; an explicit one (or a checkpoint's) must hold every token id of the
    data."""
    if vocab_size == 0:
        return data.vocab_size
    if vocab_size < data.vocab_size:
        raise UserError(
            f"model.vocab_size={vocab_size} is smaller than the data's vocabulary "
            f"({data.vocab_size}, from {data.path}/meta.json)"
        )
    return vocab_size


def choose_writer(cfg: Config, grid: Grid) -> str:
    """checkpoint.writer resolved (trainer_state.auto_writer), refused where this run cannot use it."""
    writer = cfg.checkpoint.writer
    if writer == "auto":
        return auto_writer(writer, grid.world.size, cfg.checkpoint.async_save)
    if writer == "mpio" and not ckpt.mpio_available():
        raise UserError(
            "checkpoint.writer=mpio, but this h5py has no MPI support (h5py.get_config().mpi is "
            'false): use "gather", or h5py built with MPI (README: parallel HDF5)'
        )
    if writer == "mpio" and grid.world.mpi is None:
        return "gather"  # a grid that never calls MPI (one process): the same file, written alone
    return writer


def _check_batch(cfg: Config, grid: Grid, train_tokens, val_tokens) -> None:
    t, par = cfg.train, cfg.parallel
    if t.batch_size % grid.dp:
        raise UserError(
            f"train.batch_size={t.batch_size} is not divisible by the data-parallel size "
            f"{grid.dp} (= {grid.world.size} ranks / (parallel.pp={par.pp} x "
            f"parallel.tp={par.tp}))"
        )
    check_split_size(train_tokens, cfg.model.block_size, "train")
    if t.eval_iters > 0:
        check_split_size(val_tokens, cfg.model.block_size, "val")


def claim_out_dir(cfg: Config, lock: DirectoryLock | None) -> DirectoryLock:
    """World rank 0, the run directory's one writer, once the start is agreed: create it, lock it as this run's,
    remove interrupted saves' files, record the resolved config. Returns the lock."""
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = lock or DirectoryLock.lock(out, "train.out_dir")
    lock.claim()
    ckpt.remove_interrupted_saves(out)
    atomic_write_bytes(out / "config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
    return lock
