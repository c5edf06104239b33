"""Pipeline schedules as plain data: for each pipeline rank, the list of operations it runs in one training step.

A schedule is computed, not executed, here: `schedule(name, p, stage, m, v)` returns a list of `Op`s (forward, backward
or weight gradient, micro-batch, model chunk) that the trainer's single loop walks in order, receiving and sending
activations and gradients as each op needs. Keeping the order as data lets tests read it and `simulate` time it without
MPI.

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

Timed by `simulate` with no communication time, each rank computes m (t_f + t_b) and idles only while the pipeline
fills (p - 1 stage forwards) and drains (p - 1 stage backwards); tests/parallel/test_schedule.py checks these exactly
for t_b = 2 t_f (t_f + t_b = 3 t_f) and for other ratios, since they hold for any t_f, t_b:
  gpipe, 1f1b:  makespan (m + p - 1) (t_f + t_b),       bubble fraction (p - 1) / (m + p - 1)
  interleaved:  makespan (m + (p - 1) / v) (t_f + t_b), bubble fraction (p - 1) / (v m + p - 1)
since an interleaved stage is one chunk, costing t_f / v forward and t_b / v backward (a rank's layers split evenly
over its v chunks). A transfer time t_comm adds 2 (p - 1) t_comm to GPipe, more to the 1F1B schedules, whose steady
state waits for a round trip to the downstream stages.

The send depth: PipelineComm keeps at most D sends per direction in flight, waiting for the oldest (after posting the
next op's receive) when a new one would make D + 1. `simulate_lists(..., depth=D)` times that with rendezvous sends,
and `send_depth(name, p, m, v)` is the least D that neither deadlocks nor lengthens the step: 1 for every schedule
with p <= 8, v <= 4 but zbv, up to p - 1 for zbv, whose forward (and backward) sends go to both neighbours and count
in one window (tests/parallel/test_schedule.py; docs/performance.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
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


def _check(p: int, stage: int, m: int, v: int = 1) -> None:
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
    _check(p, stage, m)
    return [Op(Phase.FORWARD, i) for i in range(m)] + [Op(Phase.BACKWARD, i) for i in range(m)]


def one_f_one_b(p: int, stage: int, m: int) -> list[Op]:
    """Megatron's 1F1B. Stage s + 1 takes p - s - 1 forwards from stage s before its first backward; stage s sends
    warm-up + 1 before it waits for one. p - s - 1 keeps a spare micro-batch in flight that hides the gradient's round
    trip; one fewer still runs, with bubbles; two fewer deadlock (tests/parallel/test_schedule.py)."""
    _check(p, stage, m)
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
    _check(p, stage, m)
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
    _check(p, stage, m, v)
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


class Event(NamedTuple):
    rank: int
    op: Op
    start: float
    end: float


@dataclass
class Timing:
    busy: list[float]  # per rank: time spent computing
    idle: list[float]  # per rank: makespan - busy
    makespan: float  # when the last op of the step ends
    events: list[Event]  # every op, with its start and end, in each rank's order

    @property
    def bubble(self) -> float:
        """The fraction of all ranks' time spent idle."""
        return sum(self.idle) / (len(self.idle) * self.makespan) if self.makespan else 0.0

    def rank_end(self, r: int) -> float:
        """When rank r's last op ends."""
        return max((e.end for e in self.events if e.rank == r), default=0.0)


def _inputs(kind: Phase, micro: int, s: int, last: int) -> list[tuple[Phase, int, int]]:
    """The ops (kind, micro, virtual stage) whose outputs op (kind, micro) of virtual stage s needs; `last` is the
    last virtual stage (where the loss is)."""
    if kind == Phase.FORWARD:
        return [(Phase.FORWARD, micro, s - 1)] if s > 0 else []
    if kind == Phase.WEIGHT:
        return [(Phase.BACKWARD, micro, s)]
    return [(Phase.FORWARD, micro, s)] + ([(Phase.BACKWARD, micro, s + 1)] if s < last else [])


