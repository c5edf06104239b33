"""Knowledge distillation's loss over vocabulary shards (Hinton et al. 2015), beside the vocabulary-parallel
cross-entropy (tensor_parallel.py) and built the same way: each rank holds columns [v0, v0 + Vl) of the student's and
the teacher's logits, and the softmaxes are joined by one max allreduce and one sum allreduce of a few numbers per row,
never by gathering the logits.

    loss = alpha T^2 KL(softmax(u / T) || softmax(z / T)) + (1 - alpha) CE(z, target)      (mean over the rows)
    dloss/dz = alpha T (q_T - p_T) + (1 - alpha) (q - onehot)                             (per row, before the mean)

z the student's logits, u the teacher's, q = softmax(z), q_T = softmax(z / T), p_T = softmax(u / T). The KL of a row
needs no second pass: with a = (u - max u) / T and b = (z - max z) / T,
KL = (sum_v e^a (a - b)) / sum_v e^a - log sum_v e^a + log sum_v e^b, and every sum is a local partial sum.
"""

from __future__ import annotations

from typing import NamedTuple

from hpc_llm.backend import array_module
from hpc_llm.parallel.comm import Comm


class Distill(NamedTuple):
    """A micro-batch's targets with a teacher: what the head's loss takes in place of the token ids."""

    ids: object  # (B, T) target token ids
    # (B * T, Vl): this rank's vocabulary slice of the teacher's logits (overwritten by the loss), or a function
    # giving it (computed only where a head takes the loss: the trainer's teacher, train/teacher.py)
    teacher: object
    alpha: float  # the distillation term's weight
    temperature: float


class DistillCache(NamedTuple):
    """What the backward needs: the three probability slices (N, Vl) and the targets on this rank's columns."""

    q: object
    q_t: object
    p_t: object
    local: object
    mine: object
    alpha: float
    temperature: float


def vocab_parallel_distill_forward(logits, d: Distill, vocab_size: int, v0: int, comm: Comm):
    """The mean distillation loss over the rows of this rank's logits slice (N, Vl) (columns >= vocab_size are
    padding, masked out of both softmaxes); -> (loss, DistillCache). In place: logits and d.teacher are overwritten.
    The cross-entropy's part is vocab_parallel_cross_entropy_forward's arithmetic, so alpha = 0 gives its bits."""
    xp = array_module(logits)
    N, Vl = logits.shape
    real = max(0, min(Vl, vocab_size - v0))  # this slice's columns of the real vocabulary
    u, temp = (d.teacher() if callable(d.teacher) else d.teacher), d.temperature
    logits[:, real:] = -xp.inf
    u[:, real:] = -xp.inf
    maxes = xp.stack([logits.max(axis=1), u.max(axis=1)])
    comm.allreduce_(maxes, op="max")
    logits -= maxes[0][:, None]
    u -= maxes[1][:, None]
    u /= temp  # a
    b = logits / temp
    local = d.ids.reshape(-1) - v0
    mine = (local >= 0) & (local < Vl)
    rows = xp.arange(N)
    sums = xp.empty((5, N), dtype=logits.dtype)
    # not `* mine`: -inf * 0 is nan
    sums[0] = xp.where(mine, logits[rows, xp.where(mine, local, 0)], 0.0)
    weighted = u[:, :real] - b[:, :real]  # the padding's -inf - -inf would be nan
    xp.exp(u, out=u)
    weighted *= u[:, :real]
    sums[1] = weighted.sum(axis=1)
    del weighted
    xp.exp(logits, out=logits)
    xp.exp(b, out=b)
    sums[2], sums[3], sums[4] = logits.sum(axis=1), b.sum(axis=1), u.sum(axis=1)
    comm.allreduce_(sums)
    target_logit, w, s, s_t, s_u = sums
    ce = float((xp.log(s) - target_logit).astype(xp.float64).mean())
    kl = float((w / s_u - xp.log(s_u) + xp.log(s_t)).astype(xp.float64).mean())
    loss = (1.0 - d.alpha) * ce + d.alpha * temp * temp * kl
    logits *= xp.reciprocal(s)[:, None]
    b *= xp.reciprocal(s_t)[:, None]
    u *= xp.reciprocal(s_u)[:, None]
    return loss, DistillCache(logits, b, u, local, mine, d.alpha, temp)


def vocab_parallel_distill_backward(cache: DistillCache, scale: float = 1.0):
    """d(scale * mean loss)/d logits on this rank's columns, written over the cache's q."""
    xp = array_module(cache.q)
    g, N = cache.q, cache.q.shape[0]
    rows = xp.arange(N)[cache.mine]
    g[rows, cache.local[cache.mine]] -= 1.0
    g *= (1.0 - cache.alpha) * scale / N
    soft = cache.q_t
    soft -= cache.p_t
    soft *= cache.alpha * cache.temperature * scale / N
    g += soft
    return g
