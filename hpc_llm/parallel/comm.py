"""The only place MPI is called. Every collective is a named method that records its bytes and seconds in a ledger.

`Comm` wraps one mpi4py communicator (the world, or a tensor- or data-parallel group made by `grid.py`). Buffers are
NumPy arrays passed straight to mpi4py (no pickling); a CuPy array is staged through host memory (no CUDA-aware
passthrough). A size-1 communicator skips MPI entirely, so single-process code pays nothing; that is also why
`mpi4py.MPI` is imported inside the functions that call it: importing it initialises MPI.

A wire format (`Comm.with_wire("bf16" | "fp16")`, parallel.act_comm): a view of the same group and ledger whose
float sum-allreduces, point-to-point transfers and the along-an-axis all-gather / reduce-scatter helpers move 16-bit
words (wire16.py: compression.py's pieces, the values rounded to the format, then a float32 power-of-two scale),
with every sum formed in fp32 by us in rank order; its other collectives (max / min, allgathers, the nonblocking ones)
are the plain view's. The activations' tensor-parallel collectives and the pipeline's messages use it; the
cross-entropy, norms and data parallelism keep fp32. Pipeline neighbours talk through pipeline_comm.PipelineComm.
"""

from __future__ import annotations

import copy
import sys
import time
from collections import defaultdict

import numpy as np

from hpc_llm.backend import array_module, low_dtype
from hpc_llm.errors import JobError, UserError
from hpc_llm.parallel import wire16
from hpc_llm.runtime.faults import WATCHDOG, failure_line, init_mpi, traceback_of


