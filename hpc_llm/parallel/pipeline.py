"""Forward and backward passes of one training step through the pipeline: each rank runs its schedule's op list
(schedule.py) in order, in this one loop, whatever the schedule (and at pp = 1, where 1F1B is forward, backward,
micro-batch after micro-batch).

    F(micro, chunk)  input: the micro-batch's tokens (first stage) or the previous stage's activation (received);
                     the chunk's forward; output: the loss (last stage, kept) or the activation, sent on.
    B(micro, chunk)  input: the gradient of that output (received from the next stage, or the loss's);
                     the chunk's backward with the cache its forward left; the input gradient sent back. Where
                     the list has W(micro, chunk) too (zero-bubble schedules), only the input gradient
                     (Chunk.backward_input), keeping what W needs.
    W(micro, chunk)  the weight gradients B left (Chunk.backward_weight); nothing received or sent.

An output whose consumer is this rank's other chunk (the V's turn of "zbv": virtual stages p - 1 and p on rank p - 1)
is handed over in memory instead of sent.

Receives are posted right after the op before them (paired with its send: PipelineComm's combined steps) and waited
for when their op starts. Only after that receive is posted does `PipelineComm.settle` bound the sends in flight (at
most its depth per direction live across an op; those delivered are completed at every op boundary): waiting for an
old send before posting the next receive could leave two neighbours each waiting for the other to receive.

Each chunk's first backward (or W) of the step overwrites its gradients and later ones add to them, micro-batch by
micro-batch in order (every schedule keeps that order), so the gradient sums are formed as in the single process.
During a chunk's last backward (or W), grad_ready reports its finished gradients to the data-parallel buckets, once
the chunks behind it in the flat buffer are final too.
"""

from __future__ import annotations

from hpc_llm.parallel.pipeline_comm import PipelineComm
from hpc_llm.parallel.schedule import Op, Phase


def _source(model, op: Op) -> int | None:
    """The virtual stage op's input comes from (the previous one's F, the next one's B), None if it needs none (the
    tokens, the loss, a W)."""
    chunk = model.chunks[op.chunk]
    if op.kind == Phase.WEIGHT:
        return None
    if op.kind == Phase.FORWARD:
        return None if chunk.embedding is not None else chunk.vstage - 1
    return None if chunk.head is not None else chunk.vstage + 1


def _needs_input(model, op: Op) -> bool:
    """Whether op waits for a message (its input made on another rank)."""
    s = _source(model, op)
    return s is not None and s not in model.plan.chunks


def run_schedule(
    model,
    ops: list[Op],
    pipe: PipelineComm | None,
    micro_batch,
    loss_scale: float,
    act_shape: tuple,
    grad_ready=None,
) -> dict[int, float]:
    """Run `ops` on this rank. micro_batch(micro) -> (tokens, targets, dropout rng) of this rank's rows; loss_scale
    multiplies every micro-batch's loss in backward; act_shape: an activation's shape (model.act_shape: (rows, T, C),
    T/tp with sequence parallelism), that of every message. Returns {micro: loss} on the last stage ({} elsewhere)."""
    losses, caches, grads = {}, {}, _Gradients(model, ops, grad_ready)
    # the V's turn (schedule.V_SHAPED): outputs whose consumer is this rank's other chunk, by (kind, micro, its
    # virtual stage); handed over as copies, since the consumer updates its input in place and the producer's
    # deferred W may still read the array
    local = {}
    pending = None  # (handle, buffer) of the receive posted for the current op
    for k, op in enumerate(ops):
        chunk = model.chunks[op.chunk]
        inp = local.pop((op.kind, op.micro, chunk.vstage), None)
        if _needs_input(model, op):
            handle, inp = (
                pending if pending is not None else _post(model, pipe, op, act_shape, None, None)
            )
            handle.wait()
            pipe.progress()  # sends delivered meanwhile: their buffers go before this op's compute
        if op.kind == Phase.FORWARD:
            x, y, rng = micro_batch(op.micro)
            out, caches[op.micro, op.chunk] = chunk.forward(
                x if chunk.embedding else inp, y if chunk.head else None, rng
            )
            if chunk.head is not None:
                losses[op.micro] = out
            send = None if chunk.head is not None else out
        elif op.kind == Phase.BACKWARD:
            send = grads.backward(k, op, inp, caches.pop((op.micro, op.chunk)), loss_scale)
        else:
            send = grads.weight(k, op)
        if send is not None:
            to = chunk.vstage + (1 if op.kind == Phase.FORWARD else -1)
            if to in model.plan.chunks:
                local[op.kind, op.micro, to] = send.copy()
                send = None
        nxt = ops[k + 1] if k + 1 < len(ops) and _needs_input(model, ops[k + 1]) else None
        pending = None
        if nxt is not None:
            pending = _post(model, pipe, nxt, act_shape, op if send is not None else None, send)
        elif send is not None:
            _send(pipe, op, model.chunks[op.chunk].vstage, send)
        # no activation held across ops by the loop: a send's buffer is its request's (16-bit: the words only)
        inp = out = send = None
        if pipe is not None:
            pipe.settle()  # after the next receive is posted: the bound's wait cannot hold a neighbour up
    assert not caches and not grads.weights and not local, (
        f"left in flight: {sorted(caches)} {sorted(grads.weights)} {sorted(local)}"
    )
    if pipe is not None:
        pipe.wait_sends()
    return losses


