"""Where each element of a trainer's checkpointed tensors lives on the grid (stage, data-parallel replica, TP rank),
so each checkpoint writer can collect a block of a full tensor at a time from the ranks that hold its pieces."""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from hpc_llm.backend import to_host
from hpc_llm.checkpoint.slabs import Part, Piece, Slab
from hpc_llm.model.layout import param_specs
from hpc_llm.parallel.data_parallel import split_counts


def _runs(lo: int, hi: int, n: int, nblocks: int, tp: int, t: int) -> list[tuple[int, int, int]]:
    """Indices lo..hi along a tensor-parallel axis of length n (made of nblocks blocks, each split in tp pieces; rank
    t holds piece t of every block, TP.shard_slices) that rank t holds: [(full index, local index, count)], in order.
    They are consecutive in t's shard, since its shard keeps the full tensor's order."""
    per = n // nblocks
    piece = per // tp
    out = []
    for b in range(nblocks):
        f0 = b * per + t * piece
        x0, x1 = max(lo, f0), min(hi, f0 + piece)
        if x0 < x1:
            out.append((x0, b * piece + x0 - f0, x1 - x0))
    return out


@dataclass(frozen=True)
class ColumnScatter:
    """A TP rank's rows of a column-split tensor (rows x local, its shard's columns) put into a block of the full
    tensor's rows (rows x width): ``runs`` [(full column, local column, count)] (_runs). Kept as data, not only
    as the function, so the parts writer can map the same elements into a virtual dataset."""

    rows: int
    width: int
    local: int
    runs: tuple

    def __call__(self, block: np.ndarray, part: np.ndarray) -> None:
        b, p = block.reshape(self.rows, self.width), part.reshape(self.rows, self.local)
        for f, loc, n in self.runs:
            b[:, f : f + n] = p[:, loc : loc + n]


