"""Writing a checkpoint: one engine behind both writers, with bounded messages and bounded memory, and a failure on
any rank abandoning the save on every rank.

A save is a list of datasets (``Out``), each cut into slabs of parts of pieces (slabs.py). Every rank walks the same
datasets, slabs, parts and pieces in the same order; each dataset has one writer rank, which receives the pieces
others hold (one message each, never over ``MESSAGE_ELEMS`` elements, sent from the owner's buffer itself), places
them in a staging slab, checksums and writes it, slab after slab. The ``gather`` writer is rank 0 for every dataset;
``mpio`` deals the datasets out to all ranks (parallel HDF5, independent writes), so each writes its share into one
file. Memory on a rank beyond its own shard: two staging slabs (``MESSAGE_ELEMS`` elements each) and up to
``SEND_WINDOW`` sends in flight (copies only for GPU buffers and metrics), plus verification's slabs
(format.VERIFY_BLOCK_BYTES, two at once).

The steps of a save, each agreed by every rank (Comm.agree) before any goes on, so that a failure anywhere (disk
full, quota, a read-only or vanished directory, an I/O error, an injected fault) becomes ``SaveFailed`` on every rank
at the same step, after the temporary file is closed and removed; the previous checkpoint is never touched:

1. prepare: the directory exists and is writable (rank 0; every rank under mpio);
2. create the temporary file ``.<name>.tmp-<pid>`` and its whole structure (rank 0; collectively under mpio);
3. data: ``faults.inject("save", step)`` on every rank, then the slabs; a rank that fails goes on sending and
   receiving (no peer is left waiting for a message) but writes no more;
4. close: checksums, manifest, ``complete`` last, then close (under mpio: the checksums allgathered, the
   attributes and the close collective, and only after step 3 was agreed);
5. verify: fsync while the file is read back and checksummed (rank 0 whole; under mpio each rank its share);
6. publish: rank 0 renames the file onto its name and fsyncs the directory.

Under mpio, HDF5's own collectives (create, structure, attributes, close) are entered only when every rank is known
to be fine (agreed just before). If HDF5 itself fails inside one of them on some ranks only, the others may be left
waiting inside HDF5, out of our reach: those calls run under the watchdog (parallel.comm_timeout_s), which then ends
the job.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from hpc_llm.checkpoint import format as fmt
from hpc_llm.checkpoint.reader import CheckpointFile, verify_checkpoint
from hpc_llm.checkpoint.rundir import temporary_path
from hpc_llm.checkpoint.slabs import Out, Part, Piece, Slab, Staging, slabs
from hpc_llm.errors import JobError, UserError
from hpc_llm.runtime.faults import WATCHDOG, failure_line, inject
from hpc_llm.runtime.fsio import fsync_dir, release_reserve, reserve_space

log = logging.getLogger("hpc_llm.checkpoint")

# what a checkpoint's file needs beyond its tensors' bytes (HDF5's headers, attributes, the metrics' whole chunks)
FILE_SLACK_BYTES, DATASET_SLACK_BYTES = 1 << 20, 16 << 10


def file_bytes(data_bytes: int, datasets: int) -> int:
    """The disk an HDF5 file of ``datasets`` datasets holding ``data_bytes`` needs (what a save reserves)."""
    return data_bytes + FILE_SLACK_BYTES + DATASET_SLACK_BYTES * datasets


SEND_WINDOW = 4  # sends a rank keeps in flight before it waits for the oldest
_TAGS = 32768  # MPI guarantees tags below 32768; pieces between two ranks also match in order


class SaveFailed(JobError):
    """A checkpoint save that failed on some rank, raised on every rank alike (one line: the file, the rank, the
    error), after the temporary file was removed; the previous checkpoint is untouched."""


def mpio_available() -> bool:
    """Whether this h5py was built with MPI (parallel HDF5), so ranks can write one file together."""
    return bool(h5py.get_config().mpi)


def _raise(error: BaseException | None) -> None:
    if error is not None:
        raise error


@contextlib.contextmanager
def _hdf5_collective(op: str):
    """An HDF5 call that communicates inside HDF5 (mpio): under the watchdog, like our own MPI waits."""
    WATCHDOG.enter(f"HDF5 collective {op}")
    try:
        yield
    finally:
        WATCHDOG.leave()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_during(path: Path, work) -> None:
    """fsync ``path`` in a thread while ``work()`` runs, and wait for both: the fsync waits on the disk, while
    verification (the usual work) reads the same bytes back from the page cache and checksums them on the CPU."""
    with ThreadPoolExecutor(1) as pool:
        synced = pool.submit(_fsync_path, path)
        try:
            work()
        finally:
            synced.result()


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # best effort: the save has failed already
        log.warning("could not remove temporary file %s: %s", path, exc)


def _tags(parts: list[Part], seq: int) -> tuple[list[list[int]], int]:
    """The message tag of every piece of a slab's parts, counted on from ``seq`` alike on every rank."""
    tags = []
    for part in parts:
        tags.append([(seq + i) % _TAGS for i in range(len(part.pieces))])
        seq += len(part.pieces)
    return tags, seq


