"""Forward and backward passes of one training step through the pipeline: each rank runs its schedule's op list
(schedule.py) in order, in this one loop, whatever the schedule (and at pp = 1, where 1F1B is forward, backward,
micro-batch after micro-batch).

    F(micro, chunk)  input: the micro-batch's tokens (first stage) or the previous stage's activation (received);
                     the chunk's forward; output: the loss (last stage, kept) or the activation, sent on.
    B(micro, chunk)  input: the gradient of that output (received from the next stage, or the loss's);
                     the chunk's backward with the cache its forward left; the input gradient sent back.

Receives are posted right after the op before them (paired with its send: PipelineComm's combined steps) and waited
for when their op starts; sends complete at the end of the step. Each chunk's first backward of the step overwrites
its gradients and later ones add to them, micro-batch by micro-batch in order (every schedule keeps that order), so
the gradient sums are formed as in the single process. During a chunk's last backward, grad_ready reports its
finished gradients to the data-parallel buckets, once the chunks behind it in the flat buffer are final too.
"""

from __future__ import annotations

from hpc_llm.parallel.comm import PipelineComm
from hpc_llm.parallel.schedule import Op, Phase


def _needs_input(model, op: Op) -> bool:
    chunk = model.chunks[op.chunk]
    return chunk.embedding is None if op.kind == Phase.FORWARD else chunk.head is None


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
    losses, caches, started, final = {}, {}, set(), set()
    last_backward = {op.chunk: k for k, op in enumerate(ops) if op.kind == Phase.BACKWARD}
    pending = None  # (handle, buffer) of the receive posted for the current op
    for k, op in enumerate(ops):
        chunk = model.chunks[op.chunk]
        inp = None
        if _needs_input(model, op):
            handle, inp = (
                pending if pending is not None else _post(model, pipe, op, act_shape, None, None)
            )
            handle.wait()
        if op.kind == Phase.FORWARD:
            x, y, rng = micro_batch(op.micro)
            out, caches[op.micro, op.chunk] = chunk.forward(
                x if chunk.embedding else inp, y if chunk.head else None, rng
            )
            if chunk.head is not None:
                losses[op.micro] = out
            send = None if chunk.head is not None else out
        else:
            last = k == last_backward[op.chunk]
            behind_final = all(c in final for c in range(op.chunk + 1, len(model.chunks)))
            send = chunk.backward(
                inp,
                caches.pop((op.micro, op.chunk)),
                loss_scale,
                accumulate=op.chunk in started,
                grad_ready=grad_ready if last and behind_final else None,
            )
            started.add(op.chunk)
            if last:
                final.add(op.chunk)
        nxt = ops[k + 1] if k + 1 < len(ops) and _needs_input(model, ops[k + 1]) else None
        pending = None
        if nxt is not None:
            pending = _post(model, pipe, nxt, act_shape, op if send is not None else None, send)
        elif send is not None:
            _send(pipe, op, model.chunks[op.chunk].vstage, send)
    assert not caches, f"activations left in flight: {sorted(caches)}"
    if pipe is not None:
        pipe.wait_sends()
    return losses


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
    loss = None
    for chunk in model.chunks:
        inp = x
        if chunk.embedding is None:
            inp = model.xp.empty(model.act_shape(*x.shape), dtype=model.dtype)
            pipe.recv_forward(inp, 0, chunk.vstage).wait()
        out, _ = chunk.forward(inp, y if chunk.head else None, keep_cache=False)
        if chunk.head is not None:
            loss = out
        else:
            pipe.send_forward(out, 0, chunk.vstage)
    if pipe is not None:
        pipe.wait_sends()
    return loss
