"""The training loop: micro-batches, gradient accumulation, clipping, AdamW, eval, logging, checkpoints, resume.

Data flows one way: tokens -> model.forward -> loss -> model.backward (tensor-parallel collectives inside, gradient
buckets reduced over the data-parallel group as they complete) -> optimizer (ZeRO-1: on this rank's shard, then an
allgather) -> checkpoint. Everything a resumed run needs to continue bit for bit is in the checkpoint: parameters, Adam
moments and step counter, and the step: batches and dropout masks are pure functions of (seed, step, micro-batch, row
of the global batch), the same whatever the data/tensor-parallel layout.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import signal
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpc_llm import checkpoint as ckpt
from hpc_llm.backend import get_backend, keep_freed_memory, to_device, to_host
from hpc_llm.bench.calibrate import matmul_peak_flops
from hpc_llm.config import Config, canonical_targets, config_from_dict, stage_layers
from hpc_llm.data.sampler import check_split_size, get_batch
from hpc_llm.data.tokens import TokenData
from hpc_llm.errors import JobError, UserError
from hpc_llm.model.gpt import GPT
from hpc_llm.model.layers import DropoutRNG
from hpc_llm.model.layout import StagePlan, intersect_ranges, is_lora, merge_ranges
from hpc_llm.parallel.comm import PipelineComm
from hpc_llm.parallel.compression import reset_line
from hpc_llm.parallel.data_parallel import GradientSync
from hpc_llm.parallel.grid import Grid, check_layout, world_grid
from hpc_llm.parallel.pipeline import forward_only, run_schedule
from hpc_llm.parallel.schedule import schedule
from hpc_llm.runtime.faults import PHASE, WATCHDOG, inject, phase
from hpc_llm.runtime.fsio import DirectoryLock, atomic_write_bytes
from hpc_llm.runtime.stop import (  # noqa: F401 - EXIT_PREEMPTED: the CLI's exit status
    EXIT_PREEMPTED,
    StopRequest,
)
from hpc_llm.train.optim import AdamW, LossScaler, global_grad_norm, lr_at

log = logging.getLogger("hpc_llm")

TRAIN_STREAM, VAL_STREAM, TRAIN_EVAL_STREAM = (
    0,
    1,
    2,
)  # sampler streams: training batches, val eval, train eval


@dataclass
class Metrics:
    """The run's history, kept in memory, appended to metrics.jsonl and stored in every checkpoint."""

    train: dict = field(
        default_factory=lambda: {
            k: []
            for k in (
                "step",
                "loss",
                "lr",
                "grad_norm",
                "tokens_per_s",
                "mfu",
                "comm_seconds",
                "comm_bytes",
                "loss_scale",
                "skipped_steps",
            )
        }
    )
    eval: dict = field(default_factory=lambda: {k: [] for k in ("step", "train_loss", "val_loss")})

    def add(self, table: str, row: dict) -> None:
        t = getattr(self, table)
        for k in t:
            t[k].append(row[k])

    def as_dict(self) -> dict:
        return {"train": self.train, "eval": self.eval}


