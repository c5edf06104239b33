"""Data parallelism on buckets of the flat gradient buffer, and ZeRO-1's shards of it.

A bucket is a slice of the flat gradient buffer, taken from its end, since backward finishes the last layers' gradients
first. As soon as backward reports that a bucket's gradients are final (`grad_ready`), its collective starts,
nonblocking, and overlaps the rest of backward; `finish()` waits for all of them before the optimizer, and reduces the
buckets that were final only at the end of backward (the embeddings') with the blocking collective, which has nothing
to overlap with and which MPI runs faster.

- plain data parallelism: each bucket is sum-allreduced; every rank then holds the averaged gradient (the loss was
  scaled by 1/dp) and updates the whole buffer.
- ZeRO-1: each bucket is reduce-scattered instead; rank r receives the reduced gradient of piece r of every bucket,
  updates only those pieces (its Adam moments exist only for them), and `gather` allgathers the new parameters.
- ZeRO-2 and 3: the buckets are the model's units (parallel/zero.py: an embedding, a block, the final LayerNorm),
  each reduce-scattered as soon as a micro-batch's backward has finished it (`reduce_unit`, called by zero.py's
  hooks; `grad_ready` does nothing), so a rank keeps only its pieces' gradients: after each reduction the rest of
  the unit's gradient is zeroed and its pages given back (backend.release). The reduced pieces accumulate in place
  over the micro-batches: the next micro-batch's backward adds its local gradient to the piece this rank owns (the
  others' pieces were zeroed), and the sum over ranks is the running total. ZeRO-3 leaves the parameters to zero.py;
  `gather` does nothing then.

`scheme` (parallel.grad_comm) compresses the reduction (parallel/compression.py): "bf16"/"fp16" send each bucket in
16 bits with fp32 sums (with ZeRO-1 the reduce-scatter is the 16-bit one), started as buckets complete like the fp32
ones; "powersgd" runs, from step `powersgd_start` on, one PowerSGD reduction of the whole buffer in `finish()` (after
backward: its factors need the finished gradients), and the plain fp32 buckets before that. With ZeRO-1, PowerSGD's
allreduce gives every rank the whole gradient, of which the optimizer uses its own pieces.
"""

from __future__ import annotations

from hpc_llm.backend import release
from hpc_llm.parallel.comm import Comm
from hpc_llm.parallel.compression import (
    MIN_COMPRESSION_RATE,
    SCALE_WORDS,
    PowerSGD,
    Reduce16,
    comm_dtype,
)


