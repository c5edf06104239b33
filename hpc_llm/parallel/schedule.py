"""Pipeline schedules as plain data: for each pipeline rank, the list of operations it runs in one training step.

A schedule is computed, not executed, here: `schedule(name, p, stage, m, v)` returns a list of `Op`s (forward, backward
or weight gradient, micro-batch, model chunk) that the trainer's single loop walks in order, receiving and sending
activations and gradients as each op needs. Keeping the order as data lets tests read it and `simulate`
(parallel/schedule_timing.py) time it without MPI.

- "gpipe": all m forwards, then all m backwards; m micro-batches' activations are alive at once.
- "1f1b" (Megatron-LM's non-interleaved schedule): stage s runs min(p - s - 1, m) warm-up forwards, then alternates
  one forward and one backward, then drains the remaining backwards; at most min(p - s, m) micro-batches are alive,
  for the same bubble as GPipe.
- "zb-h1" (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024, handcrafted schedule 1): each backward in two
  ops, B (the input gradient, sent back) and W (the weight gradients, which nothing waits for). The F and B ops are
  1F1B's, in 1F1B's order; stage s defers the W of its first s backwards and then runs one W after each B, the s
  deferred ones at the end, where 1F1B's stage s would idle. Each stage idles (p - 1)(t_f + t_b - t_w) for
  t_w <= t_f, t_b (in general (p - 1)(t_f + t_b - min(t_f, t_b, t_w)), m >= p) instead of 1F1B's
  (p - 1)(t_f + t_b + t_w) (t_b, t_w: B's and W's costs), at 1F1B's peak of p micro-batches in flight (an
  activation lives from F to W), now on every stage: p - 1 of them as what W needs only (smaller than the cache,
  except the head's, which holds the logits' gradient).
- "interleaved" (Megatron-LM's interleaved 1F1B): each rank holds v model chunks; chunk c of rank s is global
  virtual stage c * p + s, so a micro-batch visits every rank v times. Micro-batches go through a chunk in groups of p
  (hence m % p == 0), and the pipeline fills v times faster: the bubble shrinks by v, for v times the messages.

Backwards (and W ops) run in increasing micro-batch order in every schedule (per chunk, for "interleaved"), so each
parameter's gradient sums its micro-batches in the same order whatever the schedule, and the sum is the same to the bit.

When each op runs (the pipeline's bubble, the send depth) is parallel/schedule_timing.py's.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

NAMES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zbv")
SPLIT = ("zb-h1", "zbv")  # the schedules whose backwards are B and W ops
V_SHAPED = ("zbv",)  # two chunks per rank in a V: rank r holds virtual stages r and 2p - 1 - r


class Phase(StrEnum):
    """An op's kind; prints as its letter ("F0 B0" in `describe`, Op(kind='F', ...) in messages). BACKWARD is the
    whole backward, or only its input gradient where the list also has the micro-batch's WEIGHT op."""

    FORWARD = "F"
    BACKWARD = "B"
    WEIGHT = "W"

    def __repr__(self) -> str:
        return repr(self.value)

    # hashed as the letter, like the str it equals: Op("F", 0) and Op(Phase.FORWARD, 0) are one key
    __hash__ = str.__hash__


class Op(NamedTuple):
    kind: Phase
    micro: int  # micro-batch, 0-based
    chunk: int = 0  # model chunk on this rank (global virtual stage chunk * p + stage); 0 without interleaving


def virtual_stage(p: int, rank: int, chunk: int, v_shape: bool = False) -> int:
    """The global virtual stage of chunk `chunk` of pipeline rank `rank`: chunk * p + rank (looped, Megatron's
    interleaving), or in a V (v_shape: two chunks) rank, then 2p - 1 - rank: the V turns on rank p - 1, which holds
    virtual stages p - 1 and p, so that hand-over needs no message, and rank 0 holds both ends of the model."""
    if v_shape:
        return rank if chunk == 0 else 2 * p - 1 - rank
    return chunk * p + rank


def stage_rank(p: int, s: int, v_shape: bool = False) -> int:
    """The pipeline rank holding virtual stage s (virtual_stage's inverse)."""
    if v_shape:
        return s if s < p else 2 * p - 1 - s
    return s % p


