"""The training loop: micro-batches, gradient accumulation, clipping, AdamW, eval, logging, checkpoints, resume.

Data flows one way: tokens -> model.forward -> loss -> model.backward (tensor-parallel collectives inside, gradient
buckets reduced over the data-parallel group as they complete) -> optimizer (ZeRO-1: on this rank's shard, then an
allgather) -> checkpoint. Everything a resumed run needs to continue bit for bit is in the checkpoint: parameters, Adam
moments and step counter, and the step: batches and dropout masks are pure functions of (seed, step, micro-batch, row
of the global batch), the same whatever the data/tensor-parallel layout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpc_llm import checkpoint as ckpt
from hpc_llm.backend import get_backend, keep_freed_memory, to_device, to_host
from hpc_llm.bench import matmul_peak_flops
from hpc_llm.config import Config, config_from_dict, stage_layers
from hpc_llm.data import TokenData, check_split_size, get_batch
from hpc_llm.errors import UserError
from hpc_llm.fsio import atomic_write_bytes
from hpc_llm.model.gpt import GPT, StagePlan, merge_ranges, param_specs
from hpc_llm.model.layers import DropoutRNG
from hpc_llm.optim import AdamW, LossScaler, global_grad_norm, lr_at
from hpc_llm.parallel.comm import PipelineComm
from hpc_llm.parallel.data_parallel import GradientSync
from hpc_llm.parallel.grid import Grid, check_layout, world_grid
from hpc_llm.parallel.pipeline import forward_only, run_schedule
from hpc_llm.parallel.schedule import schedule

log = logging.getLogger("hpc_llm")

TRAIN_STREAM, VAL_STREAM, TRAIN_EVAL_STREAM = 0, 1, 2  # sampler streams: training batches, val eval, train eval
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGUSR1/SIGTERM after writing a verified checkpoint; resume to go on
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # Slurm: --signal=B:USR1@T forwarded by the batch script; time limit


class StopRequest:
    """Remembers a stop signal (SIGUSR1/SIGTERM) while the loop runs. The handler only sets a flag; the ranks act on it
    together at a step boundary (``Trainer.should_stop``), since a signal may reach them at different moments."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