def split_counts(n: int, parts: int) -> list[int]:
    """n elements in `parts` near-equal pieces, the first n % parts one longer."""
    return [n // parts + (1 if r < n % parts else 0) for r in range(parts)]


class GradientSync:
    def __init__(
        self,
        grad_flat,
        dp_comm: Comm,
        bucket_elems: int,
        zero: int,
        scheme: str = "fp32",
        specs=(),
        powersgd_rank: int = 4,
        powersgd_start: int = 0,
        seed: int = 0,
        min_compression_rate: float = MIN_COMPRESSION_RATE,
        layout: dict | None = None,
        units=None,
    ):
        """zero: the ZeRO stage (0..3; a bool means 0 or 1); units: the [start, stop) ranges of the model's units,
        ZeRO-2/3's buckets (parallel/zero.py's unit_ranges)."""
        n = grad_flat.size
        self.scheme = scheme
        self.low = comm_dtype(scheme)  # bf16/fp16: the buckets' wire format
        self.powersgd_start = powersgd_start
        # what a PowerSGD state saved in a checkpoint must match (compression.py)
        self.layout = layout or {}
        self.powersgd = (
            PowerSGD(grad_flat, dp_comm, specs, powersgd_rank, seed, min_compression_rate)
            if scheme == "powersgd" and dp_comm.size > 1
            else None
        )
        self._compressed_step = False
        self.g = grad_flat
        self.comm = dp_comm
        self.stage = int(zero) if dp_comm.size > 1 else 0
        self.zero = self.stage >= 1
        bucket_elems = max(1, bucket_elems)
        # last bucket first
        if self.stage >= 2:
            self.buckets = sorted(units, reverse=True)
        else:
            self.buckets = [(max(0, b - bucket_elems), b) for b in range(n, 0, -bucket_elems)]
        self.counts = [split_counts(b - a, dp_comm.size) for a, b in self.buckets]
        if self.zero:
            pieces = [self.piece(i) for i in range(len(self.buckets))]
            self.owned = sorted(p for p in pieces if p[1] > p[0])
        else:
            self.owned = [(0, n)]
        self._handles: list = []
        self._launched = 0
        self._units: dict = {}  # ZeRO-2/3: bucket index -> its reduce-scatter in flight
        # 16-bit without ZeRO-1: the allgathers of the sums go on a duplicate group (compression.Reduce16)
        self._gather_comm = (
            dp_comm.dup(dp_comm.name)
            if self.low is not None and not self.zero and dp_comm.size > 1
            else None
        )

    def start(self, step: int = 0) -> None:
        """Before the last micro-batch's backward of step `step` (PowerSGD: plain before parallel.powersgd_start)."""
        self._handles, self._launched = [], 0
        self._compressed_step = self.powersgd is not None and step >= self.powersgd_start

    def _bucket(self, i: int):
        """Start bucket i's collective: the fp32 allreduce / reduce-scatter, or their 16-bit forms."""
        a, b = self.buckets[i]
        if self.low is not None:
            kind = ("reduce_scatter_" if self.zero else "allreduce_") + self.scheme
            return Reduce16(
                self.comm, self.g[a:b], self.counts[i], self.low, self.zero, kind, self._gather_comm
            )
        if self.zero:
            return self.comm.ireduce_scatter_(self.g[a:b], self.counts[i])
        return self.comm.iallreduce_(self.g[a:b])

    def grad_ready(self, offset: int) -> None:
        """Every gradient from `offset` to the end is final: start the buckets that lie there."""
        if self.comm.size == 1 or self._compressed_step or self.stage >= 2:
            return
        while self._launched < len(self.buckets) and self.buckets[self._launched][0] >= offset:
            self._handles.append(self._bucket(self._launched))
            self._launched += 1
        for h in self._handles:  # progress the ones in flight while backward goes on
            if not h.test() and isinstance(h, Reduce16) and h.waiting_phase1:
                break  # 16-bit phase 3 starts in bucket order (compression.Reduce16)

    def settle(self, applied: bool) -> None:
        """After the step's verdict: PowerSGD keeps this step's error feedback and Q if its update was applied, and
        returns to the previous step's if it was skipped (an outlier, an overflow anywhere: its gradient must not
        come back through the error)."""
        if self.powersgd is not None:
            self.powersgd.settle(applied)

    def finish(self, loss_scale: float = 1.0) -> None:
        """Wait for the buckets in flight, then reduce what is left: the owned gradients are then reduced. Buckets
        that only became ready at the end of backward have nothing left to overlap with, so they take the blocking
        allreduce, which MPI runs several times faster than the nonblocking one (docs/performance.md).
        loss_scale: fp16's current loss scale (PowerSGD keeps its error unscaled)."""
        for h in self._handles:
            h.wait()
        self._handles = []
        if self.comm.size == 1:
            return
        if self.stage >= 2:
            for i in list(self._units):
                self.settle_unit(i)
            return
        if self._compressed_step:
            self.powersgd.reduce(loss_scale)
            self._launched = len(self.buckets)
            return
        for i in range(self._launched, len(self.buckets)):
            a, b = self.buckets[i]
            if self.low is not None:
                self._bucket(i).wait()
            elif self.zero:
                self.comm.ireduce_scatter_(self.g[a:b], self.counts[i]).wait()
            else:
                self.comm.allreduce_(self.g[a:b])
        self._launched = len(self.buckets)

    def bytes_per_step(self, compressed: bool = True, micro_batches: int = 1) -> tuple[int, int]:
        """(fp32, this scheme): bytes of one step's gradient reductions on this rank, counted as the ledger counts
        them (each collective's buffer, nccl-tests' size S); the uncompressed figure in the gradients' own dtype.
        compressed=False: PowerSGD's plain steps before parallel.powersgd_start. ZeRO-2/3 reduce every micro-batch's
        gradients (micro_batches per step)."""
        if self.comm.size == 1:
            return 0, 0
        full = self.g.size * self.g.dtype.itemsize
        if self.stage >= 2:
            return full * micro_batches, full * micro_batches
        # 2 bytes a value, and each piece's 4-byte scale (compression.Reduce16)
        if self.low is not None:
            return full, 2 * self.g.size + 2 * SCALE_WORDS * self.comm.size * len(self.buckets)
        if self.powersgd is not None and compressed:
            return full, self.powersgd.nbytes()
        return full, full

    # -- ZeRO-2/3: one unit at a time ------------------------------------------------------------------------------

    def piece(self, i: int) -> tuple[int, int]:
        """This rank's piece of bucket i: [start, stop) in the flat buffer."""
        (a, _), counts, r = self.buckets[i], self.counts[i], self.comm.rank
        return a + sum(counts[:r]), a + sum(counts[: r + 1])

    def reduce_unit(self, i: int) -> None:
        """A micro-batch's backward has finished bucket (unit) i's gradients: start its reduce-scatter, and complete
        the ones before it that are done (their buffers zeroed outside this rank's pieces)."""
        a, b = self.buckets[i]
        assert i not in self._units, f"unit {self.buckets[i]} reduced twice in a micro-batch"
        self._units[i] = self.comm.ireduce_scatter_(self.g[a:b], self.counts[i])
        for j in [j for j, h in self._units.items() if j != i and h.test()]:
            self.settle_unit(j)

    def settle_unit(self, i: int) -> None:
        """Before bucket i's gradients are written again (or the optimizer reads them): its reduction complete,
        the rest of the unit's gradient zeroed and its pages given back."""
        h = self._units.pop(i, None)
        if h is None:
            return
        h.wait()
        self.release_unowned(self.g, i)

    def release_unowned(self, buf, i: int) -> None:
        """Bucket i of `buf` (laid out like the flat buffer) zeroed outside this rank's piece, its pages given back
        (backend.release): ZeRO-2's gradients after their reduction, ZeRO-3's parameters after their use."""
        (a, b), (lo, hi) = self.buckets[i], self.piece(i)
        release(buf, a, lo)
        release(buf, hi, b)

    def gather(self, flat) -> None:
        """ZeRO-1/2: each rank's pieces of `flat` (parameters, or Adam moments laid out like them) to every rank.
        ZeRO-3: nothing (each unit's parameters are gathered when used: parallel/zero.py)."""
        if not self.zero or self.stage >= 3:
            return
        for (a, b), counts in zip(self.buckets, self.counts):
            self.comm.allgather_(flat[a:b], counts)