def _message(kind: Phase, micro: int, s: int, p: int, last: int, v_shape: bool = False):
    """The message op (kind, micro) of virtual stage s sends: (direction, (rank, op) that consumes it), or None (the
    first forward's stage takes tokens, the last backward's sends nothing back; the loss stays on the last stage; a W
    op sends nothing)."""
    if kind == Phase.WEIGHT or s == (last if kind == Phase.FORWARD else 0):
        return None
    direction, to = (0, s + 1) if kind == Phase.FORWARD else (1, s - 1)
    return direction, (stage_rank(p, to, v_shape), Op(kind, micro, stage_chunk(p, to, v_shape)))


def _depth_waits(
    lists: list[list[Op]], p: int, last: int, depth: int, v_shape: bool = False
) -> list[list]:
    """waits[r][k]: the sends rank r must have completed before it starts its op k, each as (the producing op's
    key, consumer rank, consumer op index), under a send depth `depth`: after each op that sends in a direction
    (0 forward, 1 backward), every send of that direction but the `depth` newest must be complete."""
    index = [{op: k for k, op in enumerate(ops)} for ops in lists]
    waits: list[list] = [[[] for _ in ops] for ops in lists]
    for r, ops in enumerate(lists):
        sent: list[list] = [[], []]  # per direction, in send order
        for k, (kind, i, c) in enumerate(ops):
            s = virtual_stage(p, r, c, v_shape)
            msg = _message(kind, i, s, p, last, v_shape)
            if msg is None:
                continue
            direction, (dest, consumer) = msg
            if (
                dest == r
            ):  # one rank (p = 1), or the V's turn: the chunks hand over in memory, no message
                continue
            sent[direction].append(((kind, i, s), dest, index[dest][consumer]))
            if len(sent[direction]) > depth and k + 1 < len(ops):
                waits[r][k + 1].append(sent[direction][-depth - 1])
    return waits


def simulate_lists(
    lists: list[list[Op]],
    v: int = 1,
    t_f: float = 1.0,
    t_b: float = 2.0,
    t_comm: float = 0.0,
    cost=None,
    depth: int | None = None,
    t_w: float = 0.0,
    v_shape: bool = False,
) -> Timing:
    """Run rank r's list `lists[r]` strictly in order, one op at a time, each as early as its inputs allow.

    An op of chunk c on rank r is global virtual stage s = c p + r of S = v p (v_shape: virtual_stage's V); it
    costs t_f / v, t_b / v (B: the input gradient) or t_w / v (W: the weight gradients; a backward not split in B
    and W costs (t_b + t_w) / v), or
    cost(r, op, later) when given (later: not its chunk's first op of that kind in the step; a backward or W that
    writes gradients then accumulates). F(i, s) needs F(i, s - 1); B(i, s) needs F(i, s) and, unless s = S - 1
    (where the loss is), B(i, s + 1); W(i, s) needs B(i, s); an input from another rank arrives t_comm after it is
    produced.

    depth=None: sends never block (buffered). depth=D models PipelineComm's send depth with rendezvous sends (the
    worst case: a send completes only once the receiver has posted its receive): the receive for a rank's op k is
    posted when its op k - 1 ends (pipeline.run_schedule posts it right after that op's own send), for its first op at
    the step's start; a send completes when it is posted and that receive is, and no sooner than its data arrives;
    and a rank may not start its next op while more than D of its sends in one direction are incomplete: after each
    op that sends, every send of that direction but the D newest must be complete first (the window rule; the
    implementation, which waits for the oldest only while more than D are incomplete, waits for a subset of these,
    so a depth found free of deadlock here is free of it there, at any op costs: each wait here is a fixed "op X ends
    before op Y starts", and a cycle of those does not depend on time).

    The only way to stall for ever is a cycle of waits: then no rank can move, and this raises RuntimeError naming
    each rank's stuck op. Start times depend only on finished ops, so sweeping the ranks until none can move gives
    the exact times.
    """
    p = len(lists)
    last = v * p - 1
    if cost is None:
        whole = {r: t_b + (0.0 if splits(ops) else t_w) for r, ops in enumerate(lists)}

        def cost(r, op, later):
            return {Phase.FORWARD: t_f, Phase.BACKWARD: whole[r], Phase.WEIGHT: t_w}[op.kind] / v

    waits = _depth_waits(lists, p, last, depth, v_shape) if depth is not None else None
    done: dict[tuple[Phase, int, int], float] = {}  # (kind, micro, virtual stage) -> finish time
    ends: list[list[float]] = [[] for _ in range(p)]  # per rank, each finished op's end
    pos, clock, busy = [0] * p, [0.0] * p, [0.0] * p
    started: list[set] = [set() for _ in range(p)]  # (kind, chunk)s that have had an op
    events = []
    moved = True
    while moved:
        moved = False
        for r, ops in enumerate(lists):
            while pos[r] < len(ops):
                kind, i, c = ops[pos[r]]
                s = virtual_stage(p, r, c, v_shape)
                needs = _inputs(kind, i, s, last)
                if any(key not in done for key in needs):
                    break
                times = [clock[r]] + [
                    done[key] + (t_comm if stage_rank(p, key[2], v_shape) != r else 0.0)
                    for key in needs
                ]
                if waits is not None:
                    # a send completes when its receive is posted (the consumer's previous op ended), and its data
                    # has arrived
                    if any(j > len(ends[dest]) for _, dest, j in waits[r][pos[r]]):
                        break
                    times += [
                        max(done[key] + t_comm, ends[dest][j - 1] if j else 0.0)
                        for key, dest, j in waits[r][pos[r]]
                    ]
                start = max(times)
                op = ops[pos[r]]
                dt = cost(r, op, kind != Phase.FORWARD and (kind, c) in started[r])
                started[r].add((kind, c))
                clock[r] = done[(kind, i, s)] = start + dt
                ends[r].append(start + dt)
                busy[r] += dt
                events.append(Event(r, op, start, start + dt))
                pos[r] += 1
                moved = True
    stuck = [f"stage {r} at {ops[pos[r]]}" for r, ops in enumerate(lists) if pos[r] < len(ops)]
    if stuck:
        raise RuntimeError(
            "pipeline schedule deadlocks: no rank can make progress (" + "; ".join(stuck) + ")"
        )
    makespan = max(clock, default=0.0)
    return Timing(busy, [makespan - b for b in busy], makespan, events)