class Ledger:
    """Bytes and seconds per collective kind since the last `reset()` (one training step, in the trainer)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.bytes = defaultdict(int)
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)

    def add(self, kind: str, nbytes: int, seconds: float) -> None:
        self.bytes[kind] += nbytes
        self.seconds[kind] += seconds
        self.calls[kind] += 1

    def summary(self) -> dict:
        return {
            k: {"bytes": self.bytes[k], "seconds": self.seconds[k], "calls": self.calls[k]}
            for k in self.bytes
        }


class Handle:
    """A nonblocking collective in flight; `wait()` completes it (and records the time spent waiting)."""

    def __init__(self, comm: Comm, kind: str, request, nbytes: int, finish=None):
        self.comm, self.kind, self.request, self.nbytes, self.finish = (
            comm,
            kind,
            request,
            nbytes,
            finish,
        )

    def test(self) -> bool:
        """Let MPI progress the collective (most MPI libraries move data only inside MPI calls); True when done."""
        return self.request is None or self.request.Test()

    def wait(self) -> None:
        t0 = time.perf_counter()
        if self.request is not None:
            WATCHDOG.enter(self.kind)
            try:
                self.request.Wait()
            finally:
                WATCHDOG.leave()
        if self.finish is not None:
            self.finish()
        self.comm.ledger.add(self.kind, self.nbytes, time.perf_counter() - t0)


def _host(x):
    """The NumPy view (or host copy) of a buffer for MPI."""
    return x if isinstance(x, np.ndarray) else x.get()


def _copy_back(buf, host):
    """A nonblocking call's finish when MPI worked on `host`, a host copy of buf (CuPy): the result copied back into
    buf once it completes; None when host is buf itself."""
    if host is buf:
        return None
    return lambda: buf.__setitem__(Ellipsis, array_module(buf).asarray(host))


class Comm:
    def __init__(self, mpi_comm=None, ledger: Ledger | None = None, name: str = "world"):
        self.mpi = mpi_comm
        self.rank = 0 if mpi_comm is None else mpi_comm.Get_rank()
        self.size = 1 if mpi_comm is None else mpi_comm.Get_size()
        self.ledger = ledger if ledger is not None else Ledger()
        self.name = name
        self.wire = None  # a with_wire view's 16-bit format ("bf16" | "fp16")

    def with_wire(self, fmt: str) -> Comm:
        """This group (the same communicator, rank, name and ledger) with activations on a 16-bit wire: its
        float sum-allreduce_, isend / irecv and allgather_along / reduce_scatter_along move `fmt` words
        (wire16.py), sums in fp32. "fp32": this Comm itself."""
        if fmt == "fp32":
            return self
        low_dtype(fmt)  # bf16 needs ml_dtypes: its one-line error here
        view = copy.copy(self)
        view.wire, view._plain = fmt, self.plain
        return view

    @property
    def plain(self) -> Comm:
        """This group without a wire (itself when it has none): for sums that must stay fp32 (the cross-entropy's)."""
        return self._plain if self.wire is not None else self

    def _op(self, op: str):
        from mpi4py import MPI

        return {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]

    def _timed(self, kind: str, nbytes: int, fn) -> None:
        t0 = time.perf_counter()
        self._watched(f"{self.name}.{kind}", fn)
        self.ledger.add(f"{self.name}.{kind}", nbytes, time.perf_counter() - t0)

    def _watched(self, op: str, fn):
        """fn() (an MPI call) under the watchdog: a wait longer than parallel.comm_timeout_s aborts the job."""
        WATCHDOG.enter(f"{op} ({self.size} ranks)")
        try:
            return fn()
        finally:
            WATCHDOG.leave()

    # -- collectives on arrays, in place ------------------------------------------------------------------------------

    def allreduce_(self, buf, op: str = "sum"):
        """buf <- reduction of buf over the group, in place (on a wire view, a float sum travels in 16 bits:
        wire16.allreduce_)."""
        if self.size == 1:
            return buf
        if self.wire is not None and op == "sum" and buf.dtype.kind == "f":
            return wire16.allreduce_(self, buf)
        from mpi4py import MPI

        host = _host(buf)
        self._timed(
            "allreduce",
            host.nbytes,
            lambda: self.mpi.Allreduce(MPI.IN_PLACE, host, op=self._op(op)),
        )
        if host is not buf:
            buf[...] = array_module(buf).asarray(host)
        return buf

    def iallreduce_(self, buf, kind: str = "allreduce") -> Handle:
        """Start a sum-allreduce of buf in place; the returned handle's wait() completes it. `kind`: its ledger name
        (PowerSGD's factors: powersgd_p, powersgd_q)."""
        if self.size == 1:
            return Handle(self, f"{self.name}.{kind}", None, 0)
        from mpi4py import MPI

        host = _host(buf)
        req = self.mpi.Iallreduce(MPI.IN_PLACE, host, op=MPI.SUM)
        finish = _copy_back(buf, host)
        return Handle(self, f"{self.name}.{kind}", req, host.nbytes, finish)

    def ireduce_scatter_(self, buf, counts: list[int]) -> Handle:
        """Start a sum-reduce-scatter of buf in place: rank r's reduced piece lands in buf at its own offset
        (sum(counts[:r]), length counts[r]); the rest of buf is left as it was."""
        if self.size == 1:
            return Handle(self, f"{self.name}.reduce_scatter", None, 0)
        from mpi4py import MPI

        host = _host(buf)
        offset = sum(counts[: self.rank])
        recv = np.empty(counts[self.rank], dtype=host.dtype)
        req = self.mpi.Ireduce_scatter(host, recv, counts, op=MPI.SUM)

        def finish():
            piece = buf[offset : offset + counts[self.rank]]
            piece[...] = recv if host is buf else array_module(buf).asarray(recv)

        return Handle(self, f"{self.name}.reduce_scatter", req, host.nbytes, finish)

    def allgather_(self, buf, counts: list[int]) -> None:
        """buf holds each rank's piece at its offset (sum(counts[:r]), counts[r]); afterwards every rank has all."""
        if self.size == 1:
            return
        from mpi4py import MPI

        host = _host(buf)
        displs = [sum(counts[:r]) for r in range(self.size)]
        self._timed(
            "allgather",
            host.nbytes,
            lambda: self.mpi.Allgatherv(MPI.IN_PLACE, [host, (counts, displs)]),
        )
        if host is not buf:
            buf[...] = array_module(buf).asarray(host)

    def allgather(self, x) -> np.ndarray:
        """Every rank's array x (the same shape and dtype on all), stacked in rank order: (size, *x.shape), on every
        rank. For small host arrays (inference: each rank's sampling candidates over its vocabulary shard)."""
        x = np.ascontiguousarray(_host(x))
        out = np.empty((self.size, *x.shape), dtype=x.dtype)
        if self.size == 1:
            out[0] = x
            return out
        self._timed("allgather", out.nbytes, lambda: self.mpi.Allgather(x, out))
        return out

    # -- sequence parallelism: an array cut into equal pieces along one axis (model/tensor_parallel.py) --------------

    def allgather_along(self, x, axis: int):
        """The whole array from every rank's piece x (the same shape and dtype on all): the pieces concatenated along
        `axis` in rank order, a new array (x itself when alone). MPI delivers them stacked (size, *x.shape) in a
        receive buffer, and the concatenation copies them out of it: two arrays of the whole size at the peak, the
        receive buffer freed on return (none when axis is the leading one: the stack is then the result)."""
        if self.size == 1:
            return x
        if self.wire is not None and x.dtype.kind == "f":
            return wire16.allgather_along(self, x, axis)
        host = np.ascontiguousarray(_host(x))
        recv = np.empty((self.size, *host.shape), dtype=host.dtype)
        self._timed("allgather", recv.nbytes, lambda: self.mpi.Allgather(host, recv))
        full = (
            recv.reshape(self.size * host.shape[0], *host.shape[1:])
            if axis == 0
            else np.concatenate(recv, axis=axis)
        )
        return full if isinstance(x, np.ndarray) else array_module(x).asarray(full)

    def reduce_scatter_along(self, x, axis: int):
        """This rank's piece of the sum of x over the group (the same shape and dtype on every rank): the sum cut into
        `size` equal pieces along `axis`, piece `rank`, a new array (x itself when alone). The pieces are first
        copied into rank order (a send buffer of x's size; none when axis is the leading one)."""
        if self.size == 1:
            return x
        if self.wire is not None and x.dtype.kind == "f":
            return wire16.reduce_scatter_along(self, x, axis)
        from mpi4py import MPI

        host = _host(x)
        n, rest = divmod(host.shape[axis], self.size)
        if rest:
            raise ValueError(
                f"reduce_scatter_along: axis {axis} of shape {host.shape} is not divisible by the {self.size} "
                f"ranks of {self.name}"
            )
        split = host.reshape(*host.shape[:axis], self.size, n, *host.shape[axis + 1 :])
        send = np.ascontiguousarray(np.moveaxis(split, axis, 0))
        recv = np.empty(send.shape[1:], dtype=host.dtype)
        self._timed(
            "reduce_scatter",
            host.nbytes,
            lambda: self.mpi.Reduce_scatter_block(send, recv, op=MPI.SUM),
        )
        return recv if isinstance(x, np.ndarray) else array_module(x).asarray(recv)

    # -- raw-byte collectives for compressed gradients (parallel/compression.py) --------------------------------------
    # MPI has no standard 16-bit floating reduction, so 16-bit buffers only travel here (as uint16 words: bf16 has no
    # MPI datatype, and moving bits needs none); their sums are formed in fp32 by the caller. `kind` and `nbytes` name
    # and size the ledger entry (the caller's convention: the bytes of the buffer, as nccl-tests counts them).

    def ialltoallv_(
        self,
        send,
        send_counts: list[int],
        recv,
        recv_counts: list[int],
        kind: str = "alltoallv",
        nbytes: int | None = None,
    ) -> Handle:
        """Start an alltoallv: send[sum(send_counts[:j]):][:send_counts[j]] goes to rank j, and what rank j sends
        here lands in recv at sum(recv_counts[:j]). Both buffers must stay untouched until the handle's wait()."""
        host_send = _host(send)
        nbytes = host_send.nbytes if nbytes is None else nbytes
        if self.size == 1:
            recv[...] = send
            return Handle(self, f"{self.name}.{kind}", None, 0)
        host_recv = _host(recv)

        def displs(counts):
            return [sum(counts[:r]) for r in range(len(counts))]

        req = self.mpi.Ialltoallv(
            [host_send, (send_counts, displs(send_counts))],
            [host_recv, (recv_counts, displs(recv_counts))],
        )
        finish = _copy_back(recv, host_recv)
        return Handle(self, f"{self.name}.{kind}", req, nbytes, finish)

    def iallgatherv_(
        self, buf, counts: list[int], kind: str = "allgather", nbytes: int | None = None
    ) -> Handle:
        """Start an in-place allgatherv: buf holds each rank's piece at its offset (sum(counts[:r]), counts[r]);
        after the handle's wait() every rank has all of them."""
        host = _host(buf)
        nbytes = host.nbytes if nbytes is None else nbytes
        if self.size == 1:
            return Handle(self, f"{self.name}.{kind}", None, 0)
        from mpi4py import MPI

        displs = [sum(counts[:r]) for r in range(self.size)]
        req = self.mpi.Iallgatherv(MPI.IN_PLACE, [host, (counts, displs)])
        finish = _copy_back(buf, host)
        return Handle(self, f"{self.name}.{kind}", req, nbytes, finish)

    def dup(self, name: str) -> Comm:
        """A duplicate of this group (collective over it), sharing the ledger: collectives on it are ordered apart
        from this one's, so two chains of nonblocking collectives may each be started in their own order."""
        if self.size == 1:
            return Comm(None, self.ledger, name)
        return Comm(self._watched(f"{self.name}.dup", self.mpi.Dup), self.ledger, name)

    # -- point to point ------------------------------------------------------------------------------------------------

    def isend(self, buf, dest: int, tag: int, kind: str, synchronous: bool = False) -> Handle:
        """Start sending buf to rank `dest` of this group; buf must stay unchanged until the handle's wait(). On a
        wire view the message is buf's values rounded to the format, as 16-bit words (compression.write16: n words
        and the scale), in a buffer of their own: buf may change at once. synchronous: MPI_Issend, completing only
        once the receive is matched (the tests' worst case of a send)."""
        host = wire16.message_words(self.wire, buf) if self.wire is not None else _host(buf)
        send = self.mpi.Issend if synchronous else self.mpi.Isend
        return Handle(self, f"{self.name}.{kind}", send(host, dest=dest, tag=tag), host.nbytes)

    def irecv(self, buf, source: int, tag: int, kind: str) -> Handle:
        """Start receiving into buf from rank `source`; buf holds the message after the handle's wait(). On a wire
        view the 16-bit words land in a buffer of their own, widened into buf by the wait()."""
        if self.wire is not None:
            words, fmt = wire16.message_buffer(buf.size), self.wire
            return Handle(
                self,
                f"{self.name}.{kind}",
                self.mpi.Irecv(words, source=source, tag=tag),
                words.nbytes,
                lambda: wire16.widen_message(fmt, words, buf),
            )
        host = _host(buf)
        finish = _copy_back(buf, host)
        return Handle(
            self,
            f"{self.name}.{kind}",
            self.mpi.Irecv(host, source=source, tag=tag),
            host.nbytes,
            finish,
        )

    # -- small agreements (principle 8: all ranks agree before they act) ----------------------------------------------

    def allreduce_scalar(self, value: float, op: str = "sum") -> float:
        if self.size == 1:
            return value
        return self._watched(
            f"{self.name}.allreduce_scalar", lambda: self.mpi.allreduce(value, op=self._op(op))
        )

    def agree(self, fn, what: str = "an agreed step"):
        """Run fn() on every rank and make its outcome the same on all of them, so no rank goes on into a collective
        the others never reach: a UserError on any rank is raised on all (the lowest failing rank's message); any
        other exception on any rank becomes one JobError on all, naming the rank, its phase and the error (that
        rank raises it from the original, whose traceback it prints). fn must not communicate.

        This is the one way ranks reach a common decision on something only some of them can see."""
        error, result, exc = None, None, None
        try:
            result = fn()
        except UserError as e:
            error = ("user", str(e))
        except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks, whatever it is
            exc, error = e, ("job", failure_line(e))
        if self.size > 1:
            self.wait_idle(what)
            errors = self._watched(f"{self.name}.agree", lambda: self.mpi.allgather(error))
            user = next((e for e in errors if e and e[0] == "user"), None)
            error = user or next((e for e in errors if e), None)
        if error is None:
            return result
        if error[0] == "user":
            raise UserError(error[1])
        if exc is not None:
            sys.stderr.write(traceback_of(exc))
            sys.stderr.flush()
            raise JobError(error[1]) from exc
        raise JobError(error[1])

    def wait_idle(self, what: str = "a barrier", poll_s: float = 5e-4) -> None:
        """A barrier that sleeps while it waits. MPI's own busy-polls: ranks that wait for one rank's long local work
        (rank 0 writing a checkpoint) would take the cores it and its I/O threads need (oversubscribed nodes)."""
        if self.size == 1:
            return
        req = self.mpi.Ibarrier()

        def wait():
            while not req.Test():
                time.sleep(poll_s)

        self._watched(f"{self.name}.barrier ({what})", wait)

    def allgather_objects(self, obj) -> list:
        """Small Python objects (checksums, flags) from every rank, on every rank."""
        if self.size == 1:
            return [obj]
        return self._watched(f"{self.name}.allgather_objects", lambda: self.mpi.allgather(obj))

    def bcast_object(self, obj, root: int = 0):
        """A small Python object from root to every rank (a decision one rank made: which checkpoint to resume)."""
        if self.size == 1:
            return obj
        return self._watched(f"{self.name}.bcast", lambda: self.mpi.bcast(obj, root=root))

    def barrier(self) -> None:
        if self.size > 1:
            self._watched(f"{self.name}.barrier", self.mpi.Barrier)


def world_comm() -> Comm:
    """MPI.COMM_WORLD as a Comm; in a process started without mpiexec, one that never calls MPI. MPI_Init, when
    this starts it, is watched (faults.init_mpi)."""
    init_mpi()
    from mpi4py import MPI

    return Comm(MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None)
