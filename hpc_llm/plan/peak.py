"""A stage's peak memory within a step: its schedule walked op by op, each op's temporaries, the pipeline's
sends in flight, and ZeRO's buffers (ZeRO-1's receive buffers, ZeRO-2/3's gathered units and their gradients).
memory.py adds the step's constant terms (parameters, gradients, moments, saves) to the peak found here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hpc_llm.config import ModelConfig
from hpc_llm.parallel import schedule as sched
from hpc_llm.parallel import schedule_timing
from hpc_llm.parallel.compression import SCALE_WORDS
from hpc_llm.parallel.data_parallel import split_counts
from hpc_llm.parallel.schedule import Phase, schedule
from hpc_llm.parallel.zero import part_finishes, part_reads, part_writes, unit_ranges
from hpc_llm.plan.activations import (
    INDEX_BYTES,
    block_backward_work,
    block_cache_bytes,
    block_forward_work,
    chunk_cache_bytes,
    chunk_weight_bytes,
    fused_attention,
    head_backward_work,
)

if TYPE_CHECKING:  # memory.py imports this module: its types for annotations only
    from hpc_llm.plan.memory import Bytes, Layout


def message_elems(cfg: ModelConfig, lay: Layout) -> int:
    """Elements of one pipeline message: an activation or its gradient, (b, T, C), or (b, T/tp, C) with sequence
    parallelism."""
    return lay.rows * cfg.block_size * cfg.n_embd // (lay.tp if lay.sequence_parallel else 1)


def message_bytes(cfg: ModelConfig, lay: Layout, by: Bytes) -> int:
    """Bytes of one pipeline message's buffer: the activation itself in the compute dtype, or with 16-bit transfers
    its words and scale in a buffer of their own (Comm.isend / irecv: compression.write16's n + SCALE_WORDS uint16
    words), which is then what a send holds and what a receive lands in before it is widened."""
    elems = message_elems(cfg, lay)
    return 2 * (elems + SCALE_WORDS) if lay.comm16 else elems * by.compute


def send_depth(lay: Layout) -> int | None:
    """How many sends per neighbour and direction can be in flight at once; None: every send of the step (held
    until its end, as the code before bounded sends did: Layout.send_depth = 0). The code's bound is
    schedule_timing.send_depth(name, p, m, v)."""
    if lay.send_depth is not None:
        return lay.send_depth or None
    return schedule_timing.send_depth(lay.schedule, lay.pp, lay.micro_batches, lay.virtual)


@dataclass
class _Peak:
    """The moment of a stage's schedule when its memory peaks, in bytes: the total and the parts it is made of."""

    total: int = 0
    activations: int = 0  # the caches of the micro-batches alive
    workspace: int = 0  # the op's own temporaries and the latest micro-batch
    pipeline: int = 0  # the sends to the next or previous stage not yet completed
    zero: int = 0  # ZeRO-1 receive buffers of the buckets launched during the last backward; ZeRO-2/3's units


def _chunk_sizes(
    cfg: ModelConfig, lay: Layout, plan, by: Bytes, weight: bool = False
) -> dict[int, int]:
    """Each chunk's activation cache in bytes for one micro-batch; weight: instead, what its B keeps for its W
    (zero-bubble schedules)."""
    sizes = {}
    for c, v in enumerate(plan.chunks):
        shape = (
            cfg,
            lay.tp,
            lay.rows,
            len(plan.layers[v]),
            v == 0,
            v == plan.n_virtual - 1,
            by.act,
        )
        if weight:
            sizes[c] = chunk_weight_bytes(*shape, by.compute, lay.sequence_parallel, by.weight_dy)
        else:
            sizes[c] = chunk_cache_bytes(
                *shape, lay.recompute, by.compute, lay.sequence_parallel, by.device
            )
    return sizes


def zero_receive(specs, sync, n: int, dp_rank: int, by: Bytes) -> int:
    """ZeRO-1's receive buffers alive at the last backward: where each chunk's gradients start (grad_ready
    offsets), buckets at or beyond the smallest reported one are launched during the last backward, and their
    receive buffers live until finish()."""
    if sync.stage != 1:
        return 0
    first_block = min((s.offset for s in specs if s.name.startswith("h.")), default=n)
    launched = [i for i, (a, _) in enumerate(sync.buckets) if a >= first_block]
    return sum(sync.counts[i][dp_rank] for i in launched) * by.grad


