"""What a run reports: its history (Metrics, stored in every checkpoint), the throughput bookkeeping (tokens per
second and MFU, per step and per log window), the log lines and metrics.jsonl, the process's peak memory."""

from __future__ import annotations

import json
import logging
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path

from hpc_llm.checkpoint.format import METRICS_COLUMNS
from hpc_llm.kernels.blas import blas_lines, openblas_kernel
from hpc_llm.plan.memory import Layout, rank_memory
from hpc_llm.plan.predict import PRECISIONS

log = logging.getLogger("hpc_llm")

# the checkpoint format owns the tables' columns: tools write empty tables without importing the trainer
TRAIN_COLUMNS, EVAL_COLUMNS = METRICS_COLUMNS["train"], METRICS_COLUMNS["eval"]
MIB = 2**-20


@dataclass
class Metrics:
    """The run's history, kept in memory, appended to metrics.jsonl and stored in every checkpoint."""

    train: dict = field(default_factory=lambda: {k: [] for k in TRAIN_COLUMNS})
    eval: dict = field(default_factory=lambda: {k: [] for k in EVAL_COLUMNS})

    def add(self, table: str, row: dict) -> None:
        t = getattr(self, table)
        for k in t:
            t[k].append(row[k])

    def as_dict(self) -> dict:
        return {"train": self.train, "eval": self.eval}

    def last_eval(self) -> dict:
        """The newest row of the eval history (resumed ones included), {} before any eval."""
        return {k: v[-1] for k, v in self.eval.items()} if self.eval["step"] else {}


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Throughput:
    """Tokens per second and MFU (model FLOPs over the whole job's peak) of each step, and of the steps since the
    last log line (the window: what the log line reports)."""

    def __init__(self, tokens_per_step: int, flops_per_step: float, peak_flops: float):
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops  # the whole job's: every rank's peak, summed
        self.seconds, self.steps = 0.0, 0

    def add(self, dt: float) -> dict:
        """Count a step of dt seconds; its own rates: {"tokens_per_s", "mfu"}."""
        self.seconds += dt
        self.steps += 1
        return self._rates(dt, 1)

    def window(self) -> dict:
        """The window's rates and mean step time ("ms_per_step"); a new window starts."""
        rates = {
            **self._rates(self.seconds, self.steps),
            "ms_per_step": 1000 * self.seconds / self.steps,
        }
        self.seconds, self.steps = 0.0, 0
        return rates

    def _rates(self, seconds: float, steps: int) -> dict:
        return {
            "tokens_per_s": self.tokens_per_step * steps / seconds,
            "mfu": self.flops_per_step * steps / seconds / self.peak_flops,
        }


class MetricsFile:
    """metrics.jsonl, appended by world rank 0 (a line per logged step and per eval); other ranks write nowhere.

    A write the disk refuses (full, over quota) ends the file, with one warning, not the run: an error here is rank
    0's alone, and unagreed it could only abort the job; the rows are also in every checkpoint, and the next save,
    meeting the same disk, ends the run on every rank alike."""

    def __init__(self, out_dir: Path, is_root: bool):
        self.path = out_dir / "metrics.jsonl"
        self.file = open(self.path, "a") if is_root else open(os.devnull, "w")

    def write(self, kind: str, row: dict) -> None:
        if self.file is None:
            return
        try:
            self.file.write(json.dumps({"kind": kind, **row}) + "\n")
            self.file.flush()
        except OSError as e:
            logging.getLogger("hpc_llm").warning(
                "%s: cannot write (%s): no more rows there (the checkpoints keep the metrics)",
                self.path,
                e.strerror or e,
            )
            self.close()

    def close(self) -> None:
        if self.file is not None:
            file, self.file = self.file, None
            try:
                file.close()
            except OSError:  # what the disk refused to take: said when it was refused
                pass