def simulate(
    name: str,
    p: int,
    m: int,
    v: int = 1,
    t_f: float = 1.0,
    t_b: float = 2.0,
    t_comm: float = 0.0,
    t_w: float = 0.0,
) -> Timing:
    """Time one step of schedule `name` on p ranks (see `simulate_lists`; t_b + t_w is a whole backward)."""
    _check(p, 0, m, v)
    for arg, value in (("t_f", t_f), ("t_b", t_b), ("t_comm", t_comm), ("t_w", t_w)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{arg}: expected a number >= 0, got {value!r}")
    lists = [schedule(name, p, s, m, v) for s in range(p)]
    return simulate_lists(lists, v, t_f, t_b, t_comm, t_w=t_w, v_shape=name in V_SHAPED)


@functools.lru_cache(maxsize=256)
def send_depth(name: str, p: int, m: int, v: int = 1) -> int:
    """The send depth D (>= 1) PipelineComm should keep for schedule `name`: the smallest D with which `simulate_lists`
    (rendezvous sends, t_f = 1, t_b = t_w = 1: a whole backward 2) neither deadlocks nor ends the step later than
    with unbounded sends. A larger D only drops waits, so the search goes up from 1; the number of sends a rank
    makes in one direction always qualifies (it never waits). Never deadlocking at this D holds at any op costs
    (simulate_lists); the same makespan is for these costs."""
    _check(p, 0, m, v)
    lists = [schedule(name, p, s, m, v) for s in range(p)]
    vee = name in V_SHAPED
    free = simulate_lists(lists, v, t_b=1.0, t_w=1.0, v_shape=vee).makespan
    last = v * p - 1

    def sends(r: int, d: int) -> int:
        msgs = (_message(k, i, virtual_stage(p, r, c, vee), p, last, vee) for k, i, c in lists[r])
        return sum(1 for msg in msgs if msg and msg[0] == d and msg[1][0] != r)

    most = max((sends(r, d) for r in range(p) for d in (0, 1)), default=0)
    for depth in range(1, most):
        try:
            t = simulate_lists(lists, v, t_b=1.0, t_w=1.0, depth=depth, v_shape=vee)
        except RuntimeError:
            continue
        if t.makespan <= free * (1 + 1e-12):
            return depth
    return max(most, 1)
