"""AdamW over the flat parameter buffer, global-norm gradient clipping, and the learning-rate schedule.

The update is a handful of vector operations over slices of the flat buffers (DESIGN principle 3). It walks the buffer
in cache-sized chunks, so each chunk of p, g, m and v is read from memory once per step instead of once per operation; a
chunk never straddles a weight-decay boundary, so decay is one multiply per decayed chunk.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from hpc_llm.backend import array_module
from hpc_llm.config import TrainConfig
from hpc_llm.kernels.adamw import adamw_update, runs_compiled
from hpc_llm.kernels.cuda import device

CHUNK = 1 << 16  # elements: p, g, m, v and two temporaries of this size stay in a core's L2 cache


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _thread_pool(n: int) -> ThreadPoolExecutor:
    """One pool per size for the whole process, however many optimizers are made (tests make hundreds)."""
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="adamw")
    return _POOLS[n]


def optimizer_threads() -> int:
    """Threads for the AdamW update: the cores this process may run on (1 for a rank bound to one core by mpiexec),
    capped by OMP_NUM_THREADS when set (the same budget as the BLAS threads) and at 8."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        n = min(n, int(env))
    return max(1, min(n, 8))


def lr_at(step: int, t: TrainConfig) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr at lr_decay_iters, then constant."""
    if step < t.warmup_iters:
        return t.lr * (step + 1) / (t.warmup_iters + 1)
    if step > t.lr_decay_iters:
        return t.min_lr
    ratio = (step - t.warmup_iters) / max(1, t.lr_decay_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - t.min_lr)


NORM_CHUNK = 1 << 16  # elements per float64 chunk of the gradient norm (512 KiB: stays in cache)


def global_grad_norm(grads, ranges, comm) -> float:
    """sqrt of the sum of g^2 over `ranges` of the flat gradient, summed over `comm`. The caller picks ranges so
    that every gradient element of the whole model is counted exactly once over the group (a ZeRO shard, or one
    TP rank's copy of a replicated tensor); the result is identical on every rank."""
    xp = array_module(grads)
    if device.on_device(xp):  # one fused reduction over every range (kernels/cuda/adamw.cu)
        return math.sqrt(comm.allreduce_scalar(device.sumsq(xp, grads, ranges)))
    local = 0.0
    # in float64, a chunk at a time: a float32 dot of millions of elements is off by ~1e-5
    for a, b in ranges:
        # with a plain (sequential) BLAS, and DP shards would then disagree
        for c in range(a, b, NORM_CHUNK):
            g = grads[c : min(c + NORM_CHUNK, b)].astype("float64")
            local += float(g @ g)
    return math.sqrt(comm.allreduce_scalar(local))


def _segments(start: int, stop: int, decay_ranges, chunk: int):
    """[(a, b, decayed)] covering [start, stop), split at chunk size and at weight-decay range edges."""
    edges = {start, stop}
    for a, b in decay_ranges:
        edges.update(e for e in (a, b) if start < e < stop)
    edges = sorted(edges)
    segs = []
    for a, b in zip(edges[:-1], edges[1:]):
        decayed = any(ra <= a and b <= rb for ra, rb in decay_ranges)
        for c in range(a, b, chunk):
            segs.append((c, min(c + chunk, b), decayed))
    return segs


class LossScaler:
    """fp16's dynamic loss scaling, as Megatron-LM's DynamicGradScaler: backward runs on loss x scale, so small
    gradients stay above fp16's underflow; a step whose gradients overflowed (an inf or nan anywhere in the grid) is
    skipped on every rank; from the `hysteresis`-th overflow since the scale last grew (in a row or not: a clean step
    does not restore it), each overflow halves the scale (never below min_scale); `window` clean steps in a row (an
    overflow restarts the count) double it and restore the hysteresis. Defaults: PyTorch's and Megatron's (2^16, x2
    after 1000 clean steps, x0.5, hysteresis 2, floor 1)."""

    def __init__(
        self,
        init: float = 2.0**16,
        window: int = 1000,
        hysteresis: int = 2,
        growth: float = 2.0,
        backoff: float = 0.5,
        min_scale: float = 1.0,
    ):
        self.scale, self.window, self.hysteresis = float(init), window, hysteresis
        self.growth, self.backoff, self.min_scale = growth, backoff, min_scale
        self.growth_tracker, self.hysteresis_tracker = 0, hysteresis

    def update(self, overflow: bool) -> None:
        if overflow:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff, self.min_scale)
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.window:
            self.growth_tracker, self.hysteresis_tracker = 0, self.hysteresis
            self.scale *= self.growth

    def state(self) -> dict:
        return {
            "scale": self.scale,
            "growth_tracker": self.growth_tracker,
            "hysteresis_tracker": self.hysteresis_tracker,
        }

    def load(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker, self.hysteresis_tracker = (
            int(state["growth_tracker"]),
            int(state["hysteresis_tracker"]),
        )


class AdamW:
    """Decoupled weight decay (PyTorch's AdamW): p *= 1 - lr*wd on 2-D weights, then the Adam step.

    `params` and `grads` are the flat buffers; `owned` the [start, stop) ranges of them this rank updates (all of it,
    or its ZeRO-1 shard); the moments m and v hold just those ranges, back to back. `decay_ranges` are offsets into
    the flat buffers.
    """

    def __init__(
        self, params, grads, decay_ranges, t: TrainConfig, owned=None, chunk: int | None = None
    ):
        xp = array_module(params)
        # chunks are NumPy's (cache-sized); on a device one fused kernel takes the whole shard (adamw.cu)
        self.fused = device.on_device(xp)
        chunk = chunk or (max(params.size, 1) if self.fused else CHUNK)
        self.p, self.g = params, grads
        self.owned = list(owned) if owned is not None else [(0, params.size)]
        self.size = sum(b - a for a, b in self.owned)
        self.m = xp.zeros(self.size, dtype=params.dtype)
        self.v = xp.zeros(self.size, dtype=params.dtype)
        self.t = 0  # steps taken (Adam's bias-correction counter)
        self.cfg = t
        self.segments = []  # (flat start, flat stop, moment offset, decayed)
        base = 0
        for a, b in self.owned:
            self.segments += [
                (sa, sb, base + sa - a, dec) for sa, sb, dec in _segments(a, b, decay_ranges, chunk)
            ]
            base += b - a
        self.table = device.SegmentTable(xp, self.segments) if self.fused else None
        self._segment_table = np.asarray(self.segments, dtype=np.int64).reshape(-1, 4)
        n = 1 if self.fused else max(1, min(chunk, params.size))
        self.threads = optimizer_threads() if xp.__name__ == "numpy" else 1
        self._temps = [
            (xp.empty(n, dtype=params.dtype), xp.empty(n, dtype=params.dtype))
            for _ in range(self.threads)
        ]
        self._tmp, self._tmp2 = self._temps[0]
        self._pool = _thread_pool(self.threads) if self.threads > 1 else None

    def moments_flat(self, slot: str, out):
        """m or v laid out like the flat parameter buffer, in `out` (zeros outside the owned ranges)."""
        out[...] = 0
        base = 0
        for a, b in self.owned:
            out[a:b] = getattr(self, slot)[base : base + b - a]
            base += b - a
        return out

    def load_moments_flat(self, slot: str, flat) -> None:
        base = 0
        for a, b in self.owned:
            getattr(self, slot)[base : base + b - a] = flat[a:b]
            base += b - a

    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        """One update with gradients multiplied by grad_scale (the clipping factor, folded into the coefficients).
        The chunks are independent: on NumPy they are shared among `self.threads` threads (its ufuncs release the
        GIL), each with its own temporaries, so the result does not depend on the thread count."""
        c = self.cfg
        self.t += 1
        b1, b2 = c.beta1, c.beta2
        sqrt_bc2 = math.sqrt(1.0 - b2**self.t)
        coef = {
            "keep": 1.0 - lr * c.weight_decay,
            "g1": (1.0 - b1) * grad_scale,  # m = b1 m + (1 - b1) s g
            "g2": (1.0 - b2) * grad_scale * grad_scale,  # v = b2 v + (1 - b2) s^2 g^2
            # p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) = lr sqrt(bc2)/bc1 * m / (sqrt(v) + eps sqrt(bc2))
            "eps": c.eps * sqrt_bc2,
            "step": lr * sqrt_bc2 / (1.0 - b1**self.t),
        }
        if self.fused:
            device.adamw_(
                array_module(self.p), self.p, self.g, self.m, self.v, self.table, coef, b1, b2
            )
            return
        if self.threads == 1 or runs_compiled(self.p):
            # compiled: one call, its parallel loop over the segments
            self._update(self._segment_table, coef, self._tmp, self._tmp2)
            return
        parts = [self.segments[i :: self.threads] for i in range(self.threads)]
        list(
            self._pool.map(
                lambda i: self._update(parts[i], coef, *self._temps[i]), range(self.threads)
            )
        )

    def _update(self, segments, coef, tmp_buf, tmp2_buf) -> None:
        adamw_update(
            self.p,
            self.g,
            self.m,
            self.v,
            segments,
            coef,
            self.cfg.beta1,
            self.cfg.beta2,
            tmp_buf,
            tmp2_buf,
        )
