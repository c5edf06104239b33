"""The 16-bit wire (parallel.act_comm): what a `Comm.with_wire` view sends in place of fp32 values.

Its float sum-allreduce, its along-an-axis all-gather / reduce-scatter (sequence parallelism) and its point-to-point
messages (the pipeline's) move 16-bit words, every sum formed in fp32 by us in rank order (MPI has no 16-bit float
sum). Each piece is compression.write16's: n words, then the sender's (fp16) or the owner's power-of-two scale. The
ledger counts the 16-bit words a collective's buffer holds (the fp32 path counts its fp32 buffer), under
"<group>.<collective>_<format>".

Nothing here calls MPI: the collectives go through the group's own raw-byte ones (`Comm.ialltoallv_`,
`Comm.iallgatherv_`), and a message's words through `Comm.isend` / `Comm.irecv`, so every wait is a Handle's, under
the watchdog. `comm` below is a wire view (`comm.wire` is "bf16" or "fp16").
"""

from __future__ import annotations

import numpy as np

from hpc_llm.backend import array_module, low_dtype, to_host
from hpc_llm.kernels.cuda import device, wire
from hpc_llm.parallel.compression import SCALE_WORDS, Reduce16, read16, scale_of, sum16, write16


def allreduce_(comm, buf):
    """buf <- its sum over the group, in place, as the 16-bit gradient buckets are reduced (compression.Reduce16,
    without ZeRO-1): each rank's buffer rounded to the format and cut in near-equal pieces, an alltoallv of the
    words, each owner sums its piece over the ranks in fp32 in rank order and rounds the sum once, an allgatherv
    of the rounded words; every rank then holds bitwise the same widened result."""
    host = to_host(buf)
    flat = host.reshape(-1)  # a view of a contiguous buffer, else a copy (written back below)
    n, p = flat.size, comm.size
    counts = [n // p + (1 if r < n % p else 0) for r in range(p)]
    low = low_dtype(comm.wire)
    Reduce16(comm, flat, counts, low, zero=False, kind=f"allreduce_{comm.wire}").wait()
    if not np.shares_memory(flat, host):
        host[...] = flat.reshape(host.shape)
    if host is not buf:
        buf[...] = array_module(buf).asarray(host)
    return buf


def reduce_scatter_along(comm, x, axis: int):
    """Comm.reduce_scatter_along's 16-bit twin: this rank's piece (piece `rank` of `size` equal ones along `axis`)
    of the sum of x over the group, a new float32 array. Each rank rounds x to the format into its send words,
    piece j for rank j (an alltoallv), and each sums what it receives in fp32 in rank order (compression.sum16):
    the sum is not rounded again (it does not travel)."""
    host = to_host(x)
    p = comm.size
    if p == 1:
        return x
    n, rest = divmod(host.shape[axis], p)
    if rest:
        raise ValueError(
            f"reduce_scatter_along: axis {axis} of shape {host.shape} is not divisible by the {p} ranks of "
            f"{comm.name}"
        )
    pieces = np.moveaxis(host.reshape(*host.shape[:axis], p, n, *host.shape[axis + 1 :]), axis, 0)
    c, low = pieces[0].size, low_dtype(comm.wire)
    s = scale_of(comm.wire, host)
    send = np.empty(p * (c + SCALE_WORDS), dtype=np.uint16)
    for j in range(p):  # piece j (a copy first only if it is not contiguous)
        write16(send, j * (c + SCALE_WORDS), pieces[j].reshape(-1), low, s)
    recv = np.empty_like(send)
    counts = [c + SCALE_WORDS] * p
    kind = f"reduce_scatter_{comm.wire}"
    comm.ialltoallv_(send, counts, recv, counts, kind=kind, nbytes=send.nbytes).wait()
    del send
    out = sum16(recv, p, c, low).reshape(pieces.shape[1:]).astype(host.dtype, copy=False)
    return out if isinstance(x, np.ndarray) else array_module(x).asarray(out)


def allgather_along(comm, x, axis: int):
    """Comm.allgather_along's 16-bit twin: every rank's x rounded to the format (its own included, so every rank
    holds bitwise the same result), concatenated along `axis` in rank order, widened: a new array."""
    host = to_host(x)
    p = comm.size
    if p == 1:
        return x
    c, low = host.size, low_dtype(comm.wire)
    words = np.empty(p * (c + SCALE_WORDS), dtype=np.uint16)
    write16(words, comm.rank * (c + SCALE_WORDS), host.reshape(-1), low, scale_of(comm.wire, host))
    kind = f"allgather_{comm.wire}"
    comm.iallgatherv_(words, [c + SCALE_WORDS] * p, kind=kind, nbytes=words.nbytes).wait()
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


# -- a pipeline message: its words in a buffer of their own (Comm.isend / irecv) ---------------------------------------


def message_words(fmt: str, buf) -> np.ndarray:
    """The words a send carries: buf's values rounded to `fmt` (n words) and their scale, in a new host buffer (the
    sender's activation may change at once). On a device they are made there (one kernel, kernels/cuda/wire.py) and
    the words, not the float32 values, are staged to the host."""
    xp = array_module(buf)
    s = scale_of(fmt, buf)
    if device.on_device(xp) and buf.dtype == np.float32:
        return to_host(wire.narrow_message(xp, xp.ascontiguousarray(buf), fmt, s))
    host = to_host(buf)
    words = message_buffer(host.size)
    write16(words, 0, host.reshape(-1), low_dtype(fmt), s)
    return words


def message_buffer(n: int) -> np.ndarray:
    """The word buffer a receive of an n-element message lands in."""
    return np.empty(n + SCALE_WORDS, dtype=np.uint16)


def widen_message(fmt: str, words: np.ndarray, buf) -> None:
    """A received message's words widened into buf: on a device the words go there and one kernel widens them
    (kernels/cuda/wire.py); on the host straight into buf where its layout allows."""
    xp = array_module(buf)
    contiguous = buf.dtype == np.float32 and buf.flags.c_contiguous
    if device.on_device(xp) and contiguous:
        wire.widen_message(xp, xp.asarray(words), buf, fmt)
    elif isinstance(buf, np.ndarray) and contiguous:
        read16(words, 0, buf.size, low_dtype(fmt), buf.reshape(-1))  # straight into buf
    else:
        vals = read16(words, 0, buf.size, low_dtype(fmt)).reshape(buf.shape)
        buf[...] = xp.asarray(vals)
