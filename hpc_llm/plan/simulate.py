"""The pipeline step timed with per-op costs: schedule_timing.simulate_lists (its dependency rules, its deadlock check)
with each (kind, virtual stage, first-or-later backward or W) priced separately.

schedule_timing.simulate prices every forward t_f / v and every backward t_b / v; a real stage differs from its
neighbours (the first holds the embedding, the last the head, which for GPT-2's 50k vocabulary costs several blocks)
and a chunk's first backward of a step overwrites its gradients while later ones add to them.
tests/plan/test_plan.py checks that with uniform costs this equals schedule_timing.simulate.
"""

from __future__ import annotations

from hpc_llm.parallel.schedule import V_SHAPED, schedule, virtual_stage
from hpc_llm.parallel.schedule_timing import Timing, simulate_lists


def simulate_costs(name: str, p: int, m: int, v: int, cost, t_comm: float = 0.0) -> Timing:
    """cost(kind, vstage, later) -> seconds, with kind a schedule.Phase (a B where the schedule has W ops too is the
    input gradient alone) and later: a backward or W that is not its chunk's first of the step (it accumulates)."""
    lists = [schedule(name, p, r, m, v) for r in range(p)]
    vee = name in V_SHAPED

    def priced(r, op, later):
        return cost(op.kind, virtual_stage(p, r, op.chunk, vee), later)

    return simulate_lists(lists, v, t_comm=t_comm, cost=priced, v_shape=vee)