def agreed(comm, fn, what: str, failed: str):
    """fn() on every rank of ``comm``, its outcome agreed (Comm.agree): any exception on any rank becomes SaveFailed
    on all, "<failed>: rank R failed in <phase>: <error>". fn must not communicate."""

    def guarded():
        try:
            return fn()
        except UserError as e:  # name the rank, as for any other failure
            raise UserError(failure_line(e)) from None

    try:
        return comm.agree(guarded, what)
    except (UserError, JobError) as e:
        raise SaveFailed(f"{failed}: {e}") from e


class Save:
    """One save, its steps in order (``run``); every rank of ``comm`` makes one with the same ``outs``."""

    def __init__(self, path, outs: list[Out], header, comm, mpio: bool, step, agree: bool):
        self.path, self.outs, self.header, self.comm = Path(path), outs, header, comm
        self.mpio, self.step, self.agree_ = mpio, step, agree
        self.rank = comm.rank
        self.tmp: Path | None = None
        self.f: h5py.File | None = None
        self.dsets: dict[str, h5py.Dataset] = {}
        self.crcs: dict[str, int] = {}
        self.renamed = False

    def agree(self, what: str, fn):
        if not self.agree_:  # the serial API: one process, its own exceptions
            return fn()
        return agreed(self.comm, fn, what, f"checkpoint {self.path} not saved")

    def run(self) -> None:
        try:
            self.agree("preparing a checkpoint save", self._prepare)
            pid = os.getpid()
            if self.mpio:  # attributes and the file name must be the same on every rank: rank 0's
                self.header, pid = self.comm.bcast_object(
                    (self.header, pid) if self.rank == 0 else None
                )
            self.tmp = temporary_path(self.path, pid)
            self._create()
            error = self._transfer()
            self.agree("writing checkpoint data", lambda: _raise(error))
            self._close()
            self.agree("verifying the checkpoint", self._verify)
            self.agree("renaming the checkpoint", self._publish)
        except SaveFailed:
            self._abandon(collective=True)  # every rank is here, at the same step
            raise
        except BaseException:
            # this rank alone: no collective that would wait for others
            self._abandon(collective=not self.mpio)
            raise

    # -- the steps ------------------------------------------------------------------------------------------------

    def _prepare(self) -> None:
        # serialised here: a state that cannot be fails agreed
        if self.rank == 0 and callable(self.header):
            self.header = self.header()
        if self.rank == 0 or self.mpio:
            parent = self.path.parent
            if not parent.is_dir():
                raise UserError(
                    f"{self.path}: cannot write checkpoint, directory {parent} does not exist"
                )
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(
                    f"cannot create files in {parent} (read-only or no permission)"
                )

    def _reserve(self) -> None:
        """The whole file's disk, before HDF5 writes a byte of it: a full disk fails here, not inside HDF5."""
        size = sum(int(np.prod(o.shape)) * np.dtype(o.dtype).itemsize for o in self.outs)
        reserve_space(self.tmp, file_bytes(size, len(self.outs)))

    def _structure(self) -> None:
        fmt.write_header(self.f, self.header)
        for out in self.outs:
            self.dsets[out.path] = fmt.create_dataset(self.f, out.path, out.shape, out.dtype)

    def _create(self) -> None:
        if not self.mpio:

            def create():
                if self.rank == 0:
                    self.f = h5py.File(self.tmp, "w", libver=fmt.LIBVER, locking=False)
                    self._reserve()
                    self._structure()

            self.agree("creating the checkpoint file", create)
            return
        error = None
        try:
            with _hdf5_collective("file create (mpio)"):
                self.f = h5py.File(
                    self.tmp,
                    "w",
                    driver="mpio",
                    comm=self.comm.mpi,
                    libver=fmt.LIBVER,
                    locking=False,
                )
            if self.rank == 0:
                self._reserve()
        except Exception as e:  # noqa: BLE001 - agreed just below
            error = e
        # agreed before the collective structure: a rank that failed here would not enter it
        self.agree("creating the checkpoint file", lambda: _raise(error))
        error = None
        try:
            with _hdf5_collective("dataset creation (mpio)"):
                self._structure()
        except Exception as e:  # noqa: BLE001 - agreed just below
            error = e
        self.agree("creating the checkpoint's datasets", lambda: _raise(error))

    def _transfer(self) -> BaseException | None:
        """Every rank's part of the data: its pieces sent to their writers, and the datasets it writes received,
        checksummed and written slab by slab. Never raises for an Exception: the first one is returned, and this
        rank still sends and receives everything (no peer waits for ever) but writes nothing more."""
        error: BaseException | None = None
        try:
            if self.agree_:  # tests' faults (HPC_LLM_FAULT=enospc:save:RANK:STEP): a run's saves, not the serial API
                inject("save", self.step)
        except Exception as e:  # noqa: BLE001
            error = e
        sends: deque = deque()
        staging = Staging()
        seq = 0
        with ThreadPoolExecutor(
            1
        ) as pool:  # each slab's checksum while h5py writes it (both release the GIL)
            for out in self.outs:
                mine = out.writer == self.rank
                value = 0
                for blk in slabs(out.shape):
                    parts = out.parts(blk)
                    tags, seq = _tags(parts, seq)
                    if not mine:
                        error = self._send(out, parts, tags, sends, error)
                        continue
                    data, error = self._assemble(out, blk, parts, tags, staging, error)
                    if error is None:
                        try:
                            value = self._write(pool, out, blk, data, value)
                        except Exception as e:  # noqa: BLE001
                            error = e
                if mine:
                    self.crcs[out.path] = value
        while sends:
            sends.popleft().wait()
        return error

    def _send(self, out: Out, parts: list[Part], tags, sends: deque, error):
        """This rank's pieces of a slab written elsewhere, sent to its writer, at most SEND_WINDOW in flight."""
        for part, ptags in zip(parts, tags):
            for piece, tag in zip(part.pieces, ptags):
                if piece.rank == self.rank:
                    data, error = self._fetch(piece, out.dtype, error)
                    sends.append(self.comm.isend(data, out.writer, tag, "save"))
                    while len(sends) > SEND_WINDOW:
                        sends.popleft().wait()
        return error

    def _write(
        self, pool: ThreadPoolExecutor, out: Out, blk: Slab, data: np.ndarray, value: int
    ) -> int:
        """Write one slab, checksummed in ``pool`` meanwhile; returns the dataset's running CRC."""
        crc = pool.submit(fmt.crc, data, value)
        try:
            self.dsets[out.path][blk.index] = data
        finally:
            value = crc.result()
        return value

    def _fetch(self, piece: Piece, dtype, error):
        try:
            data = np.ascontiguousarray(piece.fetch()).reshape(-1)
            if data.dtype != dtype or data.size != piece.n:
                raise RuntimeError(
                    f"checkpoint: a piece of {piece.n} {dtype} came as {data.size} {data.dtype}"
                )
            return data, error
        except Exception as e:  # noqa: BLE001 - sent anyway (zeros), so the writer is not left waiting
            return np.zeros(piece.n, dtype=dtype), error or e

    def _assemble(self, out: Out, blk: Slab, parts: list[Part], tags, staging: Staging, error):
        """The slab's elements on its writer: the local pieces copied, the others received, each straight into
        place where it lands contiguously."""
        me, n = self.rank, blk.hi - blk.lo
        if (
            len(parts) == 1
            and len(parts[0].pieces) == 1
            and parts[0].at == 0
            and parts[0].pieces[0].rank == me
        ):
            # held whole here: written from place
            data, error = self._fetch(parts[0].pieces[0], out.dtype, error)
            return data.reshape(blk.shape), error
        slab = staging.get(0, out.dtype, n)
        apart = sum(p.n for p in parts if p.at is None)
        spare = staging.get(1, out.dtype, apart) if apart else None
        handles, targets, used = [], [], 0
        try:
            for part, ptags in zip(parts, tags):
                if part.at is None:
                    target, used = spare[used : used + part.n], used + part.n
                else:
                    target = slab[part.at : part.at + part.n]
                targets.append(target)
                offset = 0
                for piece, tag in zip(part.pieces, ptags):
                    seg, offset = target[offset : offset + piece.n], offset + piece.n
                    if piece.rank == me:
                        seg[...], error = self._fetch(piece, out.dtype, error)
                    else:
                        handles.append(self.comm.irecv(seg, piece.rank, tag, "save"))
        finally:
            for h in handles:
                h.wait()
        if error is None:
            try:
                for part, target in zip(parts, targets):
                    if part.scatter is not None:
                        part.scatter(slab, target)
            except Exception as e:  # noqa: BLE001
                error = e
        return slab.reshape(blk.shape), error

    def _close(self) -> None:
        if not self.mpio:

            def finish():
                if self.f is not None:
                    fmt.write_trailer(self.f, self.dsets, self.crcs)
                    self.f.close()
                    self.f = None

            self.agree("closing the checkpoint file", finish)
            return
        crcs: dict[str, int] = {}
        # HDF5 attributes are collective: equal everywhere
        for part in self.comm.allgather_objects(self.crcs):
            crcs.update(part)
        error = None
        try:
            with _hdf5_collective("attributes (mpio)"):
                fmt.write_trailer(self.f, self.dsets, crcs)
        except Exception as e:  # noqa: BLE001
            error = e
        try:
            with _hdf5_collective("file close (mpio)"):
                self.f.close()
        except Exception as e:  # noqa: BLE001
            error = error or e
        self.f = None
        self.agree("closing the checkpoint file", lambda: _raise(error))

    def _verify(self) -> None:
        if not self.mpio:
            if self.rank == 0:
                _fsync_during(self.tmp, lambda: verify_checkpoint(self.tmp, locking=False))
            return

        def mine():
            with CheckpointFile(self.tmp, locking=False) as f:
                f.verify_share(self.rank, self.comm.size)

        # each rank: fsync its own writes (from its own node's cache) while it verifies its share of the file
        _fsync_during(self.tmp, mine)

    def _publish(self) -> None:
        if self.rank == 0:
            release_reserve(self.tmp)
            os.replace(self.tmp, self.path)
            self.renamed = True
            fsync_dir(self.path.parent)

    def _abandon(self, collective: bool) -> None:
        """After a failure: close the file (collectively under mpio, when every rank does so now) and remove it."""
        if self.f is not None:
            if not self.mpio or collective:
                try:
                    with (
                        _hdf5_collective("file close after a failed save (mpio)")
                        if self.mpio
                        else contextlib.nullcontext()
                    ):
                        self.f.close()
                except Exception as e:  # noqa: BLE001 - the save has failed already
                    log.warning("closing %s after a failed save: %s", self.tmp, e)
            self.f = None
        if self.rank == 0 and self.tmp is not None and not self.renamed:
            _remove_quietly(self.tmp)


def write_checkpoint(path, outs: list[Out], header, comm, mpio: bool = False, step=None) -> None:
    """Write ``outs`` as the checkpoint ``path`` from every rank of ``comm`` (a hpc_llm.parallel.comm.Comm), each
    doing its part (every rank passes the same ``outs``); ``header``: a format.Header, or a function making one, used
    on rank 0 only. Raises SaveFailed on every rank if any rank failed."""
    Save(path, outs, header, comm, mpio and comm.size > 1, step, agree=True).run()
