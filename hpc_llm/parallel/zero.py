"""ZeRO-2 and ZeRO-3 (FSDP) on the flat buffers: the model's units, and the hooks that run around each part of a chunk.

A unit is a contiguous range of the flat buffer that one part of the model reads: the token embedding, the position
embedding, each block, the final LayerNorm (`unit_ranges`). With parallel.zero >= 2 the data-parallel buckets are the
units, each split in dp pieces as ZeRO-1 splits a bucket; rank r owns piece r of every unit: its gradients, Adam
moments and (ZeRO-3) master weights.

- ZeRO-2: when a micro-batch's backward has finished a unit's gradients, `after_backward` starts the unit's
  reduce-scatter (GradientSync.reduce_unit); before a part writes a unit's gradients again, its reduction completes
  and the unit's gradient outside this rank's piece is zeroed and given back (GradientSync.settle_unit). A rank thus
  holds its pieces' gradients plus the units in flight, not the whole gradient.
- ZeRO-3: the parameter buffers hold only this rank's pieces between uses (model.kept). Before a part runs, its
  units are all-gathered in place into the compute buffer (`before_forward`/`before_backward`), and the next part's
  gather is posted while it computes (a prefetch of one part, in the pass's order); after it, the unit is released:
  zeroed outside this rank's piece, its pages given back (parallel.reshard_after_forward = false keeps a unit's
  forward gather for the backward that follows, as FSDP's reshard_after_forward=False). A forward with no backward
  to follow (evaluation) always releases.

Which units a part reads and which gradients it writes and finishes: the embedding reads wte and wpe in forward (its
backward reads no weight) and writes their gradients; a block its own unit; the head reads ln_f and wte (tied) and
writes their gradients. The tied wte's gradient is finished by the embedding's backward where this rank holds the
embedding (the head's share came first), else by the head's (the last stage's copy, summed with the first stage's
after the step's backward: both stages split wte alike, so a piece's owner sums the same elements).
"""

from __future__ import annotations

from hpc_llm.parallel.comm import Comm
from hpc_llm.parallel.data_parallel import GradientSync


def unit_name(param: str) -> str:
    """The unit a parameter belongs to: "h.<layer>" for a block's tensors, else the tensor's first name part."""
    parts = param.split(".")
    return ".".join(parts[:2]) if parts[0] == "h" else parts[0]


def unit_ranges(specs) -> dict[str, tuple[int, int]]:
    """{unit: [start, stop) of the flat buffer}: each unit's tensors are consecutive in the layout (layout.py)."""
    out: dict[str, tuple[int, int]] = {}
    for s in specs:
        u = unit_name(s.name)
        a, b = out.get(u, (s.offset, s.offset))
        assert b == s.offset, f"unit {u} is not contiguous at {s.name}"
        out[u] = (a, s.offset + s.size)
    return out


def part_reads(part, backward: bool) -> tuple:
    """The units whose parameters a part reads: in forward, or in backward (the embedding's reads no weight)."""
    if part == "embedding":
        return () if backward else ("wte", "wpe")
    if part == "head":
        return ("ln_f", "wte")
    return (f"h.{part}",)


def part_writes(part) -> tuple:
    """The units whose gradients a part's backward writes."""
    return part_reads(part, False)


def part_finishes(part, tied_head: bool) -> tuple:
    """The units whose gradients are final for the micro-batch once the part's backward ends (tied_head: the head
    finishes wte, on a rank without the embedding)."""
    if part == "head":
        return ("ln_f", "wte") if tied_head else ("ln_f",)
    return part_writes(part)


class ZeroHooks:
    """The hooks of one rank's chunks under ZeRO-2 or 3 (sync.stage), over `sync`'s unit buckets: model/chunk.py's
    PartHooks methods (this floor sits below the model's, so it does not import the class)."""

    def __init__(self, model, sync: GradientSync, comm: Comm, reshard_after_forward: bool = True):
        self.model, self.sync, self.comm = model, sync, comm
        self.stage, self.reshard = sync.stage, reshard_after_forward
        ranges = unit_ranges(model.specs)
        where = {r: i for i, r in enumerate(sync.buckets)}
        self.bucket = {u: where[r] for u, r in ranges.items()}  # unit -> its bucket index
        # units with a trained tensor: the others' gradients are never written, nor reduced
        self.trained = {unit_name(s.name) for s in model.specs if s.name not in model.frozen}
        # the head finishes wte's gradient where this rank has no embedding (the last stage, pp > 1)
        self.tied_head = not model.has_embedding
        # ZeRO-3: unit -> "gathered", or its gather's handle in flight
        self.state: dict[str, object] = {}
        # post the next part's gathers while a part computes (off: a benchmark's baseline)
        self.prefetch = True

    def _next(self, chunk, part, backward: bool):
        """The part that runs after `part` in this pass over the chunk (None at its end)."""
        order = chunk.parts()
        k = order.index(part) + (-1 if backward else 1)
        return order[k] if 0 <= k < len(order) else None

    # -- the hooks ------------------------------------------------------------------------------------------------

    def before_forward(self, chunk, part) -> None:
        if self.stage >= 3:
            self._acquire(part_reads(part, False), chunk, self._next(chunk, part, False), False)

    def after_forward(self, chunk, part, backward_follows: bool) -> None:
        if self.stage >= 3 and (self.reshard or not backward_follows):
            self._release(part_reads(part, False))

    def before_backward(self, chunk, part) -> None:
        for u in part_writes(part):
            if u in self.trained:
                self.sync.settle_unit(self.bucket[u])
        if self.stage >= 3:
            self._acquire(part_reads(part, True), chunk, self._next(chunk, part, True), True)

    def after_backward(self, chunk, part) -> None:
        if self.stage >= 3:
            self._release(part_reads(part, True))
        for u in part_finishes(part, self.tied_head):
            if u in self.trained:
                self.sync.reduce_unit(self.bucket[u])

    # -- ZeRO-3's parameter units ---------------------------------------------------------------------------------

    def _post(self, u: str) -> None:
        if u in self.state:
            return
        a, b = self.sync.buckets[self.bucket[u]]
        counts = self.sync.counts[self.bucket[u]]
        self.state[u] = self.comm.iallgatherv_(self.model.compute[a:b], counts, "allgather_params")

    def _acquire(self, units, chunk, nxt, backward: bool) -> None:
        """`units` gathered (waiting for their gathers, posted now unless prefetched); then the next part's posted."""
        for u in units:
            self._post(u)
        for u in units:
            self._complete(u)
        if nxt is not None and self.prefetch:
            for u in part_reads(nxt, backward):
                self._post(u)

    def _complete(self, u: str) -> None:
        h = self.state.get(u)
        if h is not None and h != "gathered":
            h.wait()
            self.state[u] = "gathered"

    def _release(self, units) -> None:
        for u in units:
            if u not in self.state:
                continue
            self._complete(u)  # MPI may still write into it
            del self.state[u]
            self.sync.release_unowned(self.model.compute, self.bucket[u])

    def release_all(self) -> None:
        """Every unit back to this rank's pieces (before the optimizer changes them: a gathered copy would be
        stale)."""
        self._release(list(self.state))

    def gathered(self, flat):
        """A copy of `flat` (laid out like the model's flat buffer) with every unit's pieces gathered from their
        owners: ZeRO-3's whole parameters, for tests and tools (a collective over the data-parallel group)."""
        out = flat.copy()
        for i, (a, b) in enumerate(self.sync.buckets):
            self.comm.iallgatherv_(out[a:b], self.sync.counts[i], "allgather_params").wait()
        return out
