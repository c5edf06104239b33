"""The parts writer: every rank writes the elements it holds into a file of its own, and a small master file joins
the parts with HDF5 virtual datasets, so a checkpoint is still one path that plain h5py reads as full tensors.

No rank sends or receives tensor data and none needs MPI-IO. Each dataset's elements are found where the other
writers find them (the datasets, slabs, parts and pieces of slabs.py, placement.py's ranks): a rank writes the
pieces it holds, back to back, into one 1-D dataset per checkpoint dataset of its part file
``<checkpoint>.parts-<token>/rank<R>.h5``; the master maps each piece's runs (``Run``: rows of a box of the full
tensor) onto them. The dataset's crc32 is the CRC of its full C-order bytes, as in every checkpoint: each rank
checksums the runs of the full tensor it wrote and contributes crc * x^(8 * bytes after) (format.crc_shifted), and
the XOR of all ranks' contributions is the dataset's crc32, no byte of it ever moved (a 32-bit sum over the ranks).

A save (``PartsSave``), each collective step agreed (Comm.agree), a failure anywhere SaveFailed on every rank:

1. ``start`` (the step boundary): rank 0 checks the directory, makes the header and the parts directory; every rank
   walks the datasets for its pieces; with ``background`` each copies them into its host staging buffer (its
   share, nothing more) and a thread writes them while training goes on; else they are written now;
2. the part (thread or inline, no MPI): the part file written, fsynced, read back and checked against the
   checksums of the bytes in memory;
3. ``finish`` (this step boundary or a later one, on the main thread): the parts' outcome agreed, the
   contributions summed; rank 0 writes the master under a temporary name, fsyncs it and the parts directory,
   checks its header, and renames it onto the checkpoint's name (the only step that makes it a checkpoint).
   In the background (``commit``) that file work runs in a thread of rank 0 while training goes on, and a later
   ``finish`` agrees on its outcome: the main thread keeps only the agreements and the checksums' sum.

A kill at any point before the rename leaves a parts directory no master names and a temporary master: never a
checkpoint; the next run in the directory removes them (rundir.remove_interrupted_saves).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from hpc_llm.checkpoint import format as fmt
from hpc_llm.checkpoint import rundir
from hpc_llm.checkpoint.part_map import Walk, master_only, run_segments, run_selections
from hpc_llm.checkpoint.slabs import Out, slabs
from hpc_llm.checkpoint.writers import SaveFailed, agreed, file_bytes
from hpc_llm.errors import UserError
from hpc_llm.runtime.faults import WATCHDOG, inject
from hpc_llm.runtime.fsio import fsync_dir, release_reserve, reserve_space

PART_FORMAT = "hpc_llm-checkpoint-part"


def _fsync_file(path: Path) -> None:
    """fsync a file, or a directory (its entries: the part files in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_part(
    path: Path, outs: list[Out], walk: Walk, arrays: list[np.ndarray], step
) -> np.ndarray:
    """This rank's part file: its pieces (``arrays``, in walk.mine's order) into one 1-D dataset per checkpoint
    dataset, each with the crc32 of its own bytes; closed, fsynced, read back and checked. Returns this rank's
    contribution to each dataset's crc32 (0 where it holds nothing). No MPI: it may run in a thread."""
    inject("save", step)
    segs: list[tuple[int, int, int, int]] = []  # (dataset, crc, end in its part, end in its tensor)

    def checksums(i, at, runs, data):
        segs.extend((i, c, at + p, t) for c, p, t in run_segments(data, runs, outs[i].shape))

    # each piece checksummed in a thread while h5py writes it (both release the GIL)
    # its own temporary files: no HDF5 locks (format.open_file says why)
    with h5py.File(path, "w", libver=fmt.LIBVER, locking=False) as f, ThreadPoolExecutor(1) as pool:
        # a full disk fails here, not inside HDF5 (writers.Save._reserve)
        data = sum(n * outs[i].dtype.itemsize for i, n in walk.lengths.items())
        reserve_space(path, file_bytes(data, len(walk.lengths)))
        f.attrs["format"] = PART_FORMAT
        dsets = {
            i: f.create_dataset(outs[i].path, (n,), outs[i].dtype) for i, n in walk.lengths.items()
        }
        for (i, at, piece, runs), data in zip(walk.mine, arrays):
            summed = pool.submit(checksums, i, at, runs, data)
            try:
                dsets[i][at : at + piece.n] = data
            finally:
                summed.result()
        part, tensor = np.zeros(len(outs), np.uint64), np.zeros(len(outs), np.uint64)
        if segs:
            i, c, p, t = (np.array(x, np.uint64) for x in zip(*segs))
            i = i.astype(np.intp)
            item = np.array([o.dtype.itemsize for o in outs], np.uint64)[i]
            length = np.array([walk.lengths.get(j, 0) for j in range(len(outs))], np.uint64)[i]
            size = np.array([math.prod(o.shape) for o in outs], np.uint64)[i]
            np.bitwise_xor.at(part, i, fmt.crc_shifted(c, (length - p) * item))
            np.bitwise_xor.at(tensor, i, fmt.crc_shifted(c, (size - t) * item))
        for j, d in dsets.items():
            d.attrs["crc32"] = np.int64(part[j])
    # the fsync waits on the disk while the read-back comes from the page cache
    with ThreadPoolExecutor(1) as pool:
        synced = pool.submit(_fsync_file, path)
        try:
            with h5py.File(path, "r", locking=False) as f:
                fmt.check_crcs(fmt.datasets(f), path)
        finally:
            synced.result()
    release_reserve(path)
    return tensor


def xor_over_ranks(comm, values: np.ndarray) -> np.ndarray:
    """The XOR of every rank's 32-bit ``values``: bit by bit, as a sum modulo 2 (MPI sums; counts stay small)."""
    bits = ((values[:, None] >> np.arange(32, dtype=np.uint64)) & np.uint64(1)).astype(np.int32)
    comm.allreduce_(bits, "sum")
    return ((bits.astype(np.uint64) & np.uint64(1)) << np.arange(32, dtype=np.uint64)).sum(axis=1)


class HostStaging:
    """A rank's host buffer for background saves: its share of the checkpoint, allocated once and reused (the next
    save waits for the previous one first), so a save adds at most its size to the rank's memory."""

    def __init__(self):
        self.buf = np.empty(0, np.uint8)

    def views(self, dtypes_and_sizes) -> list[np.ndarray]:
        total = sum(n * np.dtype(d).itemsize for d, n in dtypes_and_sizes)
        if self.buf.size < total:
            self.buf = np.empty(0, np.uint8)  # freed first: never two at once
            self.buf = np.empty(total, np.uint8)
        out, at = [], 0
        for d, n in dtypes_and_sizes:
            nbytes = n * np.dtype(d).itemsize
            out.append(self.buf[at : at + nbytes].view(d))
            at += nbytes
        return out


class PartsSave:
    """One save by the parts writer on every rank of ``comm`` (the same ``outs`` everywhere): ``start()`` at a step
    boundary, then ``ready()`` (collective, cheap) at later ones, and ``finish()`` (collective) to publish it."""

    def __init__(self, path, outs: list[Out], header, comm, step, staging: HostStaging | None):
        self.path, self.outs, self.header, self.comm = Path(path), outs, header, comm
        self.step, self.staging = step, staging
        self.rank = comm.rank
        self.dir: Path | None = None
        self.tmp: Path | None = None
        self.error: BaseException | None = None
        self.crcs: np.ndarray | None = None
        self.thread: threading.Thread | None = None
        self.publishing = False  # commit() has handed the master to rank 0's thread
        self.renamed = (
            False  # the master is under the checkpoint's name: nothing of it may be removed
        )
        self.own: dict[str, np.ndarray] = {}
        self.f: h5py.File | None = None  # the master (rank 0), open from its body to its trailer
        self.dsets: dict[str, h5py.Dataset] = {}

    def agree(self, what: str, fn):
        return agreed(self.comm, fn, what, f"checkpoint {self.path} not saved")

    def start(self) -> PartsSave:
        try:
            self.agree("preparing a checkpoint save", self._prepare)
            token = self.comm.bcast_object(self.dir.name if self.rank == 0 else None)
            self.dir = self.path.parent / token
            walk = Walk(self.outs, self.rank, everyone=self.rank == 0)
            self.walk, self.tmp = walk, rundir.temporary_path(self.path, token.rsplit("-", 1)[1])
            if self.staging is None:
                self._write(lambda: [p.fetch() for _i, _a, p, _r in walk.mine])
                return self
            arrays = self.agree("staging the checkpoint in host memory", self._stage)
            self.thread = threading.Thread(
                target=self._write, args=(lambda: arrays,), name="hpc-llm-checkpoint", daemon=True
            )
            self.thread.start()
            return self
        except SaveFailed:
            self._abandon()
            raise

    def _prepare(self) -> None:
        if self.rank != 0:
            return
        self.header = self.header() if callable(self.header) else self.header
        # the metrics as they are now: a background save finishes steps later
        for out in self.outs:
            if master_only(out):
                self.own[out.path] = np.concatenate(
                    [np.zeros(0, out.dtype)]
                    + [
                        p.fetch()
                        for b in slabs(out.shape)
                        for part in out.parts(b)
                        for p in part.pieces
                    ]
                )
        parent = self.path.parent
        if not parent.is_dir():
            raise UserError(
                f"{self.path}: cannot write checkpoint, directory {parent} does not exist"
            )
        self.dir = rundir.parts_dir(self.path, f"{os.getpid()}{time.time_ns() % 10**6:06d}")
        self.dir.mkdir()

    def _stage(self) -> list[np.ndarray]:
        mine = self.walk.mine
        views = self.staging.views([(self.outs[i].dtype, p.n) for i, _a, p, _r in mine])
        for (_i, _a, piece, _r), view in zip(mine, views):
            view[...] = piece.fetch()
        return views

    def _write(self, arrays) -> None:
        """This rank's part, and on rank 0 the master's body (all but the checksums, which need every rank)."""
        try:
            self.crcs = write_part(
                self.dir / f"rank{self.rank:05d}.h5", self.outs, self.walk, arrays(), self.step
            )
            if self.rank == 0:
                self._master_body()
        except BaseException as e:  # noqa: BLE001 - reported (agreed) by finish
            self.error = e

    def ready(self) -> bool:
        """Whether every rank's background work is done: its part, or after commit() rank 0's master (collective:
        the same answer everywhere)."""
        done = self.thread is None or not self.thread.is_alive()
        return self.comm.allreduce_scalar(float(done), "min") > 0

    def _join(self) -> None:
        if self.thread is not None:
            WATCHDOG.enter("waiting for this rank's checkpoint writer")
            try:
                self.thread.join()
            finally:
                WATCHDOG.leave()

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _parts_written(self) -> np.ndarray:
        """The parts' outcome agreed, then every dataset's crc32: the XOR of the ranks' contributions."""
        self._join()
        self.agree("writing checkpoint parts", self._raise_error)
        return xor_over_ranks(self.comm, self.crcs)

    def finish(self) -> None:
        """Agree on the parts, write and publish the master (rank 0); after commit(), agree on what rank 0's thread
        did. SaveFailed on every rank if anything failed."""
        try:
            if self.publishing:
                self._join()
                self.agree("publishing the checkpoint's master file", self._raise_error)
                return
            crcs = self._parts_written()
            self.agree("writing the checkpoint's master file", lambda: self._master(crcs))
            self.agree("renaming the checkpoint", self._publish)
        except SaveFailed:
            self._abandon()
            raise

    def commit(self, after) -> None:
        """Once ready(): agree on the parts and sum the checksums (collective, cheap), then rank 0 writes, checks
        and renames the master in a thread, and calls ``after()`` (no MPI in either); ready() says when that is
        done and finish() agrees on it. SaveFailed on every rank if a part failed."""
        try:
            crcs = self._parts_written()
        except SaveFailed:
            self._abandon()
            raise
        self.publishing, self.thread = True, None
        if self.rank == 0:
            self.thread = threading.Thread(
                target=self._publish_master,
                args=(crcs, after),
                name="hpc-llm-checkpoint",
                daemon=True,
            )
            self.thread.start()

    def _publish_master(self, crcs: np.ndarray, after) -> None:
        try:
            self._master(crcs)
            self._publish()
            after()
        except BaseException as e:  # noqa: BLE001 - reported (agreed) by finish
            self.error = e

    def _master_body(self) -> None:
        """The master under its temporary name, left open: header, metrics, a virtual dataset per tensor."""
        self.f = f = h5py.File(self.tmp, "w", libver=fmt.LIBVER, locking=False)
        reserve_space(self.tmp, file_bytes(0, 0))
        fmt.write_header(f, self.header)
        for i, out in enumerate(self.outs):
            if master_only(out):
                self.dsets[out.path] = fmt.create_dataset(f, out.path, out.shape, out.dtype)
                self.dsets[out.path][...] = self.own[out.path]
                continue
            lay = h5py.VirtualLayout(out.shape, out.dtype)
            for r, runs in self.walk.maps[i].items():
                name = f"{self.dir.name}/rank{r:05d}.h5".encode()
                total = sum(run.rows * run.cols for run in runs)
                for run in runs:
                    virtual, source = run_selections(out.shape, total, run)
                    lay.dcpl.set_virtual(virtual, name, out.path.encode(), source)
            parent = out.path.rsplit("/", 1)[0]
            if parent not in f:
                f.create_group(parent, track_order=True)
            self.dsets[out.path] = f.create_virtual_dataset(out.path, lay)
        parts = [f"{self.dir.name}/rank{r:05d}.h5" for r in range(self.comm.size)]
        f.attrs[fmt.PARTS_ATTR] = json.dumps(parts)

    def _master(self, crcs: np.ndarray) -> None:
        """The master's checksums, manifest and ``complete``; closed, fsynced with the parts' directory, checked."""
        if self.rank != 0:
            return
        for i, out in enumerate(self.outs):
            if master_only(out):
                crcs[i] = fmt.crc(self.own[out.path])
        fmt.write_trailer(
            self.f, self.dsets, {o.path: int(crcs[i]) for i, o in enumerate(self.outs)}
        )
        self.f.close()
        self.f = None
        for p in (self.tmp, self.dir):
            _fsync_file(p)
        with fmt.open_file(self.tmp) as f:
            fmt.check_header(f, self.tmp)

    def _publish(self) -> None:
        if self.rank == 0:
            replaced = rundir.parts_of(self.path) if self.path.exists() else None
            release_reserve(self.tmp)
            os.replace(self.tmp, self.path)
            self.tmp, self.renamed = None, True
            fsync_dir(self.path.parent)
            if replaced is not None and replaced != self.dir:
                shutil.rmtree(replaced, ignore_errors=True)

    def _abandon(self) -> None:
        """After an agreed failure (every part finished or failed): remove the temporary master and the parts."""
        if self.rank != 0:
            return
        if self.f is not None:
            with contextlib.suppress(Exception):  # the save has failed already
                self.f.close()
            self.f = None
        if self.renamed:  # a checkpoint now (what failed came after): its parts stay
            return
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