@dataclass
class Metrics:
    """The run's history, kept in memory, appended to metrics.jsonl and stored in every checkpoint."""

    train: dict = field(default_factory=lambda: {k: [] for k in ("step", "loss", "lr", "grad_norm", "tokens_per_s",
                                                                   "mfu", "comm_seconds", "comm_bytes",
                                                                   "loss_scale", "skipped_steps")})
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
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
                        f"({data.vocab_size}, from {data.path}/meta.json)")


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, grid: Grid | None = None,
                 stop: StopRequest | None = None):
        self.cfg = cfg
        self.stop = stop if stop is not None else StopRequest()  # train() installs its handlers before any work
        t, par = cfg.train, cfg.parallel
        self.grid = grid if grid is not None else world_grid(par.tp, par.pp)
        world = self.grid.world
        self.is_root = world.rank == 0
        self.xp = get_backend(t.backend)
        keep_freed_memory()
        saved = world.agree(lambda: self._load_inputs(resume))
        dp = self.grid.dp
        self.rows = slice(self.grid.dp_rank * (t.batch_size // dp), (self.grid.dp_rank + 1) * (t.batch_size // dp))
        self.out_dir = Path(t.out_dir)

        self.plan = StagePlan(tuple(stage_layers(cfg.model.n_layer, par.pp * par.virtual_stages, par.pp_layers)),
                              par.pp, self.grid.pp_rank, par.virtual_stages)
        self.model = GPT(cfg.model, self.xp, seed=t.seed, tp_comm=self.grid.tp_comm, plan=self.plan,
                         recompute=t.recompute == "block", precision=t.precision)
        # fp16: dynamic loss scaling; a skipped step (an overflow anywhere) counts in skipped_steps
        self.scaler = LossScaler(t.loss_scale_init, t.loss_scale_window) if t.precision == "fp16" else None
        self.skipped_steps = 0
        self.ops = schedule(par.schedule, par.pp, self.grid.pp_rank, t.grad_accum, par.virtual_stages)
        self.pipe = PipelineComm(self.grid.pp_comm, self.plan.n_virtual) if par.pp > 1 else None
        # the logged loss comes from the last stage, once per TP group
        self.reports_loss = self.model.has_head and self.grid.tp_rank == 0
        bucket_elems = int(par.bucket_mb * 2**20) // self.model.dtype.itemsize
        self.sync = GradientSync(self.model.grad_flat, self.grid.dp_comm, bucket_elems, zero=par.zero == 1)
        self.opt = AdamW(self.model.flat, self.model.grad_flat, self.model.decay_ranges(), t, owned=self.sync.owned)
        self.norm_ranges, self.norm_comm = self._norm_ranges()
        self._check_replicas_identical("initial parameters")
        self.step = 0
        self.metrics = Metrics()
        self._scratch_buffers: dict = {}
        self.written: set[Path] = set()  # checkpoints this run wrote and verified: pruning need not read them again
        if saved is not None:
            world.agree(lambda: self._restore(saved))  # reads only: no collective inside
            self._check_replicas_identical("resumed parameters")
        self.tokens_per_step = t.batch_size * t.grad_accum * cfg.model.block_size
        # MFU is against the peak of the whole job: each rank's (measured, concurrently, or given) summed
        rank_peak = t.peak_tflops * 1e12 or matmul_peak_flops(self.xp, self.model.dtype)
        self.peak_flops = world.allreduce_scalar(rank_peak)

    def _load_inputs(self, resume: str | None):
        """Everything that can fail on bad input, checked before any compute (on every rank, agreed)."""
        cfg, t, par = self.cfg, self.cfg.train, self.cfg.parallel
        try:
            self.data = TokenData(cfg.data.path)
        except UserError as e:
            raise UserError(f"data.path: {e}") from None
        self.train_tokens = self.data.split("train")
        self.val_tokens = self.data.split("val")
        resume_path = self._resume_path(resume)
        saved = self._open_checkpoint(resume_path) if resume_path else None
        resolve_vocab(cfg, self.data)
        check_layout(self.grid.world.size, par.tp, par.pp, cfg.model.n_head, cfg.model.padded_vocab)
        self.writer = cfg.checkpoint.writer
        if self.writer == "auto":
            self.writer = ("mpio" if ckpt.mpio_available() and self.grid.world.size > 1 and par.pp == 1
                           else "gather")
        elif self.writer == "mpio" and not ckpt.mpio_available():
            raise UserError("checkpoint.writer=mpio, but this h5py has no MPI support (h5py.get_config().mpi is "
                            "false): use \"gather\", or h5py built with MPI (README: parallel HDF5)")
        elif self.writer == "mpio" and par.pp > 1:
            raise UserError(f"checkpoint.writer=mpio is not supported with parallel.pp={par.pp} yet: use "
                            "\"gather\" (or \"auto\")")
        elif self.writer == "mpio" and self.grid.world.mpi is None:
            self.writer = "gather"  # a grid that never calls MPI (one process): the same file, written alone
        if t.batch_size % self.grid.dp:
            raise UserError(f"train.batch_size={t.batch_size} is not divisible by the data-parallel size "
                            f"{self.grid.dp} (= {self.grid.world.size} ranks / (parallel.pp={par.pp} x "
                            f"parallel.tp={par.tp}))")
        check_split_size(self.train_tokens, cfg.model.block_size, "train")
        if t.eval_iters > 0:
            check_split_size(self.val_tokens, cfg.model.block_size, "val")
        if resume_path is None and ckpt.list_checkpoints(t.out_dir):
            raise UserError(f"train.out_dir={t.out_dir} already holds checkpoints of another run: resume it with "
                            f"--resume auto, or choose another train.out_dir")
        if self.is_root:  # this run is out_dir's one writer
            Path(t.out_dir).mkdir(parents=True, exist_ok=True)
            ckpt.remove_interrupted_saves(t.out_dir)
            atomic_write_bytes(Path(t.out_dir) / "config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
        return saved

    def _check_replicas_identical(self, what: str) -> None:
        """Data-parallel replicas must hold bitwise the same parameters (identical by construction: initialisation
        depends only on the seed, a resume reads the same file); one small allgather of a checksum proves it."""
        def crc(x) -> int:
            return zlib.crc32(np.ascontiguousarray(to_host(x)).view(np.uint8))

        if self.grid.dp > 1:
            crcs = self.grid.dp_comm.allgather_objects(crc(self.model.flat))
            if len(set(crcs)) != 1:
                raise RuntimeError(f"{what} differ across data-parallel ranks (crc32 {crcs}): a bug, please report it")
        if self.grid.emb_comm is not None:  # the tied embedding's copies on the first and the last stage
            crcs = self.grid.emb_comm.allgather_objects(crc(self.model.params["wte.weight"]))
            if len(set(crcs)) != 1:
                raise RuntimeError(f"{what}: the tied embedding's copies on the first and last pipeline stage differ "
                                   f"(crc32 {crcs}): a bug, please report it")

    def _norm_ranges(self):
        """Ranges of the flat gradient whose squares this rank adds to the global norm, and over which group: each
        element of the whole model counted once (a replicated tensor on TP rank 0 only; ZeRO: this rank's shard)."""
        m = self.model
        tied = m.tied_copy_range()  # the last stage's copy of the embedding: the first stage counts it
        counted = merge_ranges((s.offset, s.offset + s.size) for s in m.specs
                               if (self.grid.tp_rank == 0 or s.tp_axis is not None)
                               and (tied is None or s.offset != tied[0]))
        keep = [(max(a, c), min(b, d)) for a, b in self.sync.owned for c, d in counted if max(a, c) < min(b, d)]
        comm = self.grid.world if self.sync.zero else self.grid.mp_comm
        return keep, comm

    # -- resume ---------------------------------------------------------------------------------------------------------

    def _resume_path(self, resume: str | None) -> Path | None:
        if resume is None:
            return None
        if resume == "auto":
            found = ckpt.find_latest(Path(self.cfg.train.out_dir))
            if found is None:
                log.info("resume auto: no verified checkpoint in %s, starting fresh", self.cfg.train.out_dir)
            return found
        return Path(resume)

    def _open_checkpoint(self, path: Path) -> ckpt.CheckpointFile:
        """Open a checkpoint and check its header and model shape (the tensors' checksums come with _restore)."""
        saved = ckpt.CheckpointFile(path)
        try:
            self._check_compatible(saved)
        except BaseException:
            saved.close()
            raise
        return saved

    def restore(self, path: str | os.PathLike) -> None:
        """Load a checkpoint into this trainer (what --resume does at start). A corrupt file raises UserError on
        every rank, after this trainer's state was partly overwritten: build a new Trainer then."""
        saved = self.grid.world.agree(lambda: self._open_checkpoint(Path(path)))
        self.grid.world.agree(lambda: self._restore(saved))
        self._check_replicas_identical("restored parameters")

    def _scratch(self, name: str):
        """A flat-buffer-sized array kept for checkpoint I/O (ZeRO-1 moments assembled or read): allocated once, since
        fresh pages cost a page fault each (on a VM, several times a memcpy's time)."""
        if name not in self._scratch_buffers:
            self._scratch_buffers[name] = self.xp.empty_like(self.model.flat)
        return self._scratch_buffers[name]

    def _check_compatible(self, saved: ckpt.CheckpointFile) -> None:
        """The model section must match the checkpoint's; training settings may change (e.g. a longer run)."""
        theirs = config_from_dict(saved.config).model
        mine = self.cfg.model
        if mine.vocab_size == 0:
            mine.vocab_size = theirs.vocab_size
        for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dtype", "bias"):
            if getattr(mine, k) != getattr(theirs, k):
                raise UserError(f"checkpoint {saved.path}: model.{k}={getattr(theirs, k)} but the config says "
                                f"{getattr(mine, k)}")

    def _restore(self, saved: ckpt.CheckpointFile) -> None:
        """Each rank reads its own hyperslabs: its TP shard of every parameter and, of the Adam moments, the rows of
        that shard covering the ranges it owns (ZeRO-1: about 1/dp of them); and checksums its share of the file's
        datasets (those it read whole from the bytes it read). Run under agree(): a bad checksum on any rank fails
        the restore on all of them."""
        m = self.model
        with saved:
            saved.share(self.grid.world.rank, self.grid.world.size)

            def reader(group):
                return lambda name, index, out=None: saved.read(group, name, index, out)

            m.read_flat(m.flat, reader("params"), saved.shapes["params"], f"{saved.path} parameters")
            for slot in ("m", "v"):
                group = f"optimizer/{slot}"
                # without ZeRO-1 the moments are laid out like the flat buffer: read straight into them; with it,
                # into one buffer for both (read m, keep its owned part, then v)
                flat = self._scratch("m") if self.sync.zero else getattr(self.opt, slot)
                m.read_flat(flat, reader(group), saved.shapes.get(group, {}), f"{saved.path} optimizer {slot}",
                            ranges=self.sync.owned)
                if self.sync.zero:
                    self.opt.load_moments_flat(slot, flat)
                    saved.settle()  # checksums still reading the buffer finish before v overwrites it
            saved.verify_share()
        m.refresh_compute()
        st = saved.state
        self.step = st["step"]
        self.opt.t = st["adam_t"]
        self.skipped_steps = st.get("skipped_steps", 0)
        if self.scaler is not None and st.get("loss_scaler"):  # saved by an fp16 run; any other starts afresh
            self.scaler.load(st["loss_scaler"])
        for table in ("train", "eval"):
            got = saved.metrics.get(table, {})
            for k, column in getattr(self.metrics, table).items():
                # a column a file from an older version lacks: its neutral value for the steps it holds
                column[:] = (list(np.asarray(got[k]).tolist()) if k in got else
                             [{"loss_scale": 1.0, "skipped_steps": 0}.get(k, float("nan"))] * len(got.get("step", [])))
        log.info("resumed from %s at step %d", saved.path, self.step)

    # -- the loop -------------------------------------------------------------------------------------------------------

    def batch(self, tokens, step: int, micro: int, stream: int):
        """This data-parallel rank's rows of the global micro-batch (step, micro)."""
        c = self.cfg
        x, y = get_batch(tokens, c.model.block_size, c.train.batch_size, c.train.seed, step, micro, stream,
                         rows=self.rows)
        return to_device(x, self.xp), to_device(y, self.xp)

    def micro_batch(self, micro: int):
        """(tokens, targets, dropout rng) of this rank's rows of micro-batch (step, micro)."""
        t = self.cfg.train
        x, y = self.batch(self.train_tokens, self.step, micro, TRAIN_STREAM)
        rng = (DropoutRNG(t.seed, self.step, micro, range(self.rows.start, self.rows.stop), self.xp)
               if self.cfg.model.dropout > 0 else None)
        return x, y, rng

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches, through this rank's schedule (parallel/pipeline.py).
        Returns (mean loss, grad norm before clipping, lr), all global (the same on every rank)."""
        t, dp = self.cfg.train, self.grid.dp
        lr = lr_at(self.step, t)
        self.sync.start()
        loss_scale = self.last_loss_scale = self.scaler.scale if self.scaler else 1.0
        # fp16 overflows to inf when a value is rounded to it: expected, and what the loss scaler detects
        def quiet():
            return np.errstate(over="ignore", invalid="ignore") if self.scaler else contextlib.nullcontext()

        with quiet():  # 1/dp: the bucket allreduce sums over data-parallel ranks, each holding a mean over its rows
            losses = run_schedule(self.model, self.ops, self.pipe, self.micro_batch, loss_scale / (t.grad_accum * dp),
                                  (self.rows.stop - self.rows.start, self.cfg.model.block_size, self.cfg.model.n_embd),
                                  grad_ready=self.sync.grad_ready)
        if self.grid.emb_comm is not None:  # the tied embedding's two copies: each gets the sum of both gradients
            self.grid.emb_comm.allreduce_(self.model.grads["wte.weight"])
        self.sync.finish()
        loss = sum(losses[micro] / t.grad_accum for micro in sorted(losses))
        loss = self.grid.world.allreduce_scalar(loss if self.reports_loss else 0.0) / dp
        # the norm of the unscaled gradient; an inf/nan anywhere in the grid makes it (and so the verdict) non-finite
        # on every rank alike
        with quiet():
            norm = global_grad_norm(self.model.grad_flat, self.norm_ranges, self.norm_comm) / loss_scale
        finite = math.isfinite(loss) and math.isfinite(norm)
        if self.scaler is not None:
            self.scaler.update(overflow=not finite)
            if not finite:  # fp16 overflow: skip the update on every rank; parameters and moments untouched
                self.skipped_steps += 1
                self.step += 1
                return loss, norm, lr
        elif not finite:
            raise FloatingPointError(f"step {self.step}: loss {loss}, grad norm {norm} (lower train.lr?)")
        clip = min(1.0, t.grad_clip / (norm + 1e-6)) if t.grad_clip > 0 else 1.0
        self.opt.step(lr, grad_scale=clip / loss_scale)
        self.sync.gather(self.model.flat)
        self.model.refresh_compute()
        self.step += 1
        return loss, norm, lr

    def evaluate(self) -> dict:
        """Mean loss over eval_iters fixed batches of val and of train (the same batches at every eval)."""
        t = self.cfg.train
        out = {}
        for name, tokens, stream in (("val_loss", self.val_tokens, VAL_STREAM),
                                     ("train_loss", self.train_tokens, TRAIN_EVAL_STREAM)):
            losses = [forward_only(self.model, self.pipe, *self.batch(tokens, i, 0, stream))
                      for i in range(t.eval_iters)]
            mean = float(np.mean(losses)) if self.reports_loss else 0.0
            out[name] = self.grid.world.allreduce_scalar(mean) / self.grid.dp
        return out

    def save(self) -> Path:
        """Gather the full (logical) tensors and write one checkpoint file: from rank 0 (gather), or from all ranks
        together (mpio); all ranks agree it worked before any moves on."""
        t0 = time.perf_counter()
        m, mpio = self.model, self.writer == "mpio"
        # who needs the whole tensors: with mpio every rank (each writes a share of them); else the TP group of
        # rank 0 (data-parallel rank 0), whose TP collectives assemble them for rank 0 to write
        builds = mpio or self.grid.dp_rank == 0
        params = m.full_tensors(m.flat, copy=False) if builds else None  # views where possible: unchanged meanwhile
        optimizer = {}
        for slot in ("m", "v"):
            if not self.sync.zero:
                flat = getattr(self.opt, slot)  # the moments of the whole (TP-local) buffer already
            elif mpio:
                flat = self.opt.moments_flat(slot, out=self._scratch(slot))
                self.sync.gather(flat)
            else:  # each rank's pieces to data-parallel rank 0 only
                flat = self._scratch(slot) if builds else None
                self.sync.gather_to(getattr(self.opt, slot), flat, root=0)
            if builds:
                optimizer[slot] = self._gather_stages(m.full_tensors(flat, copy=False))
        params = self._gather_stages(params) if builds else None
        path = ckpt.checkpoint_path(self.out_dir, self.step)
        state = {"step": self.step, "tokens_seen": self.step * self.tokens_per_step, "adam_t": self.opt.t,
                 "skipped_steps": self.skipped_steps,
                 "loss_scaler": self.scaler.state() if self.scaler is not None else None,
                 "tokenizer": self.data.tokenizer.meta(), "data_path": str(self.data.path),
                 "layout": {"world": self.grid.world.size, "pp": self.grid.pp, "dp": self.grid.dp,
                            "tp": self.grid.tp, "zero": self.cfg.parallel.zero}}
        payload = dict(params=params, optimizer=optimizer, state=state, config=self.cfg.to_dict(),
                       metrics=self.metrics.as_dict())
        if mpio:  # collective: every rank writes its share of the datasets
            ckpt.save_checkpoint_mpio(path, self.grid.world, **payload)

        def write():
            if self.is_root:
                if not mpio:
                    ckpt.save_checkpoint(path, **payload)
                ckpt.write_latest(self.out_dir, path)
                self.written.add(path)
                ckpt.prune_checkpoints(self.out_dir, self.cfg.checkpoint.keep_last, verified=self.written)

        self.grid.world.agree(write)
        log.info("checkpoint %s (%s writer, %.2f s)", path, self.writer, time.perf_counter() - t0)
        return path

    def _stage_tensors(self, stage: int) -> list[str]:
        """The names of the tensors pipeline stage `stage` contributes to a checkpoint, in its buffer's order (the
        last stage's copy of the tied embedding is the first stage's)."""
        plan = StagePlan(self.plan.layers, self.plan.pp, stage, self.plan.virtual)
        return [s.name for s in param_specs(self.cfg.model, 1, plan) if stage == 0 or s.name != "wte.weight"]

    def _gather_stages(self, tensors: dict | None) -> dict | None:
        """pp > 1: every stage's full tensors to world rank 0, the writer: from each stage's leader (its data- and
        tensor-parallel rank 0, which holds them after full_tensors), one message per tensor; root gets the whole
        model, the other leaders None. Other ranks, and pp = 1, keep what they have."""
        g = self.grid
        if g.pp == 1 or g.dp_rank != 0 or g.tp_rank != 0:
            return tensors
        comm = g.pp_comm
        if comm.rank != 0:
            for tag, name in enumerate(self._stage_tensors(comm.rank)):
                comm.isend(np.ascontiguousarray(tensors[name]), 0, tag, "gather_stage").wait()
            return None
        out = dict(tensors)
        for stage in range(1, g.pp):
            for tag, name in enumerate(self._stage_tensors(stage)):
                out[name] = np.empty(self.model.logical[name], dtype=self.model.dtype)
                comm.irecv(out[name], stage, tag, "gather_stage").wait()
        return out

    def predicted_memory(self):
        """This rank's bytes as the planner models them from the shapes (hpc_llm/plan/memory.py): parameters,
        gradients, optimizer state, the step's activations at their peak, ..."""
        from hpc_llm.plan.memory import Layout, rank_memory
        from hpc_llm.plan.search import PRECISIONS

        cfg, par, t = self.cfg, self.cfg.parallel, self.cfg.train
        lay = Layout(par.pp, self.grid.dp, par.tp, par.zero, par.schedule, par.virtual_stages, t.grad_accum,
                     t.batch_size, par.bucket_mb, t.recompute)
        precision = "fp64" if cfg.model.dtype == "float64" else t.precision
        return rank_memory(cfg.model, lay, self.grid.pp_rank, PRECISIONS[precision][1], self.grid.dp_rank,
                           par.pp_layers, self.opt.threads, writer=self.writer)

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        m = self.model
        log.info("model: %d layers, %d heads, %d dim, block %d, vocab %d (padded %d), %.2fM parameters, %s, %s",
                 cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size, cfg.model.vocab_size,
                 cfg.model.padded_vocab, m.num_params / 1e6, cfg.model.dtype, t.backend)
        log.info("batch: %d sequences x %d micro-batches x %d tokens = %d tokens/step; MFU peak %.1f GFLOP/s (all ranks)",
                 t.batch_size, t.grad_accum, cfg.model.block_size, self.tokens_per_step, self.peak_flops / 1e9)
        log.info("layout: %s; ZeRO-1 %s, gradient buckets of %.1f MiB (%d); Adam moments %.1f MiB on this rank",
                 self.grid.describe(), "on" if self.sync.zero else "off", cfg.parallel.bucket_mb,
                 len(self.sync.buckets), (self.opt.m.nbytes + self.opt.v.nbytes) / 2**20)
        if self.plan.pp > 1:
            stages = ", ".join(f"{v}: {r.start}-{r.stop - 1}" for v, r in enumerate(self.plan.layers))
            log.info("pipeline: %d stages x %d virtual, schedule %s, %d micro-batches; layers per (virtual) stage "
                     "%s (stage s holds virtual stages s, s + %d, ...)", self.plan.pp, self.plan.virtual,
                     cfg.parallel.schedule, t.grad_accum, stages, self.plan.pp)
        mem, first_step = self.predicted_memory(), True
        mib = 2 ** -20
        log.info("memory of this rank, predicted from the shapes: parameters %.1f MiB, gradients %.1f, optimizer "
                 "state %.1f, activations %.1f at the step's peak (%.1f MiB with compute copy and workspaces)",
                 mib * mem.params, mib * mem.grads, mib * (mem.moments + mem.optimizer_temps),
                 mib * mem.activations, mib * mem.step_peak)
        metrics_file = open(self.out_dir / "metrics.jsonl", "a") if self.is_root else open(os.devnull, "w")
        ledger = self.grid.world.ledger
        flops_per_step = m.flops_per_token() * self.tokens_per_step
        last = {}
        stopped = 0
        try:
            window_t, window_steps = 0.0, 0
            while self.step < t.max_iters:
                stopped = self.should_stop()
                if stopped:
                    log.info("step %d: stop signal %s received, writing a checkpoint and exiting (status %d)",
                             self.step, signal.Signals(stopped).name, EXIT_PREEMPTED)
                    break
                if t.eval_iters > 0 and self.step % t.eval_interval == 0:
                    last = self._eval_and_log(metrics_file)
                ledger.reset()
                t0 = time.perf_counter()
                loss, norm, lr = self.train_step()
                dt = time.perf_counter() - t0
                comm = ledger.summary()
                if first_step:  # this run's first step: the measured peak beside the prediction
                    first_step = False
                    log.info("memory of this rank after the first step: peak RSS %.1f MiB (predicted step peak %.1f "
                             "MiB, plus the interpreter and libraries)", peak_rss_bytes() * mib, mib * mem.step_peak)
                window_t += dt
                window_steps += 1
                row = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                       "tokens_per_s": self.tokens_per_step / dt, "mfu": flops_per_step / dt / self.peak_flops,
                       "comm_seconds": sum(c["seconds"] for c in comm.values()),
                       "comm_bytes": sum(c["bytes"] for c in comm.values()),
                       "loss_scale": self.last_loss_scale, "skipped_steps": self.skipped_steps}
                self.metrics.add("train", row)
                if self.step % t.log_interval == 0 or self.step == t.max_iters:
                    tps = self.tokens_per_step * window_steps / window_t
                    mfu = flops_per_step * window_steps / window_t / self.peak_flops
                    log.info("step %6d | loss %.4f | lr %.3e | grad norm %.3f | %.0f tokens/s | MFU %.1f%% | "
                             "%.0f ms/step%s%s", self.step, loss, lr, norm, tps, 100 * mfu, 1000 * window_t / window_steps,
                             "" if self.grid.world.size == 1 else
                             f" | comm {1000 * row['comm_seconds']:.0f} ms, {row['comm_bytes'] / 1e6:.1f} MB",
                             "" if self.scaler is None else
                             f" | loss scale {self.last_loss_scale:g}, {self.skipped_steps} steps skipped")
                    metrics_file.write(json.dumps({"kind": "train", **row, "tokens_per_s": tps, "mfu": mfu,
                                                   "comm": comm}) + "\n")
                    metrics_file.flush()
                    window_t, window_steps = 0.0, 0
                interval = self.cfg.checkpoint.interval
                if interval and self.step % interval == 0 and self.step < t.max_iters:  # the last one comes below
                    self.save()
            if t.eval_iters > 0 and not stopped:
                last = self._eval_and_log(metrics_file)
            path = self.save()
        finally:
            metrics_file.close()
        return {**last, "step": self.step, "checkpoint": str(path), "stopped_by": stopped,
                "loss": self.metrics.train["loss"][-1] if self.metrics.train["loss"] else None}

    def should_stop(self) -> int:
        """The stop signal's number if any rank has received one (all ranks get the same answer), else 0."""
        return int(self.grid.world.allreduce_scalar(self.stop.signum, op="max"))

    def _eval_and_log(self, metrics_file) -> dict:
        if self.metrics.eval["step"] and self.metrics.eval["step"][-1] == self.step:
            return {k: v[-1] for k, v in self.metrics.eval.items()}  # resumed right after this eval
        t0 = time.perf_counter()
        ev = self.evaluate()
        row = {"step": self.step, **ev}
        self.metrics.add("eval", row)
        log.info("eval %6d | train loss %.4f | val loss %.4f | %.1f s", self.step, ev["train_loss"], ev["val_loss"],
                 time.perf_counter() - t0)
        metrics_file.write(json.dumps({"kind": "eval", **row}) + "\n")
        metrics_file.flush()
        return row


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train(cfg: Config, resume: str | None = None) -> dict:
    """Train; on SIGUSR1/SIGTERM stop at the next step with a checkpoint (the summary's ``stopped_by`` is the signal)."""
    with StopRequest() as stop:
        return Trainer(cfg, resume, stop=stop).run()
