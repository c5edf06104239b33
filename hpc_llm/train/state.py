"""The training loop's own state, as a checkpoint stores it beside the tensors (checkpoint/trainer_state.py reads and
writes it; the optimizer's step counter, adam_t, stays with the optimizer, which uses it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hpc_llm.config import TrainConfig
from hpc_llm.optim import LossScaler
from hpc_llm.train.metrics import Metrics


@dataclass
class TrainState:
    """step: the next step to run (batches, dropout masks and the lr schedule are functions of it); skipped_steps:
    steps whose update was skipped (non-finite, an outlier, an fp16 overflow); scaler: fp16's dynamic loss scale
    (None otherwise); metrics: the run's history."""

    step: int = 0
    skipped_steps: int = 0
    scaler: LossScaler | None = None
    metrics: Metrics = field(default_factory=Metrics)

    @classmethod
    def fresh(cls, t: TrainConfig) -> TrainState:
        """The state of a new run of train config ``t``."""
        scaler = (
            LossScaler(t.loss_scale_init, t.loss_scale_window) if t.precision == "fp16" else None
        )
        return cls(scaler=scaler)