def resolve_vocab(cfg: Config, data: TokenData) -> None:
    """model.vocab_size = 0 means the data's; an explicit one must hold every token id of the data."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.vocab_size
    elif cfg.model.vocab_size < data.vocab_size:
        raise UserError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
            f"({data.vocab_size}, from {data.path}/meta.json)"
        )


class Trainer:
    def __init__(
        self,
        cfg: Config,
        resume: str | None = None,
        grid: Grid | None = None,
        stop: StopRequest | None = None,
    ):
        self.cfg = cfg
        self.stop = (
            stop if stop is not None else StopRequest()
        )  # train() installs its handlers before any work
        t, par = cfg.train, cfg.parallel
        WATCHDOG.configure(par.comm_timeout_s)  # from here on no MPI wait lasts longer unnoticed
        PHASE.name, PHASE.step = "start-up", None
        self.lock = None  # rank 0: this run's lock on out_dir
        self.grid = grid if grid is not None else world_grid(par.tp, par.pp)
        world = self.grid.world
        self.is_root = world.rank == 0
        self.xp = get_backend(t.backend)
        keep_freed_memory()
        self._opened: list = []  # the checkpoints _load_inputs opened (resume, init_from)
        try:
            saved = world.agree(lambda: self._load_inputs(resume))
        except (
            BaseException
        ):  # a later check failed, here or on another rank: the files were never handed on
            for f in self._opened:
                f.close()
            raise
        dp = self.grid.dp
        self.rows = slice(
            self.grid.dp_rank * (t.batch_size // dp), (self.grid.dp_rank + 1) * (t.batch_size // dp)
        )
        self.out_dir = Path(t.out_dir)

        self.plan = StagePlan(
            tuple(stage_layers(cfg.model.n_layer, par.pp * par.virtual_stages, par.pp_layers)),
            par.pp,
            self.grid.pp_rank,
            par.virtual_stages,
        )
        self.model = GPT(
            cfg.model,
            self.xp,
            seed=t.seed,
            tp_comm=self.grid.tp_comm,
            plan=self.plan,
            recompute=t.recompute == "block",
            precision=t.precision,
            freeze=t.freeze,
        )
        # fp16: dynamic loss scaling; a skipped step (an overflow anywhere) counts in skipped_steps
        self.scaler = (
            LossScaler(t.loss_scale_init, t.loss_scale_window) if t.precision == "fp16" else None
        )
        self.skipped_steps = (
            0  # steps whose update was skipped (non-finite, an outlier, an fp16 overflow)
        )
        self.bad_in_row = (
            0  # skipped steps in a row, fp16 overflows the scaler can still cure not counted
        )
        self.spikes = SpikeGuard(t.spike_sigma)
        self.ops = schedule(
            par.schedule, par.pp, self.grid.pp_rank, t.grad_accum, par.virtual_stages
        )
        self.pipe = PipelineComm(self.grid.pp_comm, self.plan.n_virtual) if par.pp > 1 else None
        # the logged loss comes from the last stage, once per TP group
        self.reports_loss = self.model.has_head and self.grid.tp_rank == 0
        bucket_elems = int(par.bucket_mb * 2**20) // self.model.dtype.itemsize
        g = self.grid
        self.sync = GradientSync(
            self.model.grad_flat,
            self.grid.dp_comm,
            bucket_elems,
            zero=par.zero == 1,
            scheme=par.grad_comm,
            specs=self.model.specs,
            powersgd_rank=par.powersgd_rank,
            powersgd_start=par.powersgd_start,
            seed=t.seed,
            layout={
                "pp": g.pp,
                "dp": g.dp,
                "tp": g.tp,
                "pp_rank": g.pp_rank,
                "dp_rank": g.dp_rank,
                "tp_rank": g.tp_rank,
            },
        )
        # Adam moments only for what this rank updates (its ZeRO-1 shard) and trains (not frozen)
        self.opt = AdamW(
            self.model.flat,
            self.model.grad_flat,
            self.model.decay_ranges(),
            t,
            owned=intersect_ranges(self.sync.owned, self.model.trainable_ranges()),
        )
        self.norm_ranges, self.norm_comm = self._norm_ranges()
        # the moments' bytes of the whole job: every rank's, each stage's replicas (or ZeRO shards) included
        self.moment_bytes_job = int(
            world.allreduce_scalar(float(self.opt.m.nbytes + self.opt.v.nbytes))
        )
        if saved is None and self._init_from is not None:
            with phase("init_from"):
                self._load_init_from(self._init_from)
        self._check_replicas_identical("initial parameters")
        self.step = 0
        self.metrics = Metrics()
        self.written: set[Path] = (
            set()
        )  # checkpoints this run wrote and verified: pruning need not read them again
        self.saved_step, self.saved_path = (
            None,
            None,
        )  # the step the newest checkpoint of this run holds
        self.powersgd_resume_line = (
            None  # set by a restore: why this rank's PowerSGD state was reset, if it was
        )
        if saved is not None:
            with phase("resume"):
                inject("resume")
                restored = self._resume(
                    saved, resume == "auto"
                )  # auto: the newest that verifies; none: fresh
            if restored is not None:
                self._check_replicas_identical("resumed parameters")
                self._resumed(restored)
        world.agree(
            self._claim_out_dir
        )  # only now: a start refused above has changed nothing on disk
        self.tokens_per_step = t.batch_size * t.grad_accum * cfg.model.block_size
        # MFU is against the peak of the whole job: each rank's (measured, concurrently, or given) summed
        rank_peak = t.peak_tflops * 1e12 or matmul_peak_flops(self.xp, self.model.dtype)
        self.peak_flops = world.allreduce_scalar(rank_peak)

    def _load_inputs(self, resume: str | None):
        """Everything that can fail on bad input, checked before any compute (on every rank, agreed)."""
        cfg, t, par = self.cfg, self.cfg.train, self.cfg.parallel
        if self.is_root:  # first: a live run's directory is refused before anything else
            out = Path(t.out_dir)
            blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
            if blocker is not None:
                raise UserError(
                    f"train.out_dir={t.out_dir}: {blocker} is a file, expected a directory"
                )
            self.lock = DirectoryLock.lock(out, "train.out_dir", create=False)
        PHASE.name = "data loading"
        inject("data")
        try:
            self.data = TokenData(cfg.data.path)
        except UserError as e:
            raise UserError(f"data.path: {e}") from None
        self.train_tokens = self.data.split("train")
        self.val_tokens = self.data.split("val")
        resume_path = self._resume_path(resume)
        saved = self._open_checkpoint(resume_path) if resume_path else None
        self._opened += [saved] if saved is not None else []
        # train.init_from: only for a fresh run (a resume continues its own checkpoint, which holds the weights)
        self._init_from = self._open_init_from() if resume_path is None and t.init_from else None
        self._opened += [self._init_from] if self._init_from is not None else []
        resolve_vocab(cfg, self.data)
        check_layout(self.grid.world.size, par.tp, par.pp, cfg.model.n_head, cfg.model.padded_vocab)
        self.writer = cfg.checkpoint.writer
        if self.writer == "auto":
            self.writer = (
                "mpio"
                if ckpt.mpio_available() and self.grid.world.size > 1 and par.pp == 1
                else "gather"
            )
        elif self.writer == "mpio" and not ckpt.mpio_available():
            raise UserError(
                "checkpoint.writer=mpio, but this h5py has no MPI support (h5py.get_config().mpi is "
                'false): use "gather", or h5py built with MPI (README: parallel HDF5)'
            )
        elif self.writer == "mpio" and par.pp > 1:
            raise UserError(
                f"checkpoint.writer=mpio is not supported with parallel.pp={par.pp} yet: use "
                '"gather" (or "auto")'
            )
        elif self.writer == "mpio" and self.grid.world.mpi is None:
            self.writer = (
                "gather"  # a grid that never calls MPI (one process): the same file, written alone
            )
        if t.batch_size % self.grid.dp:
            raise UserError(
                f"train.batch_size={t.batch_size} is not divisible by the data-parallel size "
                f"{self.grid.dp} (= {self.grid.world.size} ranks / (parallel.pp={par.pp} x "
                f"parallel.tp={par.tp}))"
            )
        check_split_size(self.train_tokens, cfg.model.block_size, "train")
        if t.eval_iters > 0:
            check_split_size(self.val_tokens, cfg.model.block_size, "val")
        if resume_path is None and ckpt.list_checkpoints(t.out_dir):
            raise UserError(
                f"train.out_dir={t.out_dir} already holds checkpoints of another run: resume it with "
                f"--resume auto, or choose another train.out_dir"
            )
        return saved

    def _claim_out_dir(self) -> None:
        """Rank 0, the run directory's one writer: create it, lock it as this run's, remove interrupted saves' files,
        record the resolved config."""
        if not self.is_root:
            return
        out = Path(self.cfg.train.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.lock = self.lock or DirectoryLock.lock(out, "train.out_dir")
        self.lock.claim()
        ckpt.remove_interrupted_saves(out)
        atomic_write_bytes(
            out / "config.json", (json.dumps(self.cfg.to_dict(), indent=2) + "\n").encode()
        )

    def _check_replicas_identical(self, what: str) -> None:
        """Data-parallel replicas must hold bitwise the same parameters (identical by construction: initialisation
        depends only on the seed, a resume reads the same file); one small allgather of a checksum proves it."""

        def crc(x) -> int:
            return zlib.crc32(np.ascontiguousarray(to_host(x)).view(np.uint8))

        if self.grid.dp > 1:
            crcs = self.grid.dp_comm.allgather_objects(crc(self.model.flat))
            if len(set(crcs)) != 1:
                raise RuntimeError(
                    f"{what} differ across data-parallel ranks (crc32 {crcs}): a bug, please report it"
                )
        if (
            self.grid.emb_comm is not None
        ):  # the tied embedding's copies on the first and the last stage
            crcs = self.grid.emb_comm.allgather_objects(crc(self.model.params["wte.weight"]))
            if len(set(crcs)) != 1:
                raise RuntimeError(
                    f"{what}: the tied embedding's copies on the first and last pipeline stage differ "
                    f"(crc32 {crcs}): a bug, please report it"
                )

    def _norm_ranges(self):
        """Ranges of the flat gradient whose squares this rank adds to the global norm, and over which group: each
        element of the whole model counted once (a replicated tensor on TP rank 0 only; ZeRO: this rank's shard)."""
        m = self.model
        tied = (
            m.tied_copy_range()
        )  # the last stage's copy of the embedding: the first stage counts it
        counted = merge_ranges(
            (s.offset, s.offset + s.size)
            for s in m.specs
            if (self.grid.tp_rank == 0 or s.tp_axis is not None)
            and (tied is None or s.offset != tied[0])
        )
        keep = intersect_ranges(
            self.opt.owned, counted
        )  # owned: trained and (ZeRO-1) this rank's shard
        comm = self.grid.world if self.sync.zero else self.grid.mp_comm
        return keep, comm

    # -- resume ----------------------------------------------------------------------------------------------------

    def _resume_path(self, resume: str | None) -> Path | None:
        """The file to open first: the one --resume names; for "auto" the newest in out_dir whose header checks pass
        (no checksums: each rank checks one file's header; world rank 0 lists them all, the candidates _resume
        broadcasts). None: nothing to resume."""
        if resume is None:
            return None
        if resume != "auto":
            return Path(resume)
        out_dir = Path(self.cfg.train.out_dir)
        self._resume_candidates = ckpt.resume_candidates(out_dir, first_only=not self.is_root)
        if not self._resume_candidates:
            log.info("resume auto: no checkpoint in %s, starting fresh", out_dir)
            return None
        return self._resume_candidates[0]

    def _open_checkpoint(self, path: Path) -> ckpt.CheckpointFile:
        """Open a checkpoint and check its header and model shape (the tensors' checksums come with _restore)."""
        saved = ckpt.CheckpointFile(path)
        try:
            self._check_compatible(saved)
            theirs, mine = config_from_dict(saved.config).model, self.cfg.model
            lora = (
                ("lora_rank", "lora_alpha", "lora_targets")
                if mine.lora_rank or theirs.lora_rank
                else ()
            )
            for k in (
                lora
            ):  # a resume continues the same adapters (targets in any order: the same model)
                if _lora_field(mine, k) != _lora_field(theirs, k):
                    raise UserError(
                        f"checkpoint {saved.path}: model.{k}={getattr(theirs, k)} but the config says "
                        f"{getattr(mine, k)}"
                    )
        except BaseException:
            saved.close()
            raise
        return saved

    # -- train.init_from: another run's weights, a fresh run -----------------------------------------------------------

    def _open_init_from(self) -> ckpt.CheckpointFile:
        """Open train.init_from and check it against the config (in _load_inputs: agreed, before any compute): the
        model section must be the checkpoint's (Trainer._check_compatible, tokenizer included), except that a
        smaller model.block_size crops the position embedding, and the LoRA fields: adapters the checkpoint lacks
        start from the seed, adapters it has must be the config's (merge them first for another setting)."""
        t = self.cfg.train
        path = Path(t.init_from)
        if path.is_dir():  # a run directory: its newest verified checkpoint, as `generate` takes it
            found = ckpt.find_latest(path)
            if found is None:
                raise UserError(
                    f"train.init_from={t.init_from}: no verified checkpoint in this directory"
                )
            path = found
        try:
            saved = ckpt.CheckpointFile(path)
        except UserError as e:
            raise UserError(f"train.init_from: {e}") from None
        try:
            theirs, mine = config_from_dict(saved.config).model, self.cfg.model
            if mine.block_size > theirs.block_size:
                raise UserError(
                    f"train.init_from={t.init_from}: model.block_size={mine.block_size} is larger than "
                    f"the checkpoint's {theirs.block_size} (a smaller one crops its position embedding)"
                )
            view = _ConfigView(saved, block_size=mine.block_size)
            try:
                self._check_compatible(view)
            except UserError as e:
                raise UserError(f"train.init_from: {e}") from None
            if theirs.lora_rank > 0 and any(
                _lora_field(mine, k) != _lora_field(theirs, k)
                for k in ("lora_rank", "lora_alpha", "lora_targets")
            ):
                raise UserError(
                    f"train.init_from={t.init_from}: the checkpoint has LoRA adapters (model.lora_rank="
                    f"{theirs.lora_rank}, lora_alpha={theirs.lora_alpha}, lora_targets="
                    f"{theirs.lora_targets}) the config does not: fold them into the weights with "
                    f"`hpc-llm merge-lora` first"
                )
        except BaseException:
            saved.close()
            raise
        return saved

    def _load_init_from(self, saved: ckpt.CheckpointFile) -> None:
        """Each rank reads its hyperslabs of the checkpoint's weights (wpe's first block_size rows) and checksums its
        share of the file; agreed, so a bad checksum anywhere fails the start on every rank. Adapters the file lacks
        keep their initialisation from the seed. Closes ``saved``."""
        m, world = self.model, self.grid.world

        def load():
            with saved:
                saved.share(world.rank, world.size)
                shapes = dict(saved.shapes["params"])
                if "wpe.weight" in shapes:  # cropped: only rows [0, block_size) are read
                    shapes["wpe.weight"] = m.logical["wpe.weight"]
                fresh = [n for n in m.logical if is_lora(n) and n not in shapes]
                shapes.update({n: m.logical[n] for n in fresh})
                ranges = merge_ranges(
                    (s.offset, s.offset + s.size) for s in m.specs if s.name not in fresh
                )
                m.read_flat(
                    m.flat,
                    lambda name, index, out=None: saved.read("params", name, index, out),
                    shapes,
                    f"train.init_from={self.cfg.train.init_from}: parameters",
                    ranges=ranges,
                )
                try:
                    saved.verify_share()
                except UserError as e:
                    raise UserError(f"train.init_from: {e}") from None
            m.refresh_compute()

        world.agree(load, "reading train.init_from")
        if self.is_root:
            log.info(
                "initialised from %s (its model weights; fresh optimizer state, step 0)", saved.path
            )

    def _resume(self, saved: ckpt.CheckpointFile, auto: bool) -> Path | None:
        """Restore what _open_checkpoint opened, on every rank (outside agree: it agrees step by step). A file named
        by --resume: a corrupt one is a UserError on every rank. --resume auto: world rank 0's candidates (newest
        first) are tried in turn, each that fails verification logged and skipped; none left: a fresh start (None).
        Returns the path restored."""
        candidates = None
        if auto:
            candidates = self.grid.world.bcast_object(
                self._resume_candidates if self.is_root else None
            )
        return ckpt.resume_trainer(self, saved, candidates)

    def restore(self, path: str | os.PathLike) -> None:
        """Load a checkpoint into this trainer (what --resume does at start): a checkpoint file (corrupt: UserError
        on every rank, after this trainer's parameters were partly overwritten: build a new Trainer then), or a run
        directory, as --resume auto (its newest checkpoint that verifies; none: the trainer starts fresh)."""
        world = self.grid.world
        if world.bcast_object(Path(path).is_dir()):
            restored = ckpt.resume_trainer(self, None, ckpt.choose_candidates(world, Path(path)))
        else:
            restored = ckpt.resume_trainer(
                self, world.agree(lambda: self._open_checkpoint(Path(path))), None
            )
        self._check_replicas_identical("restored parameters")
        if restored is not None:
            self._resumed(restored)

    def _resumed(self, path: Path) -> None:
        """What follows from the restored history: the step is saved already, the spike guard's window."""
        self.saved_step, self.saved_path = self.step, Path(path)
        self.spikes.rebuild(self.metrics.train)
        # PowerSGD: restored with the rest, or reset (another layout): each rank knows, the first line is logged
        if self.sync.powersgd is not None:
            line = reset_line(self.grid.world.allgather_objects(self.powersgd_resume_line))
            if line and self.is_root:
                log.info("%s", line)

    def _check_compatible(self, saved: ckpt.CheckpointFile) -> None:
        """The model section must match the checkpoint's; training settings may change (e.g. a longer run)."""
        theirs = config_from_dict(saved.config).model
        mine = self.cfg.model
        if mine.vocab_size == 0:
            mine.vocab_size = theirs.vocab_size
        for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dtype", "bias"):
            if getattr(mine, k) != getattr(theirs, k):
                raise UserError(
                    f"checkpoint {saved.path}: model.{k}={getattr(theirs, k)} but the config says "
                    f"{getattr(mine, k)}"
                )
        # the data must be tokenized as the checkpoint's was: the same ids would mean other text (the one check,
        # shared with eval; an ids-only gpt2-bpe import cannot be checked and only warns: the user vouches)
        from hpc_llm.data.tokenizer import check_same_tokenizer

        warning = check_same_tokenizer(
            saved.state.get("tokenizer"),
            self.data.tokenizer.meta(),
            f"checkpoint {saved.path}",
            f"data.path={self.data.path}",
        )
        if warning:
            (log.warning if self.is_root else log.debug)("%s", warning)

    def _restore(self, saved: ckpt.CheckpointFile) -> None:
        """Each rank reads its own hyperslabs of ``saved`` and checksums its share of the file (run under agree(): a
        bad checksum on any rank fails the restore on all of them); checkpoint/trainer_state.py."""
        ckpt.restore_trainer(self, saved)

    # -- the loop --------------------------------------------------------------------------------------------------

    def batch(self, tokens, step: int, micro: int, stream: int):
        """This data-parallel rank's rows of the global micro-batch (step, micro)."""
        c = self.cfg
        x, y = get_batch(
            tokens,
            c.model.block_size,
            c.train.batch_size,
            c.train.seed,
            step,
            micro,
            stream,
            rows=self.rows,
        )
        return to_device(x, self.xp), to_device(y, self.xp)

    def micro_batch(self, micro: int):
        """(tokens, targets, dropout rng) of this rank's rows of micro-batch (step, micro)."""
        t = self.cfg.train
        x, y = self.batch(self.train_tokens, self.step, micro, TRAIN_STREAM)
        rng = (
            DropoutRNG(t.seed, self.step, micro, range(self.rows.start, self.rows.stop), self.xp)
            if self.cfg.model.dropout > 0
            else None
        )
        return x, y, rng

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches, through this rank's schedule (parallel/pipeline.py).
        Returns (mean loss, grad norm before clipping, lr), all global (the same on every rank)."""
        t, dp = self.cfg.train, self.grid.dp
        inject("step", self.step)
        lr = lr_at(self.step, t)
        self.sync.start(self.step)
        loss_scale = self.last_loss_scale = self.scaler.scale if self.scaler else 1.0

        # fp16 overflows to inf when a value is rounded to it: expected, and what the loss scaler detects
        def quiet():
            return (
                np.errstate(over="ignore", invalid="ignore")
                if self.scaler
                else contextlib.nullcontext()
            )

        with quiet():  # 1/dp: the bucket allreduce sums over data-parallel ranks, each holding a mean over its rows
            losses = run_schedule(
                self.model,
                self.ops,
                self.pipe,
                self.micro_batch,
                loss_scale / (t.grad_accum * dp),
                (
                    self.rows.stop - self.rows.start,
                    self.cfg.model.block_size,
                    self.cfg.model.n_embd,
                ),
                grad_ready=self.sync.grad_ready,
            )
        # the tied embedding's two copies: each gets the sum of both gradients (none when frozen: zeros, unread)
        if self.grid.emb_comm is not None and "wte.weight" not in self.model.frozen:
            self.grid.emb_comm.allreduce_(self.model.grads["wte.weight"])
        self.sync.finish(loss_scale)
        if inject("grad", self.step):  # a test's non-finite gradient on this rank
            self.model.grad_flat[...] = np.nan
        # the norm of the unscaled gradient; an inf/nan anywhere in the norm's group makes it non-finite there
        with quiet():
            norm = (
                global_grad_norm(self.model.grad_flat, self.norm_ranges, self.norm_comm)
                / loss_scale
            )
        # the loss's world sum carries a NaN from any rank whose norm is not finite (its group may not span the
        # data-parallel replicas): every rank then sees a non-finite loss and skips alike, at no extra message
        loss = (
            sum(losses[micro] / t.grad_accum for micro in sorted(losses))
            if self.reports_loss
            else 0.0
        )
        loss = (
            self.grid.world.allreduce_scalar(loss + (0.0 if math.isfinite(norm) else math.nan)) / dp
        )
        # the verdict comes from global values, so every rank skips (or steps) alike
        finite = math.isfinite(loss) and math.isfinite(norm)
        spike = finite and self.spikes.is_spike(loss, norm)
        if self.scaler is not None:
            headroom = (
                self.scaler.scale > 1
            )  # an overflow the scaler can still cure by halving: expected
            self.scaler.update(overflow=not finite)
        if not finite or spike:  # skip the update: parameters and moments untouched
            self.skipped_steps += 1
            expected = not finite and self.scaler is not None and headroom
            if not expected:
                self.bad_in_row += 1
                if self.is_root:
                    log.warning(
                        "step %d: loss %s, grad norm %s: %s, step skipped (%d in a row; train.max_bad_steps="
                        "%d)",
                        self.step,
                        loss,
                        norm,
                        "an outlier (train.spike_sigma)" if spike else "not finite",
                        self.bad_in_row,
                        t.max_bad_steps,
                    )
            self.step += 1
            return loss, norm, lr
        self.bad_in_row = 0
        self.spikes.add(loss, norm)
        clip = min(1.0, t.grad_clip / (norm + 1e-6)) if t.grad_clip > 0 else 1.0
        self.opt.step(lr, grad_scale=clip / loss_scale)
        self.sync.gather(self.model.flat)
        self.model.refresh_compute()
        self.step += 1
        return loss, norm, lr

    def evaluate(self) -> dict:
        """Mean loss over eval_iters fixed batches of val and of train (the same batches at every eval)."""
        t = self.cfg.train
        inject("eval", self.step)
        out = {}
        for name, tokens, stream in (
            ("val_loss", self.val_tokens, VAL_STREAM),
            ("train_loss", self.train_tokens, TRAIN_EVAL_STREAM),
        ):
            losses = [
                forward_only(self.model, self.pipe, *self.batch(tokens, i, 0, stream))
                for i in range(t.eval_iters)
            ]
            mean = float(np.mean(losses)) if self.reports_loss else 0.0
            out[name] = self.grid.world.allreduce_scalar(mean) / self.grid.dp
        return out

    def save(self) -> Path:
        """Write this step's checkpoint from every rank (checkpoint.writer: gather or mpio), each block of every
        tensor sent by the rank holding it; ckpt.SaveFailed (a JobError) on every rank if the save failed on any,
        the previous checkpoint untouched (checkpoint/trainer_state.py)."""
        return ckpt.save_trainer(self)

    def predicted_memory(self):
        """This rank's bytes as the planner models them from the shapes (hpc_llm/plan/memory.py): parameters,
        gradients, optimizer state, the step's activations at their peak, ..."""
        from hpc_llm.plan.memory import Layout, rank_memory
        from hpc_llm.plan.predict import PRECISIONS

        cfg, par, t = self.cfg, self.cfg.parallel, self.cfg.train
        lay = Layout(
            par.pp,
            self.grid.dp,
            par.tp,
            par.zero,
            par.schedule,
            par.virtual_stages,
            t.grad_accum,
            t.batch_size,
            par.bucket_mb,
            t.recompute,
        )
        precision = "fp64" if cfg.model.dtype == "float64" else t.precision
        return rank_memory(
            cfg.model,
            lay,
            self.grid.pp_rank,
            PRECISIONS[precision][1],
            self.grid.dp_rank,
            par.pp_layers,
            self.opt.threads,
            writer=self.writer,
        )

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        m = self.model
        log.info(
            "model: %d layers, %d heads, %d dim, block %d, vocab %d (padded %d), %.2fM parameters, %s, %s",
            cfg.model.n_layer,
            cfg.model.n_head,
            cfg.model.n_embd,
            cfg.model.block_size,
            cfg.model.vocab_size,
            cfg.model.padded_vocab,
            m.num_params / 1e6,
            cfg.model.dtype,
            t.backend,
        )
        log.info(
            "batch: %d sequences x %d micro-batches x %d tokens = %d tokens/step; MFU peak %.1f GFLOP/s (all ranks)",
            t.batch_size,
            t.grad_accum,
            cfg.model.block_size,
            self.tokens_per_step,
            self.peak_flops / 1e9,
        )
        log.info(
            "layout: %s; ZeRO-1 %s, gradient buckets of %.1f MiB (%d); Adam moments %.1f MiB on this rank",
            self.grid.describe(),
            "on" if self.sync.zero else "off",
            cfg.parallel.bucket_mb,
            len(self.sync.buckets),
            (self.opt.m.nbytes + self.opt.v.nbytes) / 2**20,
        )
        log.info(
            "trainable parameters: %d of %d (%.2f%%)%s%s; optimizer memory (Adam moments) %.3f MiB on this "
            "rank, %.3f MiB for the whole job",
            m.num_trainable,
            m.num_params,
            100 * m.num_trainable / m.num_params,
            f", LoRA rank {cfg.model.lora_rank} on {'/'.join(cfg.model.lora_targets)} (scale "
            f"{cfg.model.lora_scale:g})"
            if cfg.model.lora_rank
            else "",
            f", frozen by train.freeze={t.freeze}" if t.freeze else "",
            (self.opt.m.nbytes + self.opt.v.nbytes) / 2**20,
            self.moment_bytes_job / 2**20,
        )
        if self.grid.dp > 1:
            before, after = self.sync.bytes_per_step()
            log.info(
                "gradient reduction %s: %.2f MB per step on this rank (uncompressed %.2f MB), ratio %.2fx%s",
                cfg.parallel.grad_comm,
                after / 1e6,
                before / 1e6,
                before / max(after, 1),
                f" (PowerSGD rank {cfg.parallel.powersgd_rank}, {len(self.sync.powersgd.matrices)} matrices "
                f"compressed, from step {cfg.parallel.powersgd_start})"
                if self.sync.powersgd
                else "",
            )
        if self.plan.pp > 1:
            stages = ", ".join(
                f"{v}: {r.start}-{r.stop - 1}" for v, r in enumerate(self.plan.layers)
            )
            log.info(
                "pipeline: %d stages x %d virtual, schedule %s, %d micro-batches; layers per (virtual) stage "
                "%s (stage s holds virtual stages s, s + %d, ...)",
                self.plan.pp,
                self.plan.virtual,
                cfg.parallel.schedule,
                t.grad_accum,
                stages,
                self.plan.pp,
            )
        mem, first_step = self.predicted_memory(), True
        mib = 2**-20
        log.info(
            "memory of this rank, predicted from the shapes: parameters %.1f MiB, gradients %.1f, optimizer "
            "state %.1f, activations %.1f at the step's peak (%.1f MiB with compute copy and workspaces)",
            mib * mem.params,
            mib * mem.grads,
            mib * (mem.moments + mem.optimizer_temps),
            mib * mem.activations,
            mib * mem.step_peak,
        )
        metrics_file = (
            open(self.out_dir / "metrics.jsonl", "a") if self.is_root else open(os.devnull, "w")
        )
        ledger = self.grid.world.ledger
        flops_per_step = m.flops_per_token() * self.tokens_per_step
        stopped = 0
        try:
            window_t, window_steps = 0.0, 0
            while self.step < t.max_iters:
                stopped = self.should_stop()
                if not stopped and t.eval_iters > 0 and self.step % t.eval_interval == 0:
                    self._eval_and_log(metrics_file)
                    stopped = (
                        self.should_stop()
                    )  # a signal during the eval does not wait for another step
                if stopped:
                    log.info(
                        "step %d: stop signal %s received, writing a checkpoint and exiting (status %d)",
                        self.step,
                        signal.Signals(stopped).name,
                        EXIT_PREEMPTED,
                    )
                    break
                ledger.reset()
                t0 = time.perf_counter()
                with phase("step", self.step):
                    loss, norm, lr = self.train_step()
                dt = time.perf_counter() - t0
                comm = ledger.summary()
                if first_step:  # this run's first step: the measured peak beside the prediction
                    first_step = False
                    log.info(
                        "memory of this rank after the first step: peak RSS %.1f MiB (predicted step peak %.1f "
                        "MiB, plus the interpreter and libraries)",
                        peak_rss_bytes() * mib,
                        mib * mem.step_peak,
                    )
                window_t += dt
                window_steps += 1
                row = {
                    "step": self.step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": norm,
                    "tokens_per_s": self.tokens_per_step / dt,
                    "mfu": flops_per_step / dt / self.peak_flops,
                    "comm_seconds": sum(c["seconds"] for c in comm.values()),
                    "comm_bytes": sum(c["bytes"] for c in comm.values()),
                    "loss_scale": self.last_loss_scale,
                    "skipped_steps": self.skipped_steps,
                }
                self.metrics.add("train", row)
                if self.step % t.log_interval == 0 or self.step == t.max_iters:
                    tps = self.tokens_per_step * window_steps / window_t
                    mfu = flops_per_step * window_steps / window_t / self.peak_flops
                    log.info(
                        "step %6d | loss %.4f | lr %.3e | grad norm %.3f | %.0f tokens/s | MFU %.1f%% | "
                        "%.0f ms/step%s%s",
                        self.step,
                        loss,
                        lr,
                        norm,
                        tps,
                        100 * mfu,
                        1000 * window_t / window_steps,
                        ""
                        if self.grid.world.size == 1
                        else f" | comm {1000 * row['comm_seconds']:.0f} ms, {row['comm_bytes'] / 1e6:.1f} MB",
                        ""
                        if self.scaler is None
                        else f" | loss scale {self.last_loss_scale:g}, {self.skipped_steps} steps skipped",
                    )
                    metrics_file.write(
                        json.dumps(
                            {"kind": "train", **row, "tokens_per_s": tps, "mfu": mfu, "comm": comm}
                        )
                        + "\n"
                    )
                    metrics_file.flush()
                    window_t, window_steps = 0.0, 0
                if self.bad_in_row >= t.max_bad_steps:
                    path = self.checkpoint(final=True)
                    raise JobError(
                        f"step {self.step}: the last {self.bad_in_row} steps were skipped (non-finite or "
                        f"outlier loss or gradient norm; train.max_bad_steps={t.max_bad_steps}): run "
                        f"stopped; {path} holds the last good parameters (resume it with a lower "
                        "train.lr, or from an earlier checkpoint)"
                    )
                interval = self.cfg.checkpoint.interval
                if (
                    interval and self.step % interval == 0 and self.step < t.max_iters
                ):  # the last one comes below
                    self.checkpoint()
            if t.eval_iters > 0 and not stopped:
                self._eval_and_log(metrics_file)
            path = self.checkpoint(final=True)
        finally:
            metrics_file.close()
        return {
            **self._last_eval(),
            "step": self.step,
            "checkpoint": str(path),
            "stopped_by": stopped,
            "loss": self.metrics.train["loss"][-1] if self.metrics.train["loss"] else None,
        }

    def _last_eval(self) -> dict:
        """The newest row of the eval history (resumed ones included), {} before any eval."""
        return {k: v[-1] for k, v in self.metrics.eval.items()} if self.metrics.eval["step"] else {}

    def checkpoint(self, final: bool = False) -> Path | None:
        """Save this step, unless it is saved already (resumed from it, or a stop right after a save). A save that
        fails on any rank failed on all (JobError, after its temporary file is removed and with the previous
        checkpoint untouched): it ends the run, or with checkpoint.on_error = "continue" is logged and training goes
        on (not for the final save: the run must not end without its checkpoint)."""
        if self.saved_step == self.step:
            return self.saved_path
        try:
            with phase("save", self.step):
                path = self.save()
        except JobError as e:
            if final or self.cfg.checkpoint.on_error != "continue":
                raise
            if self.is_root:
                log.error(
                    "hpc-llm: %s; training goes on without this checkpoint (checkpoint.on_error=continue)",
                    e,
                )
            return None
        self.saved_step, self.saved_path = self.step, path
        return path

    def close(self) -> None:
        """Release out_dir's lock (the process's end would as well)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def should_stop(self) -> int:
        """The stop signal's number if any rank has received one (all ranks get the same answer), else 0."""
        return int(self.grid.world.allreduce_scalar(self.stop.signum, op="max"))

    def _eval_and_log(self, metrics_file) -> dict:
        if self.metrics.eval["step"] and self.metrics.eval["step"][-1] == self.step:
            return self._last_eval()  # resumed right after this eval
        t0 = time.perf_counter()
        with phase("eval", self.step):
            ev = self.evaluate()
        row = {"step": self.step, **ev}
        self.metrics.add("eval", row)
        log.info(
            "eval %6d | train loss %.4f | val loss %.4f | %.1f s",
            self.step,
            ev["train_loss"],
            ev["val_loss"],
            time.perf_counter() - t0,
        )
        metrics_file.write(json.dumps({"kind": "eval", **row}) + "\n")
        metrics_file.flush()
        return row


def _lora_field(m, key: str):
    """A LoRA field of a model config as compared on resume and init_from: lora_targets in the canonical order (a
    checkpoint's config may predate config validation sorting them)."""
    return canonical_targets(m.lora_targets) if key == "lora_targets" else getattr(m, key)


class _ConfigView:
    """A checkpoint as Trainer._check_compatible reads it (path, state, config), with model.block_size set to the
    run's: init_from may crop the position embedding, every other model field must match."""

    def __init__(self, saved: ckpt.CheckpointFile, block_size: int):
        self._saved = saved
        self.config = {
            **saved.config,
            "model": {**saved.config.get("model", {}), "block_size": block_size},
        }

    def __getattr__(self, name):  # path, state, ...: the checkpoint's own
        return getattr(self._saved, name)


class SpikeGuard:
    """train.spike_sigma > 0: a step whose loss or gradient norm exceeds the mean of the last `window` good steps by
    more than sigma standard deviations is an outlier (skipped). Needs `warmup` good steps first. The window is
    rebuilt from the metrics on resume, so a resumed run decides as the uninterrupted one does."""

    def __init__(self, sigma: float, window: int = 100, warmup: int = 20):
        self.sigma, self.warmup = sigma, warmup
        self.history: collections.deque[tuple[float, float]] = collections.deque(maxlen=window)

    def add(self, loss: float, norm: float) -> None:
        if self.sigma > 0:
            self.history.append((loss, norm))

    def is_spike(self, loss: float, norm: float) -> bool:
        if self.sigma <= 0 or len(self.history) < self.warmup:
            return False
        h = np.asarray(self.history)
        mean, std = h.mean(axis=0), h.std(axis=0)
        return bool(loss > mean[0] + self.sigma * std[0] or norm > mean[1] + self.sigma * std[1])

    def rebuild(self, train_metrics: dict) -> None:
        """The good steps of a resumed run's history: those that did not add to skipped_steps."""
        self.history.clear()
        before = 0
        for loss, norm, skipped in zip(
            train_metrics["loss"], train_metrics["grad_norm"], train_metrics["skipped_steps"]
        ):
            if skipped == before:
                self.add(loss, norm)
            before = skipped


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train(cfg: Config, resume: str | None = None, stop: StopRequest | None = None) -> dict:
    """Train; on SIGUSR1/SIGTERM stop at the next step with a checkpoint (the summary's ``stopped_by`` is the signal).
    `stop`: handlers the caller installed earlier (the CLI does, before start-up); else installed here."""
    with contextlib.nullcontext(stop) if stop is not None else StopRequest() as stop:
        trainer = Trainer(cfg, resume, stop=stop)
        try:
            return trainer.run()
        finally:
            trainer.close()
