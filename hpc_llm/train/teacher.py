"""A distilled run's teacher (train.teacher; docs/compression.md).

Placement: the teacher's logits are needed only where the student's loss is, on the last pipeline stage, so only the
ranks of that stage hold it: its whole model (all its layers), tensor-parallel over their TP group with the same
vocabulary slices as the student's head (the same padded vocabulary and tp: rank r holds columns [v0, v0 + Vl) of
both), so the loss joins them by allreduces of a few numbers per row and no logits are gathered. Every data-parallel
replica's last stage holds a copy and runs it on its own rows. Inference only: the weights in the student's
model.dtype, no gradients, no optimizer state, nothing kept for a backward; each micro-batch's forward runs when the
head asks for it. The teacher's forward adds to the last stage's time: give that stage fewer student layers
(parallel.pp_layers) to balance a pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np

from hpc_llm.api import model_config, open_checkpoint
from hpc_llm.errors import UserError
from hpc_llm.model.distill import Distill
from hpc_llm.model.gpt import GPT
from hpc_llm.model.layout import param_specs
from hpc_llm.parallel.grid import Grid

log = logging.getLogger("hpc_llm")


class Teacher:
    """This rank's share of the teacher (model None: a rank off the last stage) and the distillation settings."""

    def __init__(self, model: GPT | None, alpha: float, temperature: float):
        self.model, self.alpha, self.temperature = model, alpha, temperature
        self.seconds = 0.0  # spent in the teacher's forward on this rank

    def targets(self, x, y):
        """The head's targets for tokens x and next tokens y: a Distill whose teacher logits are computed when a
        head takes the loss (plain y on a rank without the teacher: it has no head either)."""
        if self.model is None:
            return y
        return Distill(y, lambda: self._logits(x), self.alpha, self.temperature)

    def _logits(self, x):
        t0 = time.perf_counter()
        out = self.model.split_logits(x)
        self.seconds += time.perf_counter() - t0
        return out

    def priced(self, cfg):
        """The teacher's ModelConfig as the planner prices it (the run's block_size), or None off the last stage."""
        if self.model is None:
            return None
        return dataclasses.replace(self.model.cfg, block_size=cfg.model.block_size)

    @property
    def nbytes(self) -> int:
        """The teacher's weights on this rank (its only memory between micro-batches)."""
        return 0 if self.model is None else int(self.model.flat.nbytes)


def load_teacher(saved, cfg, grid: Grid, xp) -> Teacher:
    """The teacher of an open, checked checkpoint (train/compat.open_teacher): the last stage's ranks each read
    their shards' hyperslabs; every rank checksums its share of the file; agreed, so a bad file fails the start on
    every rank. Closes ``saved``."""
    world, t = grid.world, cfg.train
    tcfg = model_config(saved, cfg.model.dtype)

    def load():
        with saved:
            model = None
            if grid.pp_rank == grid.pp - 1:
                model = GPT(tcfg, xp, seed=None, tp_comm=grid.tp_comm)
                model.read_flat(
                    model.flat,
                    lambda name, index, out=None: saved.read("params", name, index, out),
                    saved.shapes["params"],
                    f"train.teacher={t.teacher}: parameters",
                )
                model.refresh_compute()
            saved.share(world.rank, world.size)
            saved.verify_share()
        return model

    teacher = Teacher(
        world.agree(load, "reading train.teacher"), t.distill_alpha, t.distill_temperature
    )
    if world.rank == 0:
        specs = param_specs(tcfg, grid.tp)
        nbytes = sum(s.size for s in specs) * np.dtype(tcfg.dtype).itemsize
        log.info(
            "teacher: %s (%d layers, %d heads, %d dim, %.2fM parameters), inference only, on the last stage: "
            "%.1f MiB of weights on each of its ranks; loss %g T^2 KL + %g CE, T %g",
            saved.path,
            tcfg.n_layer,
            tcfg.n_head,
            tcfg.n_embd,
            sum(math.prod(s.shape) for s in param_specs(tcfg)) / 1e6,
            nbytes / 2**20,
            t.distill_alpha,
            1 - t.distill_alpha,
            t.distill_temperature,
        )
    return teacher


def log_teacher_time(teacher: Teacher | None, grid: Grid, steps: int, seconds: float) -> None:
    """The teacher's share of the run (its slowest rank's forward time), once at the end; every rank calls it."""
    if teacher is None:
        return
    spent = grid.world.allreduce_scalar(teacher.seconds, op="max")
    if grid.world.rank == 0 and steps > 0:
        log.info(
            "teacher forward: %.1f ms/step over %d steps (%.0f%% of the run's time)",
            1000 * spent / steps,
            steps,
            100 * spent / max(seconds, 1e-12),
        )


def teacher_config(cfg):
    """train.teacher's ModelConfig as the planner prices it (the run's block_size and dtype), read from its
    checkpoint's header; None without a teacher."""
    if not cfg.train.teacher:
        return None
    try:
        with open_checkpoint(cfg.train.teacher) as saved:
            tcfg = model_config(saved, cfg.model.dtype)
    except UserError as e:
        raise UserError(f"train.teacher: {e}") from None
    return dataclasses.replace(tcfg, block_size=cfg.model.block_size)