class ElementPlacement:
    """Where each element of the model's tensors lives: stage s's tensors (param_specs of its plan; every TP rank of
    the stage has the same layout) on its ranks (s, d, t), world rank (s * dp + d) * tp + t; a TP shard of a
    parameter, or of a moment without ZeRO-1, on every data-parallel replica; with ZeRO-1 a moment element on the
    replica owning its range (GradientSync's pieces of each bucket), and with ZeRO-3 a parameter element too.

    ``parts``: the trainer's model (flat buffer, stage plan, config), optimizer (moments m and v over its owned
    ranges) and gradient sync (ZeRO-1 ownership), and the grid (trainer_state.TrainerParts)."""

    def __init__(self, parts):
        g, m, sync = parts.grid, parts.model, parts.sync
        self.model, self.opt = m, parts.opt
        self.tp, self.dp, self.pp = g.tp, g.dp, g.pp
        self.me = g.world.rank
        self.specs = [param_specs(m.cfg, g.tp, replace(m.plan, rank=s)) for s in range(g.pp)]
        self.zero = sync.zero
        self.params_sharded = sync.stage >= 3
        if self.zero:
            # each stage's bucket layout, from its first rank: with it, anyone knows which replica owns what
            buckets = g.world.allgather_objects(
                sync.buckets if g.dp_rank == 0 and g.tp_rank == 0 else None
            )
            self.owners = [self._owner_table(buckets[self.rank(s, 0, 0)]) for s in range(g.pp)]
            mine = sorted((a, b) for a, b, d in self.owners[g.pp_rank][1] if d == g.dp_rank)
            if mine != sorted(sync.owned):
                raise RuntimeError(
                    f"checkpoint: ZeRO-1 ranges {mine[:3]}... derived for rank {self.me} differ from "
                    f"its own {sorted(sync.owned)[:3]}...: a bug, please report it"
                )
        # this rank's compact moments: the ranges it updates (trained; ZeRO-1: its shard)
        own, base = [], 0
        for a, b in self.opt.owned:
            own.append((a, b, base))
            base += b - a
        self.own = sorted(own)
        self.own_starts = [a for a, _, _ in self.own]

    def rank(self, s: int, d: int, t: int) -> int:
        return (s * self.dp + d) * self.tp + t

    def _owner_table(self, buckets):
        rows = []
        for a, b in buckets:
            start = a
            for d, c in enumerate(split_counts(b - a, self.dp)):
                if c:
                    rows.append((start, start + c, d))
                    start += c
        rows.sort()
        return [r[0] for r in rows], rows

    # -- on the rank that holds them: the elements a..b of a slot's buffer (laid out like the flat buffer) ---------

    def fetch(self, slot: str, a: int, b: int) -> np.ndarray:
        if slot == "params":
            return to_host(self.model.flat[a:b])
        buf = getattr(self.opt, slot)
        i = bisect.bisect_right(self.own_starts, a) - 1
        # a frozen tensor (train.freeze, LoRA's base): no moments, stored as zeros
        if i < 0 or self.own[i][1] <= a:
            assert i + 1 >= len(self.own) or b <= self.own[i + 1][0], (a, b, self.own[i + 1])
            return np.zeros(b - a, dtype=buf.dtype)
        start, stop, base = self.own[i]
        assert start <= a and b <= stop, (a, b, start, stop)
        return to_host(buf[base + a - start : base + b - start])

    def pieces(self, s: int, t: int, slot: str, a: int, n: int, replica: int) -> list[Piece]:
        """Elements a..a+n of stage s, TP rank t's ``slot`` buffer, as pieces on the ranks holding them."""
        # parameters are on every replica, unless ZeRO-3 shards them like the moments
        if (slot == "params" and not self.params_sharded) or not self.zero:
            return [
                Piece(self.rank(s, replica, t), n, functools.partial(self.fetch, slot, a, a + n))
            ]
        starts, rows = self.owners[s]
        out, x = [], a
        i = bisect.bisect_right(starts, x) - 1
        while x < a + n:
            lo, hi, d = rows[i]
            y = min(hi, a + n)
            out.append(Piece(self.rank(s, d, t), y - x, functools.partial(self.fetch, slot, x, y)))
            x, i = y, i + 1
        return out

    def replica(self, s: int, t: int, writer: int, index: int) -> int:
        """Which data-parallel replica sends stage s, TP rank t's copy of a dataset: the writer itself when it is
        one (no message), else one chosen by the dataset's index (the load spread over the replicas). ``writer``
        None (the parts writer: every rank writes what it holds): the replica ``index % dp``."""
        if writer is None:
            return index % self.dp
        ws, wd, wt = writer // (self.dp * self.tp), writer // self.tp % self.dp, writer % self.tp
        return wd if (ws, wt) == (s, t) else index % self.dp

    def tensor_parts(self, s: int, spec, slot: str, writer: int, index: int):
        """The parts of each block of the full tensor ``spec.name`` (as a rows x width matrix: axis 0 by the rest)
        from the shards of stage s's TP ranks (TP.shard_slices: a split axis is made of tp_blocks blocks, each cut
        in tp pieces)."""
        shape, axis, tp = spec.shape, spec.tp_axis, self.tp
        width = math.prod(shape[1:])
        off = spec.offset

        def pieces(t, a, n):
            return self.pieces(s, t, slot, a, n, self.replica(s, t, writer, index))

        def parts(blk: Slab) -> list[Part]:
            n = blk.hi - blk.lo
            r0, c0 = divmod(blk.lo, width)
            # whole rows, or (0) a piece of row r0
            rows = n // width if c0 == 0 and n % width == 0 else 0
            # the shard is the tensor (TP rank 0's copy of a replicated one)
            if tp == 1 or axis is None:
                return [Part(n, pieces(0, off + blk.lo, n))]
            if axis == 0:  # rows split: each run of rows from one rank, straight into place
                out = []
                for t in range(tp):
                    for f, loc, k in _runs(r0, r0 + max(rows, 1), shape[0], spec.tp_blocks, tp, t):
                        if rows:
                            out.append(
                                Part(
                                    k * width,
                                    pieces(t, off + loc * width, k * width),
                                    at=(f - r0) * width,
                                )
                            )
                        else:
                            out.append(Part(n, pieces(t, off + loc * width + c0, n)))
                return out
            assert axis == 1 and len(shape) == 2, (spec.name, shape, axis)
            local = width // tp  # columns split: rank t's columns of these rows
            out = []
            for t in range(tp):
                runs = _runs(c0, c0 + (width if rows else n), width, spec.tp_blocks, tp, t)
                if not runs:
                    continue
                if rows:  # rows r0.. of t's shard are contiguous there; their columns interleave in the block
                    out.append(
                        Part(
                            rows * local,
                            pieces(t, off + r0 * local, rows * local),
                            at=None,
                            scatter=ColumnScatter(rows, width, local, tuple(runs)),
                        )
                    )
                else:
                    out += [
                        Part(k, pieces(t, off + r0 * local + loc, k), at=f - c0)
                        for f, loc, k in runs
                    ]
            return out

        return parts
