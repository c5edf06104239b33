"""Activations forward and their gradients backward between pipeline neighbours: PipelineComm, over the pp group's
Comm (whose isend / irecv make every MPI call and wait)."""

from __future__ import annotations

from hpc_llm.parallel.comm import Comm, Handle


class PipelineComm:
    """Activations forward and their gradients backward between pipeline neighbours (the pp group), Megatron's
    send_forward / recv_forward / send_backward / recv_backward and the combined steps.

    Everything is nonblocking. A receive is posted as soon as the schedule knows it comes next (paired with the send
    of the op before it) and waited for when its op starts, so a rank waits only for data its schedule needs next,
    which a deadlock-free op order (schedule_timing.simulate checks them) guarantees is on its way, at any P. A send is
    posted and kept until it completes; `settle()`, at each op boundary once the op's send and the next op's receive
    are posted, completes the sends already delivered (MPI_Test) and then, while more than `depth` sends in one
    direction are incomplete, waits for the oldest. So at most `depth` sends per direction live across an op (one
    more only inside that wait), and every other send's buffer goes at the first op boundary after its delivery;
    `wait_sends()` completes the rest at the step's end. depth None: unbounded (every send until delivered or the
    step's end). The trainer's depth is schedule_timing.send_depth's: the least that neither deadlocks nor lengthens the
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
