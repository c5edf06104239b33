"""The training loop: micro-batches, gradient accumulation, clipping, AdamW, eval, logging, checkpoints, resume.

Data flows one way: tokens -> model.forward -> loss -> model.backward (tensor-parallel collectives inside, gradient
buckets reduced over the data-parallel group as they complete) -> optimizer (ZeRO-1: on this rank's shard, then an
allgather) -> checkpoint. Everything a resumed run needs to continue bit for bit is in the checkpoint: parameters, Adam
moments and step counter, and the step: batches and dropout masks are pure functions of (seed, step, micro-batch, row
of the global batch), the same whatever the data/tensor-parallel layout.

Beside the loop: the start-up's checks (train/startup.py, train/compat.py), the compute objects (train/build.py),
the weights' origin: resume, init_from or fresh (train/resume.py), the loop's state (train/state.py), the skip policy
(train/guards.py), the reporting (train/metrics.py), the checkpoint's contents (checkpoint/trainer_state.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np

from hpc_llm import checkpoint as ckpt
from hpc_llm.backend import get_backend, keep_freed_memory, to_device
from hpc_llm.bench.calibrate import matmul_peak_flops
from hpc_llm.checkpoint.parts import HostStaging
from hpc_llm.checkpoint.trainer_restore import Restored
from hpc_llm.checkpoint.trainer_state import RunRecord, SaveTarget, TrainerParts
from hpc_llm.config import Config
from hpc_llm.data.sampler import TRAIN_EVAL_STREAM, TRAIN_STREAM, VAL_STREAM, get_batch
from hpc_llm.errors import JobError
from hpc_llm.model.layers import DropoutRNG
from hpc_llm.model.layout import intersect_ranges
from hpc_llm.optim import global_grad_norm, lr_at
from hpc_llm.parallel.compression import reset_line
from hpc_llm.parallel.grid import Grid, world_grid
from hpc_llm.parallel.pipeline import forward_only, run_schedule
from hpc_llm.parallel.schedule import V_SHAPED
from hpc_llm.runtime.faults import PHASE, WATCHDOG, inject, phase
from hpc_llm.runtime.stop import EXIT_PREEMPTED, StopRequest
from hpc_llm.train.build import build_engine
from hpc_llm.train.guards import SkipPolicy, overflow_quiet
from hpc_llm.train.metrics import (
    MetricsFile,
    RunLog,
    Throughput,
    log_first_step_memory,
    log_predicted_memory,
    log_run_start,
    predicted_memory,
)
from hpc_llm.train.resume import begin, restore_path
from hpc_llm.train.startup import claim_out_dir, open_inputs
from hpc_llm.train.state import TrainState
from hpc_llm.train.teacher import load_teacher, log_teacher_time

log = logging.getLogger("hpc_llm")
RECORDS_DIR = ".ranks"  # in the run directory: each rank's heartbeat (runtime/records.py)


class Trainer:
    """One rank's share of a training run: built from a validated config (and --resume), then run()."""

    def __init__(self, cfg: Config, resume: str | None = None, grid: Grid | None = None, stop=None):
        # train() installs the stop handlers before any work; from here on no MPI wait lasts longer unnoticed
        self.stop = stop if stop is not None else StopRequest()
        WATCHDOG.configure(cfg.parallel.comm_timeout_s)
        PHASE.name, PHASE.step = "start-up", None
        par = cfg.parallel
        self.grid = g = grid or world_grid(par.tp, par.pp, par.schedule in V_SHAPED)
        self.is_root = g.world.rank == 0
        self.xp = get_backend(cfg.train.backend)
        keep_freed_memory()
        inputs = open_inputs(cfg, g, resume)
        self.cfg, self.lock, self.writer = inputs.cfg, inputs.lock, inputs.writer
        self.data = inputs.data
        self.train_tokens, self.val_tokens = inputs.train_tokens, inputs.val_tokens
        t, per = self.cfg.train, self.cfg.train.batch_size // g.dp
        self.rows, self.out_dir = slice(g.dp_rank * per, (g.dp_rank + 1) * per), Path(t.out_dir)
        e = build_engine(self.cfg, g, self.xp)
        self.plan, self.model, self.ops, self.pipe = e.plan, e.model, e.ops, e.pipe
        self.sync, self.opt, self.zero = e.sync, e.opt, e.zero
        # train.teacher: on the last stage's ranks (train/teacher.py)
        self.teacher = (
            load_teacher(inputs.teacher, self.cfg, g, self.xp) if inputs.teacher else None
        )
        # the flat gradient's ranges this rank adds to the global norm, and over which group
        self.norm = e.norm
        # the logged loss comes from the last stage, once per TP group
        self.reports_loss = self.model.has_head and g.tp_rank == 0
        self.policy, self.last_loss_scale = SkipPolicy(t.spike_sigma, t.max_bad_steps), 1.0
        # the moments' bytes of the whole job: every rank's, each stage's replicas (or ZeRO shards) included
        moments = float(e.opt.m.nbytes + e.opt.v.nbytes)
        self.moment_bytes_job = int(g.world.allreduce_scalar(moments))
        # checkpoints this run wrote and verified (pruning need not read them again); the newest one's step
        self.written, self.saved_step, self.saved_path = set(), None, None
        # a background save (checkpoint.async_save) still being written, and the host buffer it stages in
        self.pending, self.staging = None, HostStaging()
        # why this rank's PowerSGD state was reset by a restore, if it was
        self.powersgd_resume_line = None
        self.state, restored = begin(
            self.parts(), TrainState.fresh(t), inputs, resume == "auto", self.cfg, self.data
        )
        if restored is not None:
            self._resumed(restored)
        # only now: a start refused above has changed nothing on disk
        g.world.agree(self._claim_out_dir)
        # each rank's heartbeat, read by a rank whose watchdog fires to name the one behind (runtime/records.py)
        WATCHDOG.record.start(self.out_dir / RECORDS_DIR, g.world.rank, g.world.size)
        self.tokens_per_step = t.batch_size * t.grad_accum * self.cfg.model.block_size
        # MFU is against the peak of the whole job: each rank's (measured, concurrently, or given) summed
        rank_peak = t.peak_tflops * 1e12 or matmul_peak_flops(self.xp, self.model.dtype)
        self.peak_flops = g.world.allreduce_scalar(rank_peak)

    # the loop's state, as tests and scripts read it
    step = property(lambda self: self.state.step, lambda self, v: setattr(self.state, "step", v))
    metrics = property(lambda self: self.state.metrics)
    scaler = property(lambda self: self.state.scaler)
    skipped_steps = property(lambda self: self.state.skipped_steps)

    def parts(self) -> TrainerParts:
        """The objects whose memory the checkpoint's tensors are written from and read into."""
        return TrainerParts(self.model, self.opt, self.sync, self.grid)

    def restore(self, path: str | os.PathLike) -> None:
        """Load a checkpoint into this trainer (what --resume does at start): a checkpoint file (corrupt: UserError
        on every rank, after this trainer's parameters were partly overwritten: build a new Trainer then), or a run
        directory, as --resume auto (its newest checkpoint that verifies; none: the trainer starts fresh)."""
        self.state, restored = restore_path(
            self.parts(), self.state, Path(path), self.cfg, self.data
        )
        if restored is not None:
            self._resumed(restored)

    def _resumed(self, restored: Restored) -> None:
        """What follows from the restored history: the step is saved already, the spike guard's window."""
        self.saved_step, self.saved_path = self.step, Path(restored.path)
        self.powersgd_resume_line = restored.powersgd_line
        self.policy.spikes.rebuild(self.metrics.train)
        # PowerSGD: restored with the rest, or reset (another layout): each rank knows, the first line is logged
        if self.sync.powersgd is not None:
            line = reset_line(self.grid.world.allgather_objects(self.powersgd_resume_line))
            if line and self.is_root:
                log.info("%s", line)

    def _claim_out_dir(self) -> None:
        if self.is_root:
            self.lock = claim_out_dir(self.cfg, self.lock)
            records = self.out_dir / RECORDS_DIR
            shutil.rmtree(
                records, ignore_errors=True
            )  # an earlier run's records would name its ranks
            records.mkdir()

    # -- the loop --------------------------------------------------------------------------------------------------

    def batch(self, tokens, step: int, micro: int, stream: int):
        """This data-parallel rank's rows of the global micro-batch (step, micro)."""
        m, t = self.cfg.model, self.cfg.train
        x, y = get_batch(
            tokens, m.block_size, t.batch_size, t.seed, step, micro, stream, rows=self.rows
        )
        return to_device(x, self.xp), to_device(y, self.xp)

    def micro_batch(self, micro: int):
        """(tokens, targets, dropout rng) of this rank's rows of micro-batch (step, micro)."""
        x, y = self.batch(self.train_tokens, self.step, micro, TRAIN_STREAM)
        if self.teacher is not None:
            y = self.teacher.targets(x, y)
        rows = range(self.rows.start, self.rows.stop)
        dropout = self.cfg.model.dropout > 0
        rng = DropoutRNG(self.cfg.train.seed, self.step, micro, rows, self.xp) if dropout else None
        return x, y, rng

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches, through this rank's schedule (parallel/pipeline.py).
        Returns (mean loss, grad norm before clipping, lr), all global (the same on every rank)."""
        t = self.cfg.train
        inject("step", self.step)
        lr = lr_at(self.step, t)
        loss_scale = self.last_loss_scale = self.scaler.scale if self.scaler else 1.0
        loss, norm = self._gradients(loss_scale)
        # the verdict comes from global values, so every rank skips (or steps) alike
        applied = self.policy.should_update(self.step, loss, norm, self.scaler, warn=self.is_root)
        if applied:
            clip = min(1.0, t.grad_clip / (norm + 1e-6)) if t.grad_clip > 0 else 1.0
            if self.zero is not None:
                self.zero.release_all()  # no gathered copy may outlive the update
            self.opt.step(lr, grad_scale=clip / loss_scale)
            self.sync.gather(self.model.flat)
            self.model.refresh_compute()
        else:  # skipped: parameters and moments untouched
            self.state.skipped_steps += 1
        # PowerSGD: a skipped step's error feedback and Q are dropped with it
        self.sync.settle(applied)
        self.state.step += 1
        return loss, norm, lr

    def _gradients(self, loss_scale: float) -> tuple[float, float]:
        """This step's reduced gradient (scaled by loss_scale) in grad_flat; returns the global mean loss and the
        unscaled gradient norm. A non-finite norm on any rank makes the loss NaN on every rank."""
        t, dp = self.cfg.train, self.grid.dp
        self.sync.start(self.step)
        shape = self.model.act_shape(self.rows.stop - self.rows.start, self.cfg.model.block_size)
        # 1/dp: the bucket allreduce sums over data-parallel ranks, each holding a mean over its rows
        scale = loss_scale / (t.grad_accum * dp)
        schedule = (self.model, self.ops, self.pipe, self.micro_batch)
        with overflow_quiet(self.scaler):
            losses = run_schedule(*schedule, scale, shape, self.sync.grad_ready)
        # ZeRO-0/1 reduce the bucket holding wte (at offset 0: the last) in finish, after the copies are summed;
        # ZeRO-2/3 have reduced each micro-batch's already, and sum the reduced pieces
        if self.zero is None:
            self._sum_tied_embedding()
        self.sync.finish(loss_scale)
        if self.zero is not None:
            self._sum_tied_embedding()
        if inject("grad", self.step):  # a test's non-finite gradient on this rank
            self.model.grad_flat[...] = np.nan
        # the norm of the unscaled gradient; an inf/nan anywhere in the norm's group makes it non-finite there
        with overflow_quiet(self.scaler):
            norm = global_grad_norm(self.model.grad_flat, *self.norm) / loss_scale
        # the loss's world sum carries a NaN from any rank whose norm is not finite (its group may not span the
        # data-parallel replicas): every rank then sees a non-finite loss and skips alike, at no extra message
        mine = sum(losses[m] / t.grad_accum for m in sorted(losses)) if self.reports_loss else 0.0
        mine += 0.0 if math.isfinite(norm) else math.nan
        return self.grid.world.allreduce_scalar(mine) / dp, norm

    def _sum_tied_embedding(self) -> None:
        """The tied embedding's two copies (first and last stage): each gets the sum of both gradients (none when
        frozen: zeros, unread). ZeRO-2/3: only the piece this rank owns holds a reduced gradient (both stages cut wte
        alike), so only it is summed."""
        if self.grid.emb_comm is None or "wte.weight" in self.model.frozen:
            return
        spec, g = self.model.spec["wte.weight"], self.model.grad_flat
        whole = [(spec.offset, spec.offset + spec.size)]
        for a, b in whole if self.zero is None else intersect_ranges(self.sync.owned, whole):
            self.grid.emb_comm.allreduce_(g[a:b])

    def evaluate(self) -> dict:
        """Mean loss over eval_iters fixed batches of val and of train (the same batches at every eval)."""
        inject("eval", self.step)
        out = {}
        for name, tokens, stream in (
            ("val_loss", self.val_tokens, VAL_STREAM),
            ("train_loss", self.train_tokens, TRAIN_EVAL_STREAM),
        ):
            losses = [
                forward_only(self.model, self.pipe, *self.batch(tokens, i, 0, stream))
                for i in range(self.cfg.train.eval_iters)
            ]
            mean = float(np.mean(losses)) if self.reports_loss else 0.0
            out[name] = self.grid.world.allreduce_scalar(mean) / self.grid.dp
        return out

    def save(self, background: bool = False):
        """Write this step's checkpoint from every rank (checkpoint.writer: gather, mpio or parts); ckpt.SaveFailed
        (a JobError) on every rank if the save failed on any, the previous checkpoint untouched. ``background``:
        started only (the parts writer), its PendingSave returned."""
        tokenizer, data_path = self.data.tokenizer.meta(), str(self.data.path)
        run = RunRecord(self.cfg.to_dict(), tokenizer, data_path, self.tokens_per_step)
        keep = self.cfg.checkpoint.keep_last
        target = SaveTarget(self.out_dir, self.writer, keep, self.written, self.staging)
        return ckpt.save_trainer(self.parts(), self.state, run, target, background)

    def predicted_memory(self):
        """This rank's bytes as the planner models them from the shapes (hpc_llm/plan/memory.py)."""
        teacher = self.teacher.priced(self.cfg) if self.teacher is not None else None
        return predicted_memory(self.cfg, self.grid, self.opt.threads, self.writer, teacher)

    def run(self) -> dict:
        mem = self.predicted_memory()
        flops_per_step = self.model.flops_per_token() * self.tokens_per_step
        throughput = Throughput(self.tokens_per_step, flops_per_step, self.peak_flops)
        engine = (self.model, self.grid, self.sync, self.opt, self.plan)
        log_run_start(self.cfg, *engine, throughput, self.moment_bytes_job)
        log_predicted_memory(mem)
        report = RunLog(
            self.cfg, self.grid.world.size, throughput, MetricsFile(self.out_dir, self.is_root)
        )
        first, stopped, t = True, 0, self.cfg.train
        start, t0 = self.step, time.perf_counter()
        try:
            while self.step < t.max_iters:
                stopped = self._stop_or_eval(report)
                if stopped:
                    break
                self._one_step(report, mem.step_peak if first else None)
                first = False
                self._after_step()
            if t.eval_iters > 0 and not stopped:
                self._eval_and_log(report)
            path = self.checkpoint(final=True)
            log_teacher_time(self.teacher, self.grid, self.step - start, time.perf_counter() - t0)
        finally:
            report.close()
        loss = self.metrics.train["loss"][-1] if self.metrics.train["loss"] else None
        last = self.metrics.last_eval()
        return {
            **last,
            "step": self.step,
            "checkpoint": str(path),
            "stopped_by": stopped,
            "loss": loss,
        }

    def _stop_or_eval(self, report: RunLog) -> int:
        """Before a step: the stop signal's number if any rank has received one (then logged), else 0; an eval
        first when one is due."""
        t = self.cfg.train
        stopped = self.should_stop()
        if not stopped and t.eval_iters > 0 and self.step % t.eval_interval == 0:
            self._eval_and_log(report)
            stopped = self.should_stop()  # a signal during the eval does not wait for another step
        if stopped:
            log.info(
                "step %d: stop signal %s received, writing a checkpoint and exiting (status %d)",
                self.step,
                signal.Signals(stopped).name,
                EXIT_PREEMPTED,
            )
        return stopped

    def _one_step(self, report: RunLog, first_step_peak: float | None) -> None:
        """Run a step, timed and its communication counted, and report it (first_step_peak: this run's first
        step, whose measured peak memory is logged beside the prediction)."""
        ledger = self.grid.world.ledger
        ledger.reset()
        t0 = time.perf_counter()
        with phase("step", self.step):
            loss, norm, lr = self.train_step()
        dt = time.perf_counter() - t0
        comm = ledger.summary()
        if first_step_peak is not None:
            log_first_step_memory(first_step_peak)
        row = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm}
        row.update(loss_scale=self.last_loss_scale, skipped_steps=self.skipped_steps)
        report.step(self.metrics, row, dt, comm)

    def _after_step(self) -> None:
        """Stop after too many bad steps in a row (with a checkpoint of the last good state); save when due."""
        t = self.cfg.train
        self.settle_save(wait=False)
        if self.policy.exhausted:
            path = self.checkpoint(final=True)
            raise JobError(
                f"step {self.step}: the last {self.policy.bad_in_row} steps were skipped (non-finite or "
                f"outlier loss or gradient norm; train.max_bad_steps={t.max_bad_steps}): run "
                f"stopped; {path} holds the last good parameters (resume it with a lower "
                "train.lr, or from an earlier checkpoint)"
            )
        interval = self.cfg.checkpoint.interval
        # the last one: run()'s
        if interval and self.step % interval == 0 and self.step < t.max_iters:
            self.checkpoint()

    def checkpoint(self, final: bool = False) -> Path | None:
        """Save this step, unless it is saved already (resumed from it, or a stop right after a save). A save that
        fails on any rank failed on all (JobError, after its temporary file is removed and with the previous
        checkpoint untouched): it ends the run, or with checkpoint.on_error = "continue" is logged and training goes
        on (not for the final save: the run must not end without its checkpoint)."""
        self.settle_save(wait=True)  # the previous one first
        if self.saved_step == self.step:
            return self.saved_path
        background = self.cfg.checkpoint.async_save and not final
        try:
            with phase("save", self.step):
                path = self.save(background)
        except JobError as e:
            return self._save_failed(e, final)
        if background:
            self.pending = path
            return None
        self.saved_step, self.saved_path = self.step, path
        return path

    def settle_save(self, wait: bool) -> None:
        """Move a background save on once its round is done on every rank (its parts written: rank 0 publishes the
        master in the background; that done: the save ends), or with ``wait`` end it now; report its failure on
        every rank (as checkpoint() does a save's). Collective: every rank calls it at the same step boundary."""
        if self.pending is None or not (wait or self.pending.ready()):
            return
        pending = self.pending
        try:
            with phase("save", pending.step):
                path = pending.finish() if wait else pending.advance()
        except JobError as e:
            self.pending = None
            self._save_failed(e, final=False)
            return
        if path is None:  # its master is being published in the background
            return
        self.pending = None
        self.saved_step, self.saved_path = pending.step, path

    def _save_failed(self, e: JobError, final: bool) -> None:
        if final or self.cfg.checkpoint.on_error != "continue":
            raise e
        if self.is_root:
            log.error(
                "hpc-llm: %s; training goes on without this checkpoint (checkpoint.on_error=continue)",
                e,
            )

    def close(self) -> None:
        """Release out_dir's lock (the process's end would as well); no more heartbeats."""
        WATCHDOG.record.stop()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def should_stop(self) -> int:
        """The stop signal's number if any rank has received one (all ranks get the same answer), else 0."""
        return int(self.grid.world.allreduce_scalar(self.stop.signum, op="max"))

    def _eval_and_log(self, report: RunLog) -> None:
        if self.metrics.eval["step"] and self.metrics.eval["step"][-1] == self.step:
            return  # resumed right after this eval
        t0 = time.perf_counter()
        with phase("eval", self.step):
            ev = self.evaluate()
        report.eval(self.metrics, {"step": self.step, **ev}, time.perf_counter() - t0)


def train(cfg: Config, resume: str | None = None, stop: StopRequest | None = None) -> dict:
    """Train; on SIGUSR1/SIGTERM stop at the next step with a checkpoint (the summary's ``stopped_by`` is the signal).
    `stop`: handlers the caller installed earlier (the CLI does, before start-up); else installed here."""
    with contextlib.nullcontext(stop) if stop is not None else StopRequest() as stop:
        trainer = Trainer(cfg, resume, stop=stop)
        try:
            return trainer.run()
        finally:
            trainer.close()
