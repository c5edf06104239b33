"""When each op of a pipeline schedule (parallel/schedule.py) runs: `simulate` times the ranks' op lists with op
costs and a transfer time, without MPI, for the bubble, the planner and the send depth.

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
from typing import NamedTuple

from hpc_llm.parallel.schedule import (
    V_SHAPED,
    Op,
    Phase,
    check_shape,
    schedule,
    splits,
    stage_chunk,
    stage_rank,
    virtual_stage,
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
    check_shape(p, 0, m, v)
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
    check_shape(p, 0, m, v)
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
