"""Compressed data-parallel gradient reductions (`parallel.grad_comm`): 16-bit communication and PowerSGD.

16-bit ("bf16", "fp16"). MPI has no standard 16-bit floating reduction, so a bucket of n gradients over p ranks is
reduced in two phases that move 16-bit words only and form every sum in fp32:

1. the bucket is scaled by a power of two s (`scale_for`: fp16 only, so that its largest value sits just below fp16's
   top and small gradients keep 11 bits instead of falling into subnormals; 1 for bf16), rounded to the format
   (round to nearest even), and an alltoallv gives rank r piece r (the pieces of `split_counts`) of every rank's
   bucket, each piece followed by its sender's s (4 bytes): a reduce-scatter's traffic, (p - 1)/p * 2n bytes;
2. rank r unscales each piece (exactly: a power of two) and sums the p pieces in fp32, in rank order 0..p-1;
3. without ZeRO-1 the sum is scaled by its own power of two, rounded to the format and allgatherv'd with that scale,
   and each rank widens and unscales every piece (every replica then holds bitwise the same gradient); with ZeRO-1
   there is no phase 3: the owner keeps its fp32 sum, and only its own piece is used by its optimizer (the
   reduce-scatter is the 16-bit one).

So the result is exactly the fp32 sum, in rank order, of the 16-bit-rounded (scaled) inputs, rounded once more to the
format without ZeRO-1. Each bucket is started as soon as backward finishes it, like the fp32 buckets; phase 3 is
started from the progress calls (`test`) the trainer already makes while backward goes on.

PowerSGD (Vogels, Karimireddy and Jaggi, NeurIPS 2019, Algorithm 1 with error feedback and warm start). For each
compressible matrix gradient M (this rank's local TP shard, rows x cols) with rank r = min(powersgd_rank, rows, cols):

    M_i <- M_i + e_i                           (error feedback: what earlier steps left out)
    P   <- sum_i M_i Q            allreduce    (Q: the previous step's, identical on every rank: warm start)
    P^  <- orthonormal basis of P (Householder QR: the same P gives the same P^ on every rank)
    Q   <- sum_i M_i^T P^         allreduce
    A   <- P^ Q^T                 = P^ P^^T sum_i M_i, the applied gradient (every rank alike)
    e_i <- M_i - A / p            (so sum_i e_i = sum_i M_i - A: nothing is lost, only delayed)

The trainer scales the loss by 1/(grad_accum * dp), so the sum over ranks is the mean gradient, as the allreduce of the
uncompressed path gives. A matrix is compressed iff (rows + cols) * r * min_compression_rate < rows * cols, with
min_compression_rate = 2: PyTorch's powerSGD_hook rule (`_should_compress`); otherwise, and for every tensor that is not
2-D, the plain sum-allreduce (one packed buffer). The first `powersgd_start` steps use the plain bucketed reduction
(PyTorch's start_powerSGD_iter). The error is stored unscaled (divided by fp16's loss scale), so a change of the loss
scale does not change it. A step whose P or Q is not finite (an fp16 overflow somewhere in the group: every rank of
the group sees it, since P and Q are reduced) leaves the state unchanged and makes the gradient non-finite, so the
trainer skips the step as it does any non-finite one. A step the trainer skips for another reason (an outlier, an
overflow elsewhere in the grid) is undone by `settle(False)`: the new error and Q are fresh arrays, the previous
ones kept until the verdict (for that while, the error's memory twice).

The state (each matrix's error e_i and Q) is per data-parallel rank; `powersgd_state` / `load_powersgd_state` are the
checkpoint's pair: a resume at the same layout continues bitwise, on another layout the state is reset (zero error,
Q from its seed) with one log line (`reset_line`).
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from hpc_llm.backend import array_module, low_dtype, to_host

SCHEMES = ("fp32", "bf16", "fp16", "powersgd")
MIN_COMPRESSION_RATE = 2.0  # PyTorch's powerSGD_hook default


def comm_dtype(scheme: str):
    """The 16-bit format a scheme sends gradients in (None: the model's dtype)."""
    if scheme not in ("bf16", "fp16"):
        return None
    return low_dtype(scheme)


# after each 16-bit piece on the wire: its float32 power-of-two scale, as two uint16 words
SCALE_WORDS = 2


def scale_for(scheme: str, maxabs: float, headroom: int = 1) -> float:
    """fp16: the power of two s that puts the piece's largest magnitude in [2^(15 - headroom), 2^(16 - headroom)),
    by default [2^14, 2^15): fp16's 11 bits for the largest values (gradients, ~1e-3 and far smaller, would otherwise
    fall into fp16's subnormals or to zero); 1 for a zero or non-finite piece (an overflow stays inf) and for bf16
    (fp32's exponent range). A power of two: scaling and unscaling are exact.

    The headroom, one power of two, is what rounding needs: a value just below 2^(16 - headroom) rounds up to it,
    and 2^16 is past fp16's 65504. The rank count does not enter: every value on the wire is one rank's piece or an
    owner's fp32 sum scaled afresh, never a sum formed in 16 bits."""
    if scheme != "fp16" or not math.isfinite(maxabs) or maxabs == 0:
        return 1.0
    return 2.0 ** max(-126, min(126, 15 - headroom - math.floor(math.log2(maxabs))))


def _maxabs(x) -> float:
    """max |x| without a temporary of x's size (NaN if x holds one)."""
    if not x.size:
        return 0.0
    top = float(np.max(x))
    return top if math.isnan(top) else max(top, -float(np.min(x)))


def scale_of(scheme: str, x) -> float:
    """`scale_for` x's largest magnitude (bf16: 1, without looking at x)."""
    return scale_for(scheme, _maxabs(x)) if scheme == "fp16" else 1.0


# A 16-bit piece on the wire (the gradient buckets' here, the activations' in comm.py): its values rounded to the
# format (round to nearest even) after multiplying by the power of two s, as uint16 words, then s (a float32) as
# SCALE_WORDS words. write16 and read16 go through no temporary of the piece's size.


def write16(wire, o: int, x, low, s: float) -> int:
    """Piece x (float32, 1-D) scaled by s and rounded to `low` into wire[o:], its scale after it; -> the offset past
    them."""
    n = x.size
    vals = wire[o : o + n].view(low)
    if s == 1:
        np.copyto(vals, x, casting="unsafe")
    else:  # x * s in float32 (exact: a power of two), then one rounding
        np.multiply(x, np.float32(s), out=vals, casting="unsafe")
    wire[o + n : o + n + SCALE_WORDS] = np.array([s], dtype=np.float32).view(np.uint16)
    return o + n + SCALE_WORDS


def read16(wire, o: int, n: int, low, out=None):
    """The n values of the piece at wire[o:], widened to float32 and unscaled (exactly: a power of two), into `out`
    (a new array if None)."""
    out = np.empty(n, dtype=np.float32) if out is None else out
    np.copyto(out, wire[o : o + n].view(low), casting="unsafe")
    inv = 1.0 / np.ascontiguousarray(wire[o + n : o + n + SCALE_WORDS]).view(np.float32)[0]
    if inv != 1:
        out *= inv
    return out


def sum16(recv, p: int, n: int, low):
    """The fp32 sum, in rank order 0..p-1, of the p pieces of n values each (every one followed by its scale) that
    recv holds one after the other: one rounding per addition."""
    acc = read16(recv, 0, n, low)
    if p > 1:
        part = np.empty(n, dtype=np.float32)
        for k in range(1, p):
            acc += read16(recv, k * (n + SCALE_WORDS), n, low, part)
    return acc


class Reduce16:
    """One bucket's 16-bit reduction in flight (module docstring, phases 1-3). `g` is the bucket (a slice of the flat
    gradient buffer), `counts` its pieces over the group; with `zero` only this rank's piece is written (fp32 sum).

    On the wire each piece is followed by its scale (`scale_for`: the sender's, per bucket in phase 1; the owner's,
    per piece in phase 3): a receiver multiplies the widened values by 1/s, exactly. The bucket is rounded into the
    send buffer at once, so backward may go on writing other buckets; `test()` progresses the reduction (and starts
    phase 3 once phase 1 is done), `wait()` completes it."""

    def __init__(self, comm, g, counts: list[int], low, zero: bool, kind: str, gather_comm=None):
        self.comm, self.g, self.counts, self.low, self.zero = comm, g, counts, np.dtype(low), zero
        self.scheme = "fp16" if self.low == np.float16 else "bf16"
        # phase 3 runs on a duplicate of the group: phase 1 collectives are started in bucket order and phase 3 ones
        # in bucket order too, but a rank may start bucket i's phase 3 before or after bucket i + 1's phase 1,
        # depending on when its alltoallv completed; MPI's per-communicator ordering rule then holds on each
        self.gather_comm = gather_comm if gather_comm is not None else comm
        p, r = comm.size, comm.rank
        self.offset, self.n = sum(counts[:r]), counts[r]
        self.wire_counts = [c + SCALE_WORDS for c in counts]
        x = to_host(g).astype(np.float32, copy=False)
        s = scale_of(self.scheme, x)
        # piece j, its scale, piece j+1, ...
        self.wire = np.empty(sum(self.wire_counts), dtype=np.uint16)
        o, lo = 0, 0
        for c in counts:
            o = write16(self.wire, o, x[lo : lo + c], self.low, s)
            lo += c
        self.recv = np.empty(p * (self.n + SCALE_WORDS), dtype=np.uint16)
        # the ledger counts the 16-bit bucket, as an allreduce of it would be counted
        nbytes = self.wire.nbytes
        self.h1 = comm.ialltoallv_(
            self.wire,
            self.wire_counts,
            self.recv,
            [self.n + SCALE_WORDS] * p,
            kind=kind,
            nbytes=nbytes,
        )
        self.h2 = None
        self.done = False

    def _reduce(self) -> None:
        """Phase 2, then phase 3's start."""
        self.h1.wait()
        p, n = self.comm.size, self.n
        acc = sum16(self.recv, p, n, self.low)
        if self.zero:
            self.g[self.offset : self.offset + n] = array_module(self.g).asarray(
                acc.astype(self.g.dtype)
            )
            self.done = True
            return
        # this rank's piece on the wire, rounded with its own scale; phase 1 is done with it
        o = self.offset + SCALE_WORDS * self.comm.rank
        write16(self.wire, o, acc, self.low, scale_of(self.scheme, acc))
        # one ledger entry's bytes per reduction (in phase 1)
        self.h2 = self.gather_comm.iallgatherv_(
            self.wire, self.wire_counts, kind=self.h1.kind.split(".", 1)[1], nbytes=0
        )

    def _unpack(self) -> None:
        """Every rank's reduced piece, widened and unscaled, into g (every rank does the same: bitwise replicas)."""
        xp, o, lo = array_module(self.g), 0, 0
        for c in self.counts:
            piece = self.g[lo : lo + c]
            if isinstance(piece, np.ndarray) and piece.dtype == np.float32:
                read16(self.wire, o, c, self.low, piece)  # straight into g
            else:
                piece[...] = xp.asarray(read16(self.wire, o, c, self.low).astype(piece.dtype))
            o, lo = o + c + SCALE_WORDS, lo + c

    @property
    def waiting_phase1(self) -> bool:
        """Not yet past phase 1: later buckets must not start their phase 3 before this one (see __init__)."""
        return not self.done and self.h2 is None

    def test(self) -> bool:
        if self.done:
            return True
        if self.h2 is None:
            if not self.h1.test():
                return False
            self._reduce()
            if self.done:
                return True
        return self.h2.test()

    def wait(self) -> None:
        if self.done:
            return
        if self.h2 is None:
            self._reduce()
        if not self.done:
            self.h2.wait()
            self._unpack()
            self.done = True


def should_compress(
    rows: int, cols: int, rank: int, min_compression_rate: float = MIN_COMPRESSION_RATE
) -> bool:
    """PyTorch's rule, with r = min(rank, rows, cols): compress iff (rows + cols) * r * rate < rows * cols."""
    r = min(rank, rows, cols)
    return (rows + cols) * r * min_compression_rate < rows * cols


def _seed(seed: int, name: str) -> list[int]:
    return [seed, zlib.crc32(name.encode())]


class PowerSGD:
    """PowerSGD over the group `comm` for the tensors `specs` of the flat gradient buffer `g` (module docstring).

    specs: objects with name, offset, local_shape (model.specs). min_compression_rate: 2 as PyTorch; 0 compresses
    every 2-D tensor (the tests' exactness check with rank >= min(rows, cols))."""

    def __init__(
        self,
        g,
        comm,
        specs,
        rank: int,
        seed: int = 0,
        min_compression_rate: float = MIN_COMPRESSION_RATE,
    ):
        self.g, self.comm, self.rank, self.seed = g, comm, rank, seed
        self.dtype = g.dtype
        self.matrices = []  # (name, offset, rows, cols, r)
        plain = []
        for s in sorted(specs, key=lambda s: s.offset):
            shape = tuple(s.local_shape)
            size = int(np.prod(shape)) if shape else 0
            if size == 0:
                continue
            if len(shape) == 2 and should_compress(shape[0], shape[1], rank, min_compression_rate):
                self.matrices.append((s.name, s.offset, shape[0], shape[1], min(rank, *shape)))
            else:
                plain.append((s.offset, s.offset + size))
        self.plain = _merge(plain)
        self.plain_size = sum(b - a for a, b in self.plain)
        self.p_size = sum(n * r for _, _, n, _, r in self.matrices)
        self.q_size = sum(m * r for _, _, _, m, r in self.matrices)
        self.reset()

    def reset(self) -> None:
        """Zero error, Q drawn from (seed, tensor name): the same on every rank of the group, any layout."""
        self._previous = None
        self.error = {
            name: np.zeros((n, m), dtype=self.dtype) for name, _, n, m, _ in self.matrices
        }
        self.q = {}
        for name, _, _, m, r in self.matrices:
            self.q[name] = (
                np.random.default_rng(_seed(self.seed, name))
                .standard_normal((m, r))
                .astype(self.dtype)
            )

    def nbytes(self) -> int:
        """Bytes of one compressed step's reductions (the buffers' sizes, the ledger's convention)."""
        return (self.plain_size + self.p_size + self.q_size) * self.dtype.itemsize

    def reduce(self, loss_scale: float = 1.0) -> None:
        """The whole step's reduction: afterwards every rank holds the same gradient in every element of g."""
        g, p, it = self.g, self.comm.size, self.dtype.type
        self._previous = None  # a step never settled is kept
        plain = (
            np.concatenate([g[a:b] for a, b in self.plain])
            if self.plain
            else np.zeros(0, self.dtype)
        )
        h_plain = self.comm.iallreduce_(plain, "allreduce") if plain.size else None
        ms, pack, o = [], np.empty(self.p_size, self.dtype), 0
        for name, off, n, m, r in self.matrices:
            M = g[off : off + n * m].reshape(n, m)
            # M_i + e_i, in place (g is ours until the optimizer)
            M += self.error[name] if loss_scale == 1 else self.error[name] * it(loss_scale)
            np.matmul(M, self.q[name], out=pack[o : o + n * r].reshape(n, r))
            ms.append(M)
            o += n * r
        self.comm.iallreduce_(pack, "powersgd_p").wait()
        finite = bool(np.isfinite(pack).all())
        if finite:
            qpack, o, po, ps = np.empty(self.q_size, self.dtype), 0, 0, []
            for (_name, _off, n, m, r), M in zip(self.matrices, ms):
                P = np.linalg.qr(pack[po : po + n * r].reshape(n, r), mode="reduced")[0].astype(
                    self.dtype
                )
                np.matmul(M.T, P, out=qpack[o : o + m * r].reshape(m, r))
                ps.append(P)
                po, o = po + n * r, o + m * r
            self.comm.iallreduce_(qpack, "powersgd_q").wait()
            # the same verdict on every rank: qpack is reduced
            finite = bool(np.isfinite(qpack).all())
        if finite:
            self._previous = (self.error, self.q)
            self.error, self.q = dict(self.error), dict(self.q)
            o = 0
            for (name, _off, _n, m, r), M, P in zip(self.matrices, ms, ps):
                Q = qpack[o : o + m * r].reshape(m, r)
                A = P @ Q.T
                E = self.error[name] = np.divide(A, it(p))
                np.subtract(M, E, out=E)  # e_i = M_i - A / p
                if loss_scale != 1:
                    E /= it(loss_scale)
                M[...] = A
                self.q[name] = Q.copy()
                o += m * r
        else:  # an overflow in the group: keep the state, make the step non-finite (the trainer skips it)
            for M in ms:
                M[...] = np.nan
        if h_plain is not None:
            h_plain.wait()
            o = 0
            for a, b in self.plain:
                g[a:b] = plain[o : o + b - a]
                o += b - a

    def settle(self, applied: bool) -> None:
        """The trainer's verdict on the step just reduced: applied keeps its error and Q, skipped restores the
        previous step's."""
        if not applied and self._previous is not None:
            self.error, self.q = self._previous
        self._previous = None

    # -- state (per data-parallel rank) ------------------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        out = {}
        for name, *_ in self.matrices:
            out[f"error/{name}"] = self.error[name]
            out[f"q/{name}"] = self.q[name]
        return out

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        """The arrays `state()` gave (at the same layout: the same shapes); a mismatch raises ValueError."""
        want = self.state()
        if set(arrays) != set(want):
            raise ValueError(
                f"PowerSGD state: tensors {sorted(arrays)[:4]}... but this layout has "
                f"{sorted(want)[:4]}..."
            )
        for k, v in arrays.items():
            if tuple(v.shape) != want[k].shape:
                raise ValueError(
                    f"PowerSGD state {k}: shape {tuple(v.shape)}, this layout's {want[k].shape}"
                )
        self._previous = None
        for name, *_ in self.matrices:
            self.error[name] = np.array(arrays[f"error/{name}"], dtype=self.dtype)
            self.q[name] = np.array(arrays[f"q/{name}"], dtype=self.dtype)


def _merge(ranges):
    out = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


# -- the checkpoint's pair (hpc_llm/checkpoint/ stores each rank's arrays) ---------------------------------------------


def powersgd_state(sync) -> dict | None:
    """What a checkpoint keeps of this rank's PowerSGD state: {"layout": {...}, "arrays": {name: array}}, or None
    (another scheme, or dp = 1). The layout names what must match for the state to apply: the grid, this rank's
    place in it, the rank of the approximation."""
    ps = getattr(sync, "powersgd", None)
    if ps is None:
        return None
    return {"layout": dict(sync.layout, powersgd_rank=ps.rank), "arrays": ps.state()}


def load_powersgd_state(sync, saved: dict | None) -> str | None:
    """Restore this rank's state from `powersgd_state`'s output (None: the checkpoint has none). Returns None when
    restored exactly, else the one log line saying it was reset (another layout, another rank, none saved)."""
    ps = getattr(sync, "powersgd", None)
    if ps is None:
        return None
    want = dict(sync.layout, powersgd_rank=ps.rank)
    if saved is None:
        ps.reset()
        return "PowerSGD: the checkpoint holds no PowerSGD state; error feedback and Q start afresh"
    if saved["layout"] != want:
        ps.reset()
        diff = ", ".join(
            f"{k} {saved['layout'].get(k)} -> {v}"
            for k, v in want.items()
            if saved["layout"].get(k) != v
        )
        return f"PowerSGD: state saved at another layout ({diff}); error feedback and Q reset (zero error, Q from seed)"
    ps.load(saved["arrays"])
    return None


def reset_line(lines: list[str | None]) -> str | None:
    """The first reset line of a group's ranks (they all reset alike when the layout changed): log it once."""
    return next((x for x in lines if x), None)