def log_step(row: dict, window: dict, world_size: int, fp16: bool) -> None:
    """The step's log line: its loss, lr and norm; the window's throughput; communication and loss scale if any."""
    log.info(
        "step %6d | loss %.4f | lr %.3e | grad norm %.3f | %.0f tokens/s | MFU %.1f%% | %.0f ms/step%s%s",
        row["step"],
        row["loss"],
        row["lr"],
        row["grad_norm"],
        window["tokens_per_s"],
        100 * window["mfu"],
        window["ms_per_step"],
        ""
        if world_size == 1
        else f" | comm {1000 * row['comm_seconds']:.0f} ms, {row['comm_bytes'] / 1e6:.1f} MB",
        ""
        if not fp16
        else f" | loss scale {row['loss_scale']:g}, {row['skipped_steps']} steps skipped",
    )


def log_eval(row: dict, seconds: float) -> None:
    log.info(
        "eval %6d | train loss %.4f | val loss %.4f | %.1f s",
        row["step"],
        row["train_loss"],
        row["val_loss"],
        seconds,
    )


def log_first_step_memory(step_peak: float) -> None:
    """This run's first step: the measured peak beside the prediction."""
    log.info(
        "memory of this rank after the first step: peak RSS %.1f MiB (predicted step peak %.1f MiB, plus the "
        "interpreter and libraries)",
        peak_rss_bytes() * MIB,
        MIB * step_peak,
    )


def log_predicted_memory(mem) -> None:
    """The planner's prediction of this rank's memory (hpc_llm/plan/memory.py's RankMemory)."""
    log.info(
        "memory of this rank, predicted from the shapes: parameters %.1f MiB, gradients %.1f, optimizer "
        "state %.1f, activations %.1f at the step's peak (%.1f MiB with compute copy and workspaces)",
        MIB * mem.params,
        MIB * mem.grads,
        MIB * (mem.moments + mem.optimizer_temps),
        MIB * mem.activations,
        MIB * mem.step_peak,
    )
    if mem.teacher:
        log.info(
            "  of which the distillation teacher (weights, logits): %.1f MiB", MIB * mem.teacher
        )


def log_run_start(cfg, model, grid, sync, opt, plan, throughput: Throughput, moment_bytes_job: int):
    """The run's first lines: the model, the batch, the layout, what trains, the gradient reduction, the pipeline,
    the matmul kernel."""
    _log_model_and_batch(cfg, model, throughput)
    moments = (opt.m.nbytes + opt.v.nbytes) * MIB
    log.info(
        "layout: %s; %s, gradient buckets %s (%d); Adam moments %.1f MiB on this rank",
        grid.describe(),
        f"ZeRO-{sync.stage}" if sync.stage else "ZeRO off",
        "by unit" if sync.stage >= 2 else f"of {cfg.parallel.bucket_mb:.1f} MiB",
        len(sync.buckets),
        moments,
    )
    m, t = cfg.model, cfg.train
    log.info(
        "trainable parameters: %d of %d (%.2f%%)%s%s; optimizer memory (Adam moments) %.3f MiB on this "
        "rank, %.3f MiB for the whole job",
        model.num_trainable,
        model.num_params,
        100 * model.num_trainable / model.num_params,
        f", LoRA rank {m.lora_rank} on {'/'.join(m.lora_targets)} (scale {m.lora_scale:g})"
        if m.lora_rank
        else "",
        f", frozen by train.freeze={t.freeze}" if t.freeze else "",
        moments,
        moment_bytes_job * MIB,
    )
    if grid.dp > 1:
        _log_gradient_reduction(cfg, sync)
    if plan.pp > 1:
        _log_pipeline(cfg, plan)
    if cfg.train.backend == "numpy":
        line, warning = blas_lines(openblas_kernel())
        log.info("%s", line)
        if warning:
            log.warning("%s", warning)