def stage_chunk(p: int, s: int, v_shape: bool = False) -> int:
    """Which of its rank's chunks virtual stage s is."""
    return int(s >= p) if v_shape else s // p


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


def check_shape(p: int, stage: int, m: int, v: int = 1) -> None:
    _check_int("p (pipeline ranks)", p, 1)
    _check_int("m (micro-batches)", m, 1)
    _check_int("v (model chunks per rank)", v, 1)
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage < p:
        raise ValueError(f"stage: expected an integer in [0, p={p}), got {stage!r}")


def _warmup_then_1f1b(fwd: list[Op], bwd: list[Op], warmup: int) -> list[Op]:
    """`warmup` forwards, then (forward, backward) pairs while forwards remain, then the remaining backwards."""
    ops = fwd[:warmup]
    for f, b in zip(fwd[warmup:], bwd):
        ops += [f, b]
    return ops + bwd[len(fwd) - warmup :]


def gpipe(p: int, stage: int, m: int) -> list[Op]:
    """All forwards, then all backwards in micro-batch order (same makespan as reverse order; see the module doc)."""
    check_shape(p, stage, m)
    return [Op(Phase.FORWARD, i) for i in range(m)] + [Op(Phase.BACKWARD, i) for i in range(m)]


def one_f_one_b(p: int, stage: int, m: int) -> list[Op]:
    """Megatron's 1F1B. Stage s + 1 takes p - s - 1 forwards from stage s before its first backward; stage s sends
    warm-up + 1 before it waits for one. p - s - 1 keeps a spare micro-batch in flight that hides the gradient's round
    trip; one fewer still runs, with bubbles; two fewer deadlock (tests/parallel/test_schedule.py)."""
    check_shape(p, stage, m)
    fwd, bwd = [Op(Phase.FORWARD, i) for i in range(m)], [Op(Phase.BACKWARD, i) for i in range(m)]
    return _warmup_then_1f1b(fwd, bwd, min(p - stage - 1, m))


def zb_h1(p: int, stage: int, m: int) -> list[Op]:
    """ZB-H1: 1F1B's F and B ops in 1F1B's order; the W of the first min(stage, ...) backwards deferred, then a W
    (the oldest waiting) after each later B, and the deferred ones last."""
    ops, deferred, w = [], min(stage, m), 0
    for op in one_f_one_b(p, stage, m):
        ops.append(op)
        if op.kind == Phase.BACKWARD and op.micro >= deferred:
            ops.append(Op(Phase.WEIGHT, w))
            w += 1
    return ops + [Op(Phase.WEIGHT, i) for i in range(w, m)]


def zbv(p: int, stage: int, m: int) -> list[Op]:
    """ZB-V (Qi et al., section 6): chunk 0 is virtual stage `stage`, chunk 1 virtual stage 2p - 1 - stage. The
    pattern is made for n = max(m, 2p - 1) micro-batches and the ops of micro-batches >= m dropped:
      warm-up    2(p - s) - 1 F of chunk 0; s pairs (F chunk 1, F chunk 0); p - s triples (F, B, W) of chunk 1
                 (the V's far end: its backward comes back at once);
      steady     while forwards remain: [F chunk 0,] B W of chunk 0, F B W of chunk 1;
      cool-down  s pairs (B chunk 0, B chunk 1), their W's deferred; p - s pairs (B chunk 0, the oldest W of
                 chunk 0); then the W's left, chunk 1's, then chunk 0's.
    Each chunk's B's and W's go in micro-batch order. At most 2p (micro-batch, chunk)s in flight on rank 0 (fewer
    further down the V): p micro-batches of a whole stage's activations, 1F1B's peak."""
    check_shape(p, stage, m)
    n = max(m, 2 * p - 1)
    count = {(kind, c): 0 for kind in Phase for c in (0, 1)}
    ops: list[Op] = []

    def add(kind: Phase, chunk: int) -> None:
        ops.append(Op(kind, count[kind, chunk], chunk))
        count[kind, chunk] += 1

    F, B, W = Phase.FORWARD, Phase.BACKWARD, Phase.WEIGHT
    for _ in range(2 * (p - stage) - 1):
        add(F, 0)
    for _ in range(stage):
        add(F, 1)
        add(F, 0)
    for _ in range(p - stage):
        for kind in (F, B, W):
            add(kind, 1)
    while count[F, 1] < count[F, 0] or count[F, 0] < n:
        if count[F, 0] < n:
            add(F, 0)
        for kind, chunk in ((B, 0), (W, 0), (F, 1), (B, 1), (W, 1)):
            add(kind, chunk)
    for _ in range(stage):
        add(B, 0)
        add(B, 1)
    for _ in range(p - stage):
        add(B, 0)
        add(W, 0)
    for chunk in (1, 0):
        while count[W, chunk] < n:
            add(W, chunk)
    assert all(count[k, c] == n for k in Phase for c in (0, 1)), count
    return [op for op in ops if op.micro < m]


