"""Where the parts writer's pieces land (checkpoint/parts.py): each rank's pieces of every dataset (``Walk``, from the
datasets' slabs, parts and pieces, as every writer finds them), each piece's runs in the full tensor (``Run``: rows
of a box, strided in the part), their checksums' segments, and the HDF5 selections that map a run of a part into
the master's virtual dataset."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
from h5py import h5s

from hpc_llm.checkpoint.slabs import Out, Part, slabs


@dataclass(frozen=True)
class Run:
    """Elements of a part dataset in the full tensor, seen as rows x width (axis 0 by the rest): ``rows`` rows of
    ``cols`` elements from (row, col); in the part they start at ``src`` and each row ``stride`` after the last."""

    src: int
    row: int
    col: int
    rows: int
    cols: int
    stride: int

    def follows(self, a: Run) -> bool:
        """This run continues ``a`` in the part and in the tensor: one mapping for both."""
        return (self.col, self.cols, self.stride) == (a.col, a.cols, a.stride) and (
            self.src == a.src + a.rows * a.stride and self.row == a.row + a.rows
        )


def contiguous_runs(lo: int, hi: int, width: int, src: int = 0) -> list[Run]:
    """Elements lo..hi (C order) of a rows x width matrix, stored from ``src`` on: a partial first row, whole rows,
    a partial last row."""
    runs, r, c = [], *divmod(lo, width)
    if c:
        k = min(width - c, hi - lo)
        runs.append(Run(src, r, c, 1, k, width))
        src, lo, r = src + k, lo + k, r + 1
    if (m := (hi - lo) // width) > 0:
        runs.append(Run(src, r, 0, m, width, width))
        src, lo, r = src + m * width, lo + m * width, r + m
    if hi > lo:
        runs.append(Run(src, r, 0, 1, hi - lo, width))
    return runs


def piece_runs(lo: int, part: Part, o: int, n: int, width: int) -> list[Run]:
    """Where elements o..o+n of a part of the slab starting at element ``lo`` land in the full tensor: straight,
    or (a column-split tensor's rows: placement.ColumnScatter) through its column runs."""
    if part.at is not None:
        start = lo + part.at + o
        return contiguous_runs(start, start + n, width)
    cs, r0, out = part.scatter, lo // width, []
    for rect in contiguous_runs(o, o + n, cs.local):
        for f, loc, k in cs.runs:
            x0, x1 = max(rect.col, loc), min(rect.col + rect.cols, loc + k)
            if x0 < x1:
                out.append(
                    Run(
                        rect.src + x0 - rect.col,
                        r0 + rect.row,
                        f + x0 - loc,
                        rect.rows,
                        x1 - x0,
                        cs.local,
                    )
                )
    return out


def _width(shape: tuple) -> int:
    return math.prod(shape[1:]) if shape else 1


def master_only(out: Out) -> bool:
    """Datasets the master holds itself: the metrics columns (rank 0's, small, and extendable by later writers)."""
    return out.path.startswith("metrics/")


class Walk:
    """What every rank derives alike from the datasets: its own pieces (``mine``: out index, offset in its part
    dataset, the piece, its runs), its part datasets' lengths, and on rank 0 every rank's mappings."""

    def __init__(self, outs: list[Out], me: int, everyone: bool):
        self.mine: list[tuple] = []
        self.lengths: dict[int, int] = {}
        self.maps: dict[int, dict[int, list[Run]]] = {}
        for i, out in enumerate(outs):
            if master_only(out):
                continue
            width, base, maps = _width(out.shape), {}, {}
            for blk in slabs(out.shape):
                for part in out.parts(blk):
                    o = 0
                    for piece in part.pieces:
                        r, at = piece.rank, base.get(piece.rank, 0)
                        if r == me or everyone:
                            runs = piece_runs(blk.lo, part, o, piece.n, width)
                            if r == me:
                                self.mine.append((i, at, piece, runs))
                            if everyone:
                                _extend(maps.setdefault(r, []), runs, at)
                        base[r], o = at + piece.n, o + piece.n
            if me in base:
                self.lengths[i] = base[me]
            self.maps[i] = {r: maps[r] for r in sorted(maps)}


def _extend(runs: list[Run], new: list[Run], at: int) -> None:
    for r in new:
        r = Run(r.src + at, r.row, r.col, r.rows, r.cols, r.stride)
        if runs and r.follows(runs[-1]):
            a = runs[-1]
            runs[-1] = Run(a.src, a.row, a.col, a.rows + r.rows, a.cols, a.stride)
        else:
            runs.append(r)


def run_segments(data: np.ndarray, runs: list[Run], shape: tuple):
    """(crc, end in the piece, end in the full tensor), in elements, of each run of the full tensor's C order in
    ``data`` (a piece): they tile the piece, so their crcs give the part's crc32 as well as the tensor's."""
    width, raw, item = _width(shape), data.view(np.uint8).reshape(-1), data.dtype.itemsize
    for r in runs:
        if r.cols == width == r.stride or r.rows == 1:  # one run of the C order
            n = r.rows * r.cols
            crc = zlib.crc32(raw[r.src * item : (r.src + n) * item])
            yield crc, r.src + n, r.row * width + r.col + n
            continue
        for i in range(r.rows):
            a = r.src + i * r.stride
            crc = zlib.crc32(raw[a * item : (a + r.cols) * item])
            yield crc, a + r.cols, (r.row + i) * width + r.col + r.cols


def run_selections(shape: tuple, total: int, run: Run):
    """The master's dataspace selection (a box of the full tensor) and the part's (a strided 1-D hyperslab)."""
    v = h5s.create_simple(shape)
    if len(shape) == 1:
        v.select_hyperslab((run.row,), (1,), block=(run.rows,))
    elif len(shape) == 2:
        v.select_hyperslab((run.row, run.col), (1, 1), block=(run.rows, run.cols))
    else:
        if run.col or run.cols != _width(shape):
            raise NotImplementedError(f"checkpoint: parts of rows of a {len(shape)}-D tensor")
        v.select_hyperslab(
            (run.row,) + (0,) * (len(shape) - 1), (1,) * len(shape), block=(run.rows, *shape[1:])
        )
    s = h5s.create_simple((total,))
    s.select_hyperslab(
        (run.src,), (run.rows,), stride=(max(run.stride, run.cols),), block=(run.cols,)
    )
    return v, s
