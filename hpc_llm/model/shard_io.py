"""Reading and writing one rank's flat buffer from and to the model's logical (full) tensors.

A rank's flat buffer (parameters, gradients, Adam moments: all laid out alike, model/layout.py) holds its shard of
each tensor it has. Loading reads only the hyperslabs of the full tensors that make this rank's shards (an HDF5
dataset's slicing, or a NumPy array's); gathering puts the TP group's shards back together.
"""

from __future__ import annotations

import numpy as np

from hpc_llm.backend import to_device, to_host
from hpc_llm.errors import UserError
from hpc_llm.model.layout import ParamSpec
from hpc_llm.model.tensor_parallel import shard, shard_index, shard_slices
from hpc_llm.parallel.comm import Comm


class ShardIO:
    """The flat-buffer I/O of one rank: its `specs` (model/layout.py), the whole model's `logical` shapes
    {name: full shape}, its tensor-parallel group `tp`, and the buffers' array module and dtype."""

    def __init__(self, specs: list[ParamSpec], logical: dict, tp: Comm, xp, dtype):
        self.specs, self.logical, self.tp, self.xp, self.dtype = specs, logical, tp, xp, dtype
        self.local_size = sum(s.size for s in specs)

    def local_view(self, flat, spec: ParamSpec):
        """spec's shard inside a flat buffer of this layout."""
        return flat[spec.offset : spec.offset + spec.size].reshape(spec.local_shape)

    def shard(self, full: np.ndarray, spec: ParamSpec) -> np.ndarray:
        """This rank's shard of spec's full tensor."""
        return shard(full, spec, self.tp.size, self.tp.rank)

    def check_shapes(self, shapes: dict, what: str = "parameters") -> None:
        """shapes: {name: full shape} of a source of tensors; it must hold exactly the whole model's, in its shapes
        (whatever part of it this rank holds)."""
        missing = [n for n in self.logical if n not in shapes]
        extra = [n for n in shapes if n not in self.logical]
        if missing or extra:
            raise UserError(
                f"{what} do not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for name, shape in shapes.items():
            if tuple(shape) != self.logical[name]:
                raise UserError(
                    f"{what}: {name} has shape {tuple(shape)}, the config gives {self.logical[name]}"
                )

    def load_flat(self, flat, tensors: dict, what: str = "parameters") -> None:
        """Copy named full tensors into a flat buffer of this layout, each rank taking its shard."""

        def read(name, index, out=None):
            part = np.asarray(tensors[name])[index]
            if out is None:
                return part
            out[...] = part
            return out

        self.read_flat(flat, read, {n: np.shape(t) for n, t in tensors.items()}, what)

    def read_flat(self, flat, read, shapes: dict, what: str, ranges=None) -> None:
        """Fill this rank's shards in a flat buffer of this layout from a reader of full tensors:
        read(name, index, out=None) returns full[index] for a hyperslab index (an HDF5 dataset's slicing), into
        `out` when given (whole rows of a single slab are read straight into the buffer), and only the rows of this
        rank's shards that cover `ranges` of the flat buffer are read (default: all of it; ZeRO-1: the ranges this
        rank owns). shapes: {name: full shape} of what the source holds, checked first."""
        self.check_shapes(shapes, what)
        for s in self.specs:
            for a, b in ranges if ranges is not None else [(0, self.local_size)]:
                lo, hi = max(a, s.offset) - s.offset, min(b, s.offset + s.size) - s.offset
                if lo < hi:
                    self._read_spec_range(flat, read, s, lo, hi)

    def _read_spec_range(self, flat, read, s: ParamSpec, lo: int, hi: int) -> None:
        """Elements [lo, hi) of s's shard in `flat`, read by whole rows of the shard (along axis 0)."""
        row = s.size // s.local_shape[0]  # elements per row (along axis 0) of the local shard
        dest = self.local_view(flat, s).reshape(-1)
        slabs = shard_slices(s.shape, s.tp_axis, s.tp_blocks, self.tp.size, self.tp.rank)
        r0, r1 = lo // row, -(-hi // row)
        # whole rows of one slab: read in place
        if (
            self.xp is np
            and lo == r0 * row
            and hi == r1 * row
            and len(slabs) == 1
            and (s.tp_axis != 0 or self.tp.size == 1)
        ):
            out = dest[lo:hi].reshape((r1 - r0,) + s.local_shape[1:])
            read(s.name, (slice(r0, r1),) + slabs[0][1:], out)
            return
        rows = self._read_local_rows(read, s, slabs, r0, r1).reshape(-1)
        dest[lo:hi] = to_device(
            np.asarray(rows[lo - r0 * row : hi - r0 * row], dtype=self.dtype), self.xp
        )

    def _read_local_rows(self, read, s: ParamSpec, slabs: list, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of this rank's shard of s (its `slabs`, shard_slices), read as hyperslabs of the full
        tensor."""
        if s.tp_axis != 0 or self.tp.size == 1:
            # axis 0 whole: the rows, times this rank's slab(s) of the split axis
            pieces = [read(s.name, (slice(r0, r1),) + slab[1:]) for slab in slabs]
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=s.tp_axis)
        rows = np.concatenate([np.arange(slab[0].start, slab[0].stop) for slab in slabs])[r0:r1]
        # contiguous runs of full-tensor rows
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
        return np.concatenate(
            [read(s.name, (slice(int(run[0]), int(run[-1]) + 1),)) for run in runs]
        )

    def full_tensors(self, flat) -> dict:
        """{name: full tensor} (host arrays, copies) from a flat buffer of this layout: the shards of the TP group are
        gathered (one allgather of the flat buffer) and put back together. Every TP rank gets the result. For tests
        and small models: checkpoints never build full tensors (checkpoint/writers.py)."""
        P = self.tp.size
        host = to_host(flat)
        if P > 1:
            every = np.empty((P, host.size), dtype=host.dtype)
            every[self.tp.rank] = host
            self.tp.allgather_(every.reshape(-1), [host.size] * P)
        out = {}
        for s in self.specs:
            if P == 1 or s.tp_axis is None:
                out[s.name] = host[s.offset : s.offset + s.size].reshape(s.shape).copy()
                continue
            full = np.empty(s.shape, dtype=host.dtype)
            for r in range(P):
                index = shard_index(s.shape, s.tp_axis, s.tp_blocks, P, r)
                full[index] = every[r, s.offset : s.offset + s.size].reshape(s.local_shape)
            out[s.name] = full
        return out