def _log_model_and_batch(cfg, model, throughput: Throughput) -> None:
    m, t = cfg.model, cfg.train
    log.info(
        "model: %d layers, %d heads, %d dim, block %d, vocab %d (padded %d), %.2fM parameters, %s, %s",
        m.n_layer,
        m.n_head,
        m.n_embd,
        m.block_size,
        m.vocab_size,
        m.padded_vocab,
        model.num_params / 1e6,
        m.dtype,
        t.backend,
    )
    log.info(
        "batch: %d sequences x %d micro-batches x %d tokens = %d tokens/step; MFU peak %.1f GFLOP/s (all ranks)",
        t.batch_size,
        t.grad_accum,
        m.block_size,
        throughput.tokens_per_step,
        throughput.peak_flops / 1e9,
    )


def _log_gradient_reduction(cfg, sync) -> None:
    par = cfg.parallel
    before, after = sync.bytes_per_step(micro_batches=cfg.train.grad_accum)
    log.info(
        "gradient reduction %s: %.2f MB per step on this rank (uncompressed %.2f MB), ratio %.2fx%s",
        par.grad_comm,
        after / 1e6,
        before / 1e6,
        before / max(after, 1),
        f" (PowerSGD rank {par.powersgd_rank}, {len(sync.powersgd.matrices)} matrices "
        f"compressed, from step {par.powersgd_start})"
        if sync.powersgd
        else "",
    )


def _log_pipeline(cfg, plan) -> None:
    stages = ", ".join(f"{v}: {r.start}-{r.stop - 1}" for v, r in enumerate(plan.layers))
    log.info(
        "pipeline: %d stages x %d virtual, schedule %s, %d micro-batches; layers per (virtual) stage "
        "%s (stage s holds virtual stages s, s + %d, ...)",
        plan.pp,
        plan.virtual,
        cfg.parallel.schedule,
        cfg.train.grad_accum,
        stages,
        plan.pp,
    )


def predicted_memory(cfg, grid, optimizer_threads: int, writer: str, teacher=None):
    """This rank's bytes as the planner models them from the shapes (hpc_llm/plan/memory.py): parameters,
    gradients, optimizer state, the step's activations at their peak, a distillation teacher (its ModelConfig
    priced at the run's block_size), ..."""
    precision = "fp64" if cfg.model.dtype == "float64" else cfg.train.precision
    return rank_memory(
        cfg.model,
        Layout.of(cfg, grid.dp),
        grid.pp_rank,
        PRECISIONS[precision][1],
        grid.dp_rank,
        cfg.parallel.pp_layers,
        optimizer_threads,
        writer=writer,
        async_save=cfg.checkpoint.async_save,
        teacher=teacher,
    )


class RunLog:
    """A run's reporting as it trains: each step's row into the Metrics; every log_interval steps (and the last)
    the log line and a metrics.jsonl line with the window's throughput; each eval's row, line and log line."""

    def __init__(self, cfg, world_size: int, throughput: Throughput, file: MetricsFile):
        self.log_interval, self.max_iters = cfg.train.log_interval, cfg.train.max_iters
        self.fp16 = cfg.train.precision == "fp16"
        self.world_size, self.throughput, self.file = world_size, throughput, file

    def step(self, metrics: Metrics, row: dict, dt: float, comm: dict) -> dict:
        """Record a step: ``row`` has the TRAIN_COLUMNS but the rates (added here from dt, the step's seconds) and
        the communication (summed from comm, the ledger's summary). Returns the whole row."""
        row = {
            **row,
            **self.throughput.add(dt),
            "comm_seconds": sum(c["seconds"] for c in comm.values()),
            "comm_bytes": sum(c["bytes"] for c in comm.values()),
        }
        row = {k: row[k] for k in TRAIN_COLUMNS}
        metrics.add("train", row)
        if row["step"] % self.log_interval == 0 or row["step"] == self.max_iters:
            window = self.throughput.window()
            log_step(row, window, self.world_size, self.fp16)
            rates = {"tokens_per_s": window["tokens_per_s"], "mfu": window["mfu"]}
            self.file.write("train", {**row, **rates, "comm": comm})
        return row

    def eval(self, metrics: Metrics, row: dict, seconds: float) -> None:
        metrics.add("eval", row)
        log_eval(row, seconds)
        self.file.write("eval", row)

    def close(self) -> None:
        self.file.close()