def interleaved(p: int, stage: int, m: int, v: int) -> list[Op]:
    """Megatron's interleaved 1F1B. The k-th forward of a rank is micro-batch (k // pv) p + k % p of chunk
    (k % pv) // p: p micro-batches through chunk 0, the same p through chunk 1, ..., then the next p; the k-th
    backward takes the same micro-batch through chunk v - 1 - (k % pv) // p. The warm-up, 2 (p - s - 1) + (v - 1) p
    forwards, lets the first backward of the last chunk reach stage s while it keeps computing."""
    check_shape(p, stage, m, v)
    if m % p:
        raise ValueError(
            f"m (micro-batches): the interleaved schedule needs a multiple of p={p}, got {m} "
            "(micro-batches go through each model chunk in groups of p)"
        )

    def op(kind: Phase, k: int) -> Op:
        group, k = divmod(k, p * v)
        chunk = k // p
        return Op(kind, group * p + k % p, chunk if kind == Phase.FORWARD else v - 1 - chunk)

    total = m * v
    warmup = min((p - stage - 1) * 2 + (v - 1) * p, total)
    return _warmup_then_1f1b(
        [op(Phase.FORWARD, k) for k in range(total)],
        [op(Phase.BACKWARD, k) for k in range(total)],
        warmup,
    )


def schedule(name: str, p: int, stage: int, m: int, v: int = 1) -> list[Op]:
    """The op list of pipeline rank `stage` for schedule `name` (one of NAMES)."""
    if name not in NAMES:
        raise ValueError(f"name: expected one of {', '.join(NAMES)}, got {name!r}")
    if name == "interleaved":
        return interleaved(p, stage, m, v)
    if name in V_SHAPED:
        if v != 2:
            raise ValueError(
                f"v (model chunks per rank): {name!r} has two chunks per rank, got {v!r}"
            )
        return zbv(p, stage, m)
    if v != 1:
        raise ValueError(
            f"v (model chunks per rank): {name!r} has one chunk per rank, got {v!r} "
            "(use 'interleaved')"
        )
    return {"gpipe": gpipe, "1f1b": one_f_one_b, "zb-h1": zb_h1}[name](p, stage, m)


def splits(ops: list[Op]) -> bool:
    """Whether the list's backwards are split in B and W ops."""
    return any(op.kind == Phase.WEIGHT for op in ops)


def in_flight(ops: list[Op]) -> int:
    """The most (micro-batch, chunk)s forwarded but not yet through their last backward op (W where the list has
    W ops) at once: how many micro-batches' activations are stored."""
    last = Phase.WEIGHT if splits(ops) else Phase.BACKWARD
    alive: set[tuple[int, int]] = set()
    most = 0
    for op in ops:
        if op.kind == Phase.FORWARD:
            alive.add((op.micro, op.chunk))
            most = max(most, len(alive))
        elif op.kind == last:
            alive.discard((op.micro, op.chunk))
    return most


def describe(name: str, p: int, m: int, v: int = 1) -> str:
    """One line per rank, e.g. 'stage 0: F0 F1 B0 F2 B1 ...'; with chunks, F<micro>.<chunk>."""

    def text(op: Op) -> str:
        return f"{op.kind}{op.micro}" + (f".{op.chunk}" if v > 1 else "")

    return "\n".join(
        f"stage {s}: " + " ".join(map(text, schedule(name, p, s, m, v))) for s in range(p)
    )
