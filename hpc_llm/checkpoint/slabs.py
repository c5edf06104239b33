"""What a checkpoint save writes, in the words the save engine (writers.py) and its callers share.

A save is a list of datasets (``Out``); each is cut into slabs (``slabs``): runs of at most ``MESSAGE_ELEMS`` of its
elements in C order, so a slab is one hyperslab and the slabs in order are the dataset's bytes in order. A slab is
made of parts (``Part``: where its elements land in the slab) made of pieces (``Piece``: elements that live on one
rank, as one contiguous run of that rank's own buffer). ``Staging`` holds the writer's two slab buffers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# elements per slab, so per message and per write at most (16 MiB of float32); < 2**31
MESSAGE_ELEMS = 1 << 22


@dataclass
class Piece:
    """``n`` elements held by rank ``rank``; ``fetch()``, called there only, returns them (1-D, host memory)."""

    rank: int
    n: int
    fetch: Callable[[], np.ndarray]


@dataclass
class Part:
    """``n`` elements of a slab: its pieces back to back. ``at``: where they start in the slab's elements (C
    order); None: they are received apart and ``scatter(slab, part)`` (both 1-D) puts them in place."""

    n: int
    pieces: list[Piece]
    at: int | None = 0
    scatter: Callable[[np.ndarray, np.ndarray], None] | None = None


@dataclass
class Slab:
    """One hyperslab of a dataset: ``dset[index]``, of ``shape``, its elements ``lo..hi`` in C order."""

    index: tuple
    shape: tuple
    lo: int
    hi: int


@dataclass
class Out:
    """A dataset to write: its path in the file, shape and dtype, its writer, and each slab's parts."""

    path: str
    shape: tuple
    dtype: np.dtype
    writer: int
    parts: Callable[[Slab], list[Part]]

    def __post_init__(self):
        self.dtype = np.dtype(self.dtype)
        self.shape = tuple(int(s) for s in self.shape)


def slabs(shape: tuple):
    """The slabs of a dataset of ``shape``, in C order, each at most MESSAGE_ELEMS elements (at least one): whole
    rows where a row fits, else pieces of a row (recursively for N-D)."""
    if math.prod(shape) == 0:
        return
    if not shape:
        yield Slab((), (), 0, 1)
        return
    limit = MESSAGE_ELEMS
    trailing = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    k = next(i for i, t in enumerate(trailing) if t <= limit)  # split along axis k, whole below it
    step = max(1, limit // trailing[k])
    for prefix in itertools.product(*(range(s) for s in shape[:k])):
        base = sum(i * trailing[a] for a, i in enumerate(prefix))
        for j0 in range(0, shape[k], step):
            j1 = min(j0 + step, shape[k])
            yield Slab(
                prefix + (slice(j0, j1),),
                (j1 - j0,) + tuple(shape[k + 1 :]),
                base + j0 * trailing[k],
                base + j1 * trailing[k],
            )


def whole(rank: int, flat: Callable[[int, int], np.ndarray]) -> Callable[[Slab], list[Part]]:
    """The parts of a dataset held whole by one rank: ``flat(lo, hi)`` returns its elements lo..hi (C order)."""

    def parts(blk: Slab) -> list[Part]:
        return [Part(blk.hi - blk.lo, [Piece(rank, blk.hi - blk.lo, lambda: flat(blk.lo, blk.hi))])]

    return parts


class Staging:
    """The writer's slab buffers, one dtype at a time: the slab being assembled, and the parts received apart."""

    def __init__(self):
        self.dtype, self.bufs = None, [None, None]

    def get(self, which: int, dtype: np.dtype, n: int) -> np.ndarray:
        if self.dtype != dtype:
            self.dtype, self.bufs = dtype, [None, None]
        if self.bufs[which] is None or self.bufs[which].size < n:
            self.bufs[which] = None  # freed first: never two of them at once
            self.bufs[which] = np.empty(n, dtype=dtype)
        return self.bufs[which][:n]