class _Gradients:
    """The gradient-writing ops of one step on this rank: each (micro, chunk)'s backward, or its B and then its W
    where the list has that W. Knows which op is a chunk's first (it overwrites) and last (grad_ready)."""

    def __init__(self, model, ops: list[Op], grad_ready):
        self.model, self.grad_ready = model, grad_ready
        self.split = {(op.micro, op.chunk) for op in ops if op.kind == Phase.WEIGHT}
        self.last = {
            op.chunk: k
            for k, op in enumerate(ops)
            if op.kind == Phase.WEIGHT
            or (op.kind == Phase.BACKWARD and (op.micro, op.chunk) not in self.split)
        }
        # heads: the chunks whose head has had its gradients written (by a B: Chunk.backward_input runs its W)
        self.weights, self.started, self.final, self.heads = {}, set(), set(), set()

    def backward(self, k: int, op: Op, dout, cache, loss_scale: float):
        """B, or the whole backward: -> the input gradient."""
        chunk = self.model.chunks[op.chunk]
        if (op.micro, op.chunk) in self.split:
            dx, self.weights[op.micro, op.chunk] = chunk.backward_input(
                dout, cache, loss_scale, head_accumulate=op.chunk in self.heads
            )
            self.heads.add(op.chunk)
            return dx
        accumulate, ready = self._writes(k, op)
        self.heads.add(op.chunk)
        return chunk.backward(dout, cache, loss_scale, accumulate, ready)

    def weight(self, k: int, op: Op) -> None:
        accumulate, ready = self._writes(k, op)
        self.model.chunks[op.chunk].backward_weight(
            self.weights.pop((op.micro, op.chunk)), accumulate, ready
        )

    def _writes(self, k: int, op: Op):
        """-> (accumulate, grad_ready or None) for op k, which writes op.chunk's gradients."""
        last = k == self.last[op.chunk]
        behind_final = all(c in self.final for c in range(op.chunk + 1, len(self.model.chunks)))
        accumulate = op.chunk in self.started
        self.started.add(op.chunk)
        if last:
            self.final.add(op.chunk)
        return accumulate, self.grad_ready if last and behind_final else None


def _send(pipe: PipelineComm, op: Op, vstage: int, x) -> None:
    (pipe.send_forward if op.kind == Phase.FORWARD else pipe.send_backward)(x, op.micro, vstage)


def _post(model, pipe: PipelineComm, nxt: Op, act_shape: tuple, op: Op | None, send):
    """Post the receive of op `nxt`'s input, after sending `op`'s output if there is one: together, as one of
    Megatron's combined steps, where 1F1B's steady state pairs them. -> (handle, buffer)."""
    buf = model.xp.empty(act_shape, dtype=model.dtype)
    n_vstage = model.chunks[nxt.chunk].vstage
    if op is not None:
        vstage = model.chunks[op.chunk].vstage
        if op.kind == Phase.FORWARD and nxt.kind == Phase.BACKWARD:
            return pipe.send_forward_recv_backward(
                send, op.micro, vstage, buf, nxt.micro, n_vstage
            ), buf
        if op.kind == Phase.BACKWARD and nxt.kind == Phase.FORWARD:
            return pipe.send_backward_recv_forward(
                send, op.micro, vstage, buf, nxt.micro, n_vstage
            ), buf
        _send(pipe, op, vstage, send)
    recv = pipe.recv_forward if nxt.kind == Phase.FORWARD else pipe.recv_backward
    return recv(buf, nxt.micro, n_vstage), buf


def forward_only(model, pipe: PipelineComm | None, x, y):
    """One batch's loss through the pipeline without backward (evaluation): this rank's chunks in order, each
    waiting for its input from the previous virtual stage. The loss on the last stage, None elsewhere."""
    loss = out = None
    held = model.plan.chunks
    for chunk in model.chunks:
        inp = x
        if chunk.vstage - 1 in held:  # the V's turn: the other chunk's output, here
            inp = out
        elif chunk.embedding is None:
            inp = model.xp.empty(model.act_shape(*x.shape), dtype=model.dtype)
            pipe.recv_forward(inp, 0, chunk.vstage).wait()
        out, _ = chunk.forward(inp, y if chunk.head else None, keep_cache=False)
        if chunk.head is not None:
            loss = out
        elif chunk.vstage + 1 not in held:
            pipe.send_forward(out, 0, chunk.vstage)
            pipe.settle()
    if pipe is not None:
        pipe.wait_sends()
    return loss
