"""The only place MPI is called. Every collective is a named method that records its bytes and seconds in a ledger.

`Comm` wraps one mpi4py communicator (the world, or a tensor- or data-parallel group made by `grid.py`). Buffers are
NumPy arrays passed straight to mpi4py (no pickling); a CuPy array is staged through host memory (no CUDA-aware
passthrough). A size-1 communicator skips MPI entirely, so single-process code pays nothing; that is also why
`mpi4py.MPI` is imported inside the functions that call it: importing it initialises MPI.

A wire format (`Comm.with_wire("bf16" | "fp16")`, parallel.act_comm): a view of the same group and ledger whose
float sum-allreduces, point-to-point transfers and the along-an-axis all-gather / reduce-scatter helpers move 16-bit
words (compression.py's pieces: the values rounded to the format, then a float32 power-of-two scale), with every sum
formed in fp32 by us in rank order; its other collectives (max / min, allgathers, the nonblocking ones) are the
plain view's. The activations' tensor-parallel collectives and the pipeline's messages use it; the cross-entropy,
norms and data parallelism keep fp32.
"""

from __future__ import annotations

import copy
import sys
import time
from collections import defaultdict

import numpy as np

from hpc_llm.backend import array_module, low_dtype
from hpc_llm.errors import JobError, UserError
from hpc_llm.parallel.compression import SCALE_WORDS, Reduce16, read16, scale_of, sum16, write16
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
        float sum-allreduce_, isend / irecv and _allgather_along_wire / _reduce_scatter_along_wire move `fmt`
        words, sums in fp32 (module docstring). "fp32": this Comm itself."""
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
        _allreduce_wire_)."""
        if self.size == 1:
            return buf
        if self.wire is not None and op == "sum" and buf.dtype.kind == "f":
            return self._allreduce_wire_(buf)
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
            return self._allgather_along_wire(x, axis)
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
            return self._reduce_scatter_along_wire(x, axis)
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

    # -- 16-bit wire collectives (with_wire's views; the module docstring) ---------------------------------------------
    # Each piece is compression.write16's: n words, then the sender's (fp16) or the owner's power-of-two scale. The
    # ledger counts the 16-bit words a collective's buffer holds (the fp32 path counts its fp32 buffer), under
    # "<group>.<collective>_<format>"; every wait is a Handle's, under the watchdog.

    def _low(self):
        return low_dtype(self.wire)

    def _allreduce_wire_(self, buf):
        """buf <- its sum over the group, in place, as the 16-bit gradient buckets are reduced (compression.Reduce16,
        without ZeRO-1): each rank's buffer rounded to the format and cut in near-equal pieces, an alltoallv of the
        words, each owner sums its piece over the ranks in fp32 in rank order and rounds the sum once, an allgatherv
        of the rounded words; every rank then holds bitwise the same widened result."""
        host = _host(buf)
        flat = host.reshape(-1)  # a view of a contiguous buffer, else a copy (written back below)
        n, p = flat.size, self.size
        counts = [n // p + (1 if r < n % p else 0) for r in range(p)]
        Reduce16(self, flat, counts, self._low(), zero=False, kind=f"allreduce_{self.wire}").wait()
        if not np.shares_memory(flat, host):
            host[...] = flat.reshape(host.shape)
        if host is not buf:
            buf[...] = array_module(buf).asarray(host)
        return buf

    def _reduce_scatter_along_wire(self, x, axis: int):
        """reduce_scatter_along's 16-bit twin: this rank's piece (piece `rank` of `size` equal ones along `axis`) of
        the sum of x over the group, a new float32 array. Each rank rounds x to the format into its send words,
        piece j for rank j (an alltoallv), and each sums what it receives in fp32 in rank order (compression.sum16):
        the sum is not rounded again (it does not travel)."""
        host = _host(x)
        p = self.size
        if p == 1:
            return x
        n, rest = divmod(host.shape[axis], p)
        if rest:
            raise ValueError(
                f"reduce_scatter_along: axis {axis} of shape {host.shape} is not divisible by the {p} ranks of "
                f"{self.name}"
            )
        pieces = np.moveaxis(
            host.reshape(*host.shape[:axis], p, n, *host.shape[axis + 1 :]), axis, 0
        )
        c, low = pieces[0].size, self._low()
        s = scale_of(self.wire, host)
        send = np.empty(p * (c + SCALE_WORDS), dtype=np.uint16)
        for j in range(p):  # piece j (a copy first only if it is not contiguous)
            write16(send, j * (c + SCALE_WORDS), pieces[j].reshape(-1), low, s)
        recv = np.empty_like(send)
        counts = [c + SCALE_WORDS] * p
        kind = f"reduce_scatter_{self.wire}"
        self.ialltoallv_(send, counts, recv, counts, kind=kind, nbytes=send.nbytes).wait()
        del send
        out = sum16(recv, p, c, low).reshape(pieces.shape[1:]).astype(host.dtype, copy=False)
        return out if isinstance(x, np.ndarray) else array_module(x).asarray(out)

    def _allgather_along_wire(self, x, axis: int):
        """allgather_along's 16-bit twin: every rank's x rounded to the format (its own included, so every rank
        holds bitwise the same result), concatenated along `axis` in rank order, widened: a new array."""
        host = _host(x)
        p = self.size
        if p == 1:
            return x
        c, low = host.size, self._low()
        words = np.empty(p * (c + SCALE_WORDS), dtype=np.uint16)
        write16(
            words, self.rank * (c + SCALE_WORDS), host.reshape(-1), low, scale_of(self.wire, host)
        )
        kind = f"allgather_{self.wire}"
        self.iallgatherv_(words, [c + SCALE_WORDS] * p, kind=kind, nbytes=words.nbytes).wait()
        full = np.empty((p, *host.shape), dtype=host.dtype)
        for k in range(p):
            read16(words, k * (c + SCALE_WORDS), c, low, full[k].reshape(-1))
        del words
        full = (
            full.reshape(p * host.shape[0], *host.shape[1:])
            if axis == 0
            else np.concatenate(full, axis=axis)
        )
        return full if isinstance(x, np.ndarray) else array_module(x).asarray(full)

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
        host = _host(buf)
        if self.wire is not None:
            words = np.empty(host.size + SCALE_WORDS, dtype=np.uint16)
            write16(words, 0, host.reshape(-1), self._low(), scale_of(self.wire, host))
            host = words
        send = self.mpi.Issend if synchronous else self.mpi.Isend
        return Handle(self, f"{self.name}.{kind}", send(host, dest=dest, tag=tag), host.nbytes)

    def irecv(self, buf, source: int, tag: int, kind: str) -> Handle:
        """Start receiving into buf from rank `source`; buf holds the message after the handle's wait(). On a wire
        view the 16-bit words land in a buffer of their own, widened into buf by the wait()."""
        host = _host(buf)
        if self.wire is not None:
            words, low = np.empty(host.size + SCALE_WORDS, dtype=np.uint16), self._low()

            def widen():
                if host is buf and buf.dtype == np.float32 and buf.flags.c_contiguous:
                    read16(words, 0, host.size, low, buf.reshape(-1))  # straight into buf
                else:
                    vals = read16(words, 0, host.size, low).reshape(buf.shape)
                    buf[...] = array_module(buf).asarray(vals)

            return Handle(
                self,
                f"{self.name}.{kind}",
                self.mpi.Irecv(words, source=source, tag=tag),
                words.nbytes,
                widen,
            )
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


class PipelineComm:
    """Activations forward and their gradients backward between pipeline neighbours (the pp group), Megatron's
    send_forward / recv_forward / send_backward / recv_backward and the combined steps.

    Everything is nonblocking. A receive is posted as soon as the schedule knows it comes next (paired with the send
    of the op before it) and waited for when its op starts, so a rank waits only for data its schedule needs next,
    which a deadlock-free op order (schedule.simulate checks them) guarantees is on its way, at any P. A send is
    posted and kept until it completes; `settle()`, at each op boundary once the op's send and the next op's receive
    are posted, completes the sends already delivered (MPI_Test) and then, while more than `depth` sends in one
    direction are incomplete, waits for the oldest. So at most `depth` sends per direction live across an op (one
    more only inside that wait), and every other send's buffer goes at the first op boundary after its delivery;
    `wait_sends()` completes the rest at the step's end. depth None: unbounded (every send until delivered or the
    step's end). The trainer's depth is schedule.send_depth's: the least that neither deadlocks nor lengthens the
    step, even if every send completes only once its receive is posted (rendezvous).

    On a wire view of the pp group (Comm.with_wire: parallel.act_comm) every message is 16-bit words in a buffer of
    its own (Comm.isend / irecv), so the buffer a send holds is half the activation's size.

    Virtual stage s lives on rank rank_of(s), by default s % P: forward messages go to rank + 1, backward ones to
    rank - 1 (cyclically, for interleaved chunks); in a V (schedule.stage_rank) the second chunk's go the other way.
    The tag names (micro-batch, receiving virtual stage, direction), so a message can only match the receive it is
    meant for.
    """

    FORWARD, BACKWARD = 0, 1

    def __init__(self, comm: Comm, n_virtual: int, depth: int | None = None, rank_of=None):
        self.comm, self.n_virtual, self.depth = comm, n_virtual, depth
        self.rank_of = rank_of if rank_of is not None else (lambda s: s % comm.size)
        self._sends: tuple[list[Handle], list[Handle]] = ([], [])  # per direction, oldest first
        # per direction, the most sends incomplete across an op (after settle()), over this object's life
        self.held_max = [0, 0]
        self.depth_waits = 0  # sends settle() waited for (the bound at work)
        self.synchronous = (
            False  # tests: every send an MPI_Issend, complete only once matched (the worst case)
        )

    def _post_send(self, direction: int, handle: Handle) -> None:
        self._sends[direction].append(handle)

    def progress(self) -> None:
        """Complete the sends already delivered: their ledger entries are made and their buffers freed now."""
        for sends in self._sends:
            done = [h.test() for h in sends]
            for h, ok in zip(sends, done):
                if ok:
                    h.wait()  # done: records it in the ledger, drops the buffer
            sends[:] = [h for h, ok in zip(sends, done) if not ok]

    def settle(self) -> None:
        """The op boundary: the delivered sends completed, then the oldest waited for while more than `depth` of one
        direction remain. Call it after the next op's receive is posted (pipeline.run_schedule), never before: a
        neighbour may be waiting for that receive to take the very send waited for here."""
        self.progress()
        for d, sends in enumerate(self._sends):
            while self.depth is not None and len(sends) > self.depth:
                sends.pop(0).wait()
                self.depth_waits += 1
            self.held_max[d] = max(self.held_max[d], len(sends))

    def _tag(self, direction: int, micro: int, vstage: int) -> int:
        return (micro * self.n_virtual + vstage) * 2 + direction

    def send_forward(self, x, micro: int, vstage: int) -> None:
        """The output of virtual stage `vstage` to the next one."""
        tag = self._tag(self.FORWARD, micro, vstage + 1)
        self._post_send(
            self.FORWARD,
            self.comm.isend(x, self.rank_of(vstage + 1), tag, "send_forward", self.synchronous),
        )

    def recv_forward(self, buf, micro: int, vstage: int) -> Handle:
        """Start receiving the input of virtual stage `vstage` from the previous one into buf."""
        return self.comm.irecv(
            buf, self.rank_of(vstage - 1), self._tag(self.FORWARD, micro, vstage), "recv_forward"
        )

    def send_backward(self, dx, micro: int, vstage: int) -> None:
        """The input gradient of virtual stage `vstage` to the previous one."""
        tag = self._tag(self.BACKWARD, micro, vstage - 1)
        self._post_send(
            self.BACKWARD,
            self.comm.isend(dx, self.rank_of(vstage - 1), tag, "send_backward", self.synchronous),
        )

    def recv_backward(self, buf, micro: int, vstage: int) -> Handle:
        """Start receiving the output gradient of virtual stage `vstage` from the next one into buf."""
        return self.comm.irecv(
            buf, self.rank_of(vstage + 1), self._tag(self.BACKWARD, micro, vstage), "recv_backward"
        )

    def send_forward_recv_backward(
        self, x, micro: int, vstage: int, buf, recv_micro: int, recv_vstage: int
    ):
        """1F1B's steady state: this forward's output goes on while the next backward's gradient comes in."""
        self.send_forward(x, micro, vstage)
        return self.recv_backward(buf, recv_micro, recv_vstage)

    def send_backward_recv_forward(
        self, dx, micro: int, vstage: int, buf, recv_micro: int, recv_vstage: int
    ):
        """1F1B's steady state: this backward's input gradient goes back while the next forward's input comes in."""
        self.send_backward(dx, micro, vstage)
        return self.recv_forward(buf, recv_micro, recv_vstage)

    def wait_sends(self) -> None:
        """The step's end: every send completed."""
        for sends in self._sends:
            for h in sends:
                h.wait()
            sends.clear()
