"""The pipeline step timed with per-op costs: schedule.simulate_lists's rules, with each (kind, virtual stage,
first-or-later backward) priced separately, and every op's start and end kept for the timeline.

schedule.simulate prices every forward t_f / v and every backward t_b / v; a real stage differs from its neighbours
(the first holds the embedding, the last the head, which for GPT-2's 50k vocabulary costs several blocks) and a
chunk's first backward of a step overwrites its gradients while later ones add to them. The dependency rules are
schedule.py's exactly: F(i, s) needs F(i, s - 1); B(i, s) needs F(i, s) and B(i, s + 1) below the last virtual
stage; an input from another rank arrives t_comm after it is produced; each rank runs its list in order.
tests/test_plan.py checks that with uniform costs this equals schedule.simulate.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpc_llm.parallel.schedule import Op, schedule


@dataclass
class Event:
    rank: int
    op: Op
    start: float
    end: float


@dataclass
class PipelineTiming:
    events: list  # Event per op, in each rank's order
    makespan: float
    busy: list  # per rank

    @property
    def bubble(self) -> float:
        """The fraction of all ranks' time spent waiting (fill, drain, transfers)."""
        p = len(self.busy)
        return 1.0 - sum(self.busy) / (p * self.makespan) if self.makespan else 0.0

    def rank_end(self, r: int) -> float:
        return max((e.end for e in self.events if e.rank == r), default=0.0)


def simulate_costs(name: str, p: int, m: int, v: int, cost, t_comm: float = 0.0) -> PipelineTiming:
    """cost(kind, vstage, later) -> seconds, with kind "F" | "B" and later: a backward that is not its chunk's
    first of the step (it accumulates)."""
    lists = [schedule(name, p, r, m, v) for r in range(p)]
    last = v * p - 1
    done: dict = {}
    pos, clock, busy = [0] * p, [0.0] * p, [0.0] * p
    started: list[set] = [set() for _ in range(p)]
    events = []
    moved = True
    while moved:
        moved = False
        for r, ops in enumerate(lists):
            while pos[r] < len(ops):
                op = ops[pos[r]]
                s = op.chunk * p + r
                needs = ([("F", op.micro, s - 1)] if s > 0 else []) if op.kind == "F" else \
                    [("F", op.micro, s)] + ([("B", op.micro, s + 1)] if s < last else [])
                if any(key not in done for key in needs):
                    break
                start = max([clock[r]] + [done[key] + (t_comm if key[2] % p != r else 0.0) for key in needs])
                later = op.kind == "B" and op.chunk in started[r]
                dt = cost(op.kind, s, later)
                if op.kind == "B":
                    started[r].add(op.chunk)
                clock[r] = done[(op.kind, op.micro, s)] = start + dt
                busy[r] += dt
                events.append(Event(r, op, start, start + dt))
                pos[r] += 1
                moved = True
    if any(pos[r] < len(lists[r]) for r in range(p)):
        raise RuntimeError("pipeline schedule deadlocks")
    return PipelineTiming(events, max(clock, default=0.0), busy)