def chunk_parts(plan, v: int) -> list:
    """Virtual stage v's parts in forward order, as chunk.Chunk.parts() names them."""
    return (
        (["embedding"] if v == 0 else [])
        + list(plan.layers[v])
        + (["head"] if v == plan.n_virtual - 1 else [])
    )


def zero_unit_bytes(specs, plan, lay: Layout, by: Bytes, dp_rank: int, v: int) -> tuple[int, int]:
    """(forward, backward): the most bytes ZeRO-2/3 hold on top of a rank's pieces during a pass of virtual stage
    v's chunk, as parallel/zero.py's hooks allocate them. Of each unit the part outside the rank's piece counts.
    ZeRO-3's parameters: the running part's units and the next part's, prefetched (parallel.reshard_after_forward
    = false: every unit gathered since the pass began, till its backward). Gradients (ZeRO-2/3, backward): the
    units the part writes, those written earlier and not yet finished (the tied wte from the head to the
    embedding), the previous part's in flight, and their reduce-scatter receive buffers (their pieces)."""
    units = unit_ranges(specs)
    size = {u: b - a for u, (a, b) in units.items()}
    piece = {u: split_counts(n, lay.dp)[dp_rank] for u, n in size.items()}
    other = {u: size[u] - piece[u] for u in units}
    pbytes = by.master or by.param  # gathered into the compute buffer
    parts = chunk_parts(plan, v)
    tied_head = 0 not in plan.chunks

    def gathered(reads) -> int:
        return sum(other[u] for u in set(reads) if u in units) * pbytes if lay.zero >= 3 else 0

    fwd, seen = 0, []
    for k, part in enumerate(parts):
        reads = list(part_reads(part, False))
        nxt = list(part_reads(parts[k + 1], False)) if k + 1 < len(parts) else []
        seen += reads
        held = seen if not lay.reshard_after_forward else reads
        fwd = max(fwd, gathered(held + nxt))
    bwd, open_, inflight = 0, set(), set()
    for k in range(len(parts) - 1, -1, -1):
        part = parts[k]
        reads = list(part_reads(part, True))
        nxt = list(part_reads(parts[k - 1], True)) if k > 0 else []
        if not lay.reshard_after_forward:  # the forward's gathers of the parts still to come back
            reads += [u for p in parts[:k] for u in part_reads(p, False)]
        writes = set(part_writes(part)) & set(units)
        grads = (open_ | writes | inflight) & set(units)
        g = sum(other[u] for u in grads) * by.grad + sum(piece[u] for u in inflight) * by.grad
        bwd = max(bwd, gathered(reads + nxt) + g)
        done = set(part_finishes(part, tied_head))
        open_, inflight = (open_ | writes) - done, done & set(units)
    return fwd, bwd


def _op_work(
    cfg: ModelConfig,
    lay: Layout,
    by: Bytes,
    op,
    blocks: int,
    first: bool,
    last: bool,
    acc: bool,
    batch: int,
):
    """The temporaries of one schedule op beyond the caches it keeps: its input (the received stream), the
    running layer's temporaries; with 16-bit transfers the 16-bit receive buffer beside the widened input."""
    b, T, C, H = lay.rows, cfg.block_size, cfg.n_embd, cfg.n_head
    sp, c16, drop = lay.sequence_parallel, lay.comm16, cfg.dropout > 0
    selective = lay.recompute == "selective"
    elems = message_elems(cfg, lay)
    msg = elems * by.compute  # the op's input or output stream
    if op.kind == Phase.WEIGHT:
        return _weight_work(cfg, lay, by, blocks, last, acc)
    receives = not first if op.kind == Phase.FORWARD else not last
    recv16 = message_bytes(cfg, lay, by) if c16 and receives and lay.pp > 1 else 0
    if op.kind == Phase.FORWARD:
        work = (
            block_forward_work(b, T, C, H, lay.tp, by.compute, sp, c16, selective)
            if blocks
            else msg
        )
        if lay.recompute == "block":
            # each block's whole cache is built, then dropped; Chunk.forward's loop variable still holds the
            # previous block's meanwhile
            work += 2 * act_block(cfg, lay, b, by)
        return work + recv16
    work = msg + batch
    if blocks:
        work = max(
            work,
            block_backward_work(
                b, T, C, H, lay.tp, by.compute, by.grad, acc, drop, sp, c16, selective
            )
            + (act_block(cfg, lay, b, by) if lay.recompute == "block" else 0),
        )
    if last:
        work = max(
            work,
            head_backward_work(
                b, T, C, cfg.padded_vocab, lay.tp, by.compute, by.grad, acc, sp, c16
            ),
        )
    return work + recv16


