"""Which steps update the model: a step whose loss or gradient norm is not finite, or an outlier, is skipped on every
rank alike (the verdict comes from global values); too many bad steps in a row stop the run."""

from __future__ import annotations

import collections
import contextlib
import logging
import math

import numpy as np

log = logging.getLogger("hpc_llm")


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


class SkipPolicy:
    """The verdict on each step from its global loss and gradient norm: update, or skip (not finite, or an outlier
    for the SpikeGuard). fp16: the loss scaler learns of every overflow; one it can still cure by halving its scale
    is expected and not counted as bad. `bad_in_row` counts the other skipped steps since the last good one."""

    def __init__(self, spike_sigma: float, max_bad_steps: int):
        self.spikes = SpikeGuard(spike_sigma)
        self.max_bad_steps = max_bad_steps
        self.bad_in_row = 0

    def should_update(self, step: int, loss: float, norm: float, scaler, warn: bool) -> bool:
        """True: apply the update. False: skip it (parameters and moments untouched), warning on `warn` ranks."""
        finite = math.isfinite(loss) and math.isfinite(norm)
        spike = finite and self.spikes.is_spike(loss, norm)
        headroom = scaler is not None and scaler.scale > 1
        if scaler is not None:
            scaler.update(overflow=not finite)
        if finite and not spike:
            self.bad_in_row = 0
            self.spikes.add(loss, norm)
            return True
        if finite or not headroom:  # an outlier, or not finite with no fp16 scale left to halve
            self.bad_in_row += 1
            if warn:
                log.warning(
                    "step %d: loss %s, grad norm %s: %s, step skipped (%d in a row; train.max_bad_steps=%d)",
                    step,
                    loss,
                    norm,
                    "an outlier (train.spike_sigma)" if spike else "not finite",
                    self.bad_in_row,
                    self.max_bad_steps,
                )
        return False

    @property
    def exhausted(self) -> bool:
        """Too many bad steps in a row: the run stops (with a checkpoint of the last good state)."""
        return self.bad_in_row >= self.max_bad_steps


def overflow_quiet(scaler):
    """fp16 (a loss scaler): values overflow to inf when rounded to the format, expected and what the scaler
    detects, so NumPy's overflow warnings are silenced; else nothing changes."""
    return np.errstate(over="ignore", invalid="ignore") if scaler else contextlib.nullcontext()
