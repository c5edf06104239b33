"""What ZeRO-2/3 add to a step's time (parallel/zero.py), per pass of a chunk over its parts:

- ZeRO-3's parameter gathers: the first part's gather is waited for whole; each later part's was posted when the part
  before it began (a prefetch of one part), so only what outlasts that part's compute is exposed, plus the share of
  the transfer a link cannot overlap with compute (Link.overlap). With parallel.reshard_after_forward = false the
  backward pass finds its units still gathered.
- ZeRO-2/3's gradient reduce-scatters: each unit's starts when a micro-batch's backward finishes it and runs behind
  the parts still to come; what outlasts the pass, and the share not overlapped, is exposed. The last part's (the
  embedding's, or the first block's) is waited for by the next pass or the step's end: counted in the pass.

Unit sizes are each rank's local (TP-sharded) ones; a unit is gathered or reduced whole over the dp group.
"""

from __future__ import annotations

from hpc_llm.parallel.schedule import Phase, schedule
from hpc_llm.parallel.zero import part_finishes, part_reads, unit_ranges
from hpc_llm.plan.cluster import Link
from hpc_llm.plan.memory import Bytes, Layout
from hpc_llm.plan.peak import chunk_parts


def _collective(kind: str, nbytes: float, n: int, link: Link) -> float:
    """A nonblocking ZeRO-2/3 gather or reduce (Comm.iallgatherv_, ireduce_scatter_) of one unit's nbytes."""
    return link.seconds(kind, nbytes, n)


def _part_cost(costs: dict, part, backward: bool, later: bool) -> float:
    if backward:
        key = {"embedding": "emb_B", "head": "head_B"}.get(part, "block_B")
        return costs[key + ("+" if later and key != "emb_B" else "")].total
    return costs[{"embedding": "emb_F", "head": "head_F"}.get(part, "block_F")].total


def _exposed(comm: list[float], compute: list[float], overlap: float, prefetched: bool) -> float:
    """Seconds a pass waits for its parts' transfers: comm[k] runs behind compute[k - 1] (prefetched gathers) or
    behind the parts after k (reductions: compute[k + 1:])."""
    if prefetched:
        out = comm[0] if comm else 0.0
        for k in range(1, len(comm)):
            out += comm[k] - overlap * min(comm[k], compute[k - 1])
        return out
    out, behind = 0.0, 0.0
    for k in range(len(comm)):  # reduction k overlaps the parts after it
        after = sum(compute[k + 1 :])
        hidden = overlap * min(comm[k], max(0.0, after - behind))
        behind += comm[k] - hidden
        out += comm[k] - hidden
    return out


def zero_pass_seconds(
    specs,
    plan,
    lay: Layout,
    by: Bytes,
    link: Link,
    costs: dict,
    v: int,
    backward: bool,
    later: bool,
) -> float:
    """The exposed seconds ZeRO-2/3 add to one forward or backward of virtual stage v's chunk."""
    if lay.zero < 2 or lay.dp == 1:
        return 0.0
    units = unit_ranges(specs)
    parts = chunk_parts(plan, v)
    if backward:
        parts = parts[::-1]
    compute = [_part_cost(costs, p, backward, later) for p in parts]
    total = 0.0
    gathers = lay.zero >= 3 and (not backward or lay.reshard_after_forward)
    if gathers:
        pbytes = by.master or by.param

        def gather(part) -> float:
            return sum(
                _collective("iallgatherv", (b - a) * pbytes, lay.dp, link)
                for u, (a, b) in units.items()
                if u in part_reads(part, backward)
            )

        total += _exposed([gather(p) for p in parts], compute, link.overlap, True)
    if backward:
        tied_head = 0 not in plan.chunks

        def reduce(part) -> float:
            return sum(
                _collective("ireduce_scatter", (b - a) * by.grad, lay.dp, link)
                for u, (a, b) in units.items()
                if u in part_finishes(part, tied_head)
            )

        total += _exposed([reduce(p) for p in parts], compute, link.overlap, False)
    return total


def dp_bytes_per_step(specs, plan, lay: Layout, by: Bytes) -> int:
    """The bytes one step's data-parallel collectives move on a rank of this stage, counted as the ledger counts
    them (each collective's whole buffer, nccl-tests' S), as the code sends them: ZeRO-0 allreduces the gradient
    buffer, ZeRO-1 reduce-scatters it and all-gathers the parameters; ZeRO-2 reduce-scatters each trained unit once
    per micro-batch and all-gathers them after the step; ZeRO-3 all-gathers a unit each time a part acquires it
    while not gathered (walking the stage's op list with the hooks' own rules: the part's units, the next part's
    prefetched, released after forward unless parallel.reshard_after_forward = false and a backward follows, and
    after backward) and reduce-scatters as ZeRO-2. fp32 gradient communication (the only one ZeRO-2/3 take)."""
    if lay.dp == 1:
        return 0
    n = sum(s.size for s in specs)
    if lay.zero <= 1:
        return n * by.grad * (1 + lay.zero)
    units = unit_ranges(specs)
    size = {u: b - a for u, (a, b) in units.items()}
    total = lay.micro_batches * sum(size.values()) * by.grad
    if lay.zero == 2:
        return total + n * by.param
    pbytes = by.master or by.param
    ops = schedule(lay.schedule, lay.pp, plan.rank, lay.micro_batches, lay.virtual)
    gathered: set = set()
    for op in ops:
        backward = op.kind != Phase.FORWARD
        parts = chunk_parts(plan, plan.chunks[op.chunk])
        parts = parts[::-1] if backward else parts
        for k, part in enumerate(parts):
            nxt = part_reads(parts[k + 1], backward) if k + 1 < len(parts) else ()
            for u in (*part_reads(part, backward), *nxt):
                if u in units and u not in gathered:
                    gathered.add(u)
                    total += size[u] * pbytes
            if backward or lay.reshard_after_forward:
                gathered -= set(part_reads(part, backward))
    return total