def _weight_work(cfg: ModelConfig, lay: Layout, by: Bytes, blocks: int, last: bool, acc: bool):
    """A W op's largest temporary: an accumulated weight gradient's product (`out += a @ b`: the fc's or mlp_proj's,
    the head's V x C), and with sp a column-parallel input gathered again."""
    C, Vl = cfg.n_embd, cfg.padded_vocab // lay.tp
    product = max(4 * C * C // lay.tp if blocks else 0, Vl * C if last else 0) * by.grad
    gathered = lay.rows * cfg.block_size * C * by.compute if lay.sequence_parallel else 0
    return (product if acc else 0) + gathered


def sends_in_flight(ops, plan, depth: int | None):
    """For each op of a rank's list: (forward, backward) sends in flight while it runs, each direction capped at
    depth (None: every send made so far, held until the step's end). A chunk's forward sends unless it is the last
    virtual stage, its backward unless it is the first (the V's turn, handed over in memory, counts: its copy)."""
    fwd = bwd = 0
    cap = (lambda k: k) if depth is None else (lambda k: min(k, depth))  # noqa: E731
    chunks, last = plan.chunks, plan.n_virtual - 1
    for op in ops:
        yield cap(fwd), cap(bwd)
        v = chunks[op.chunk]
        if op.kind == Phase.FORWARD:
            fwd += v != last
        elif op.kind == Phase.BACKWARD:
            bwd += v != 0


def schedule_peak(
    cfg: ModelConfig, lay: Layout, stage: int, by: Bytes, plan, zero_recv: int, units=None
) -> _Peak:
    """Walk the stage's schedule, op by op, keeping the moment of the largest total."""
    sizes = _chunk_sizes(cfg, lay, plan, by)
    ops = schedule(lay.schedule, lay.pp, stage, lay.micro_batches, lay.virtual)
    split = sched.splits(ops)
    # split: B leaves what W needs (the rest of the cache freed), and W frees it
    kept = _chunk_sizes(cfg, lay, plan, by, weight=True) if split else {}
    writes = Phase.WEIGHT if split else Phase.BACKWARD
    # a send buffer: the activation or gradient itself, or its 16-bit rounded copy
    msg = message_bytes(cfg, lay, by)
    alive: dict = {}
    started: set = set()
    last_b = max(k for k, op in enumerate(ops) if op.kind == writes)
    best = _Peak()
    # the latest micro-batch's (x, y), referenced by the loop
    batch = 2 * lay.rows * cfg.block_size * INDEX_BYTES
    in_flight = sends_in_flight(ops, plan, send_depth(lay))
    works: dict = {}  # an op's temporaries depend only on its kind, its chunk and whether it accumulates
    held = 0  # sum(alive.values())
    chunks = plan.chunks
    for k, op in enumerate(ops):
        v = chunks[op.chunk]
        if op.kind == Phase.FORWARD:
            alive[(op.micro, op.chunk)] = sizes[op.chunk]
            held += sizes[op.chunk]
        key = (op.kind, op.chunk, op.chunk in started)
        if key not in works:
            first, last = v == 0, v == plan.n_virtual - 1
            works[key] = _op_work(cfg, lay, by, op, len(plan.layers[v]), first, last, key[2], batch)
        work = works[key]
        if op.kind == Phase.BACKWARD and split:  # W's part built while B frees the cache
            work += max(0, kept[op.chunk] - sizes[op.chunk])
        sends = msg * sum(next(in_flight))
        zero = zero_recv if k == last_b else 0
        if units is not None:  # ZeRO-2/3: the chunk's pass's units
            zero = units[op.chunk][op.kind != Phase.FORWARD]
        total = held + work + sends + zero + batch
        if total > best.total:
            best = _Peak(total, held, work + batch, sends, zero)
        if op.kind == Phase.BACKWARD and split:
            held += kept[op.chunk] - alive[(op.micro, op.chunk)]
            alive[(op.micro, op.chunk)] = kept[op.chunk]
        elif op.kind == writes:
            held -= alive.pop((op.micro, op.chunk))
            started.add(op.chunk)
    return best


def act_block(cfg: ModelConfig, lay: Layout, b: int, by: Bytes) -> int:
    """recompute: the block whose cache is being rebuilt holds it whole while its backward runs."""
    return block_cache_bytes(
        b,
        cfg.block_size,
        cfg.n_embd,
        cfg.n_head,
        lay.tp,
        cfg.dropout > 0,
        by.act,
        by.compute,
        lay.sequence_parallel,
        fused=fused_attention(cfg, by.device),
    )
