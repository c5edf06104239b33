"""Data parallelism on buckets of the flat gradient buffer, and ZeRO-1's shards of it.

A bucket is a slice of the flat gradient buffer, taken from its end, since backward finishes the last layers' gradients
first. As soon as backward reports that a bucket's gradients are final (`grad_ready`), its collective starts,
nonblocking, and overlaps the rest of backward; `finish()` waits for all of them before the optimizer, and reduces the
buckets that were final only at the end of backward (the embeddings') with the blocking collective, which has nothing
to overlap with and which MPI runs faster.

- plain data parallelism: each bucket is sum-allreduced; every rank then holds the averaged gradient (the loss was
  scaled by 1/dp) and updates the whole buffer.
- ZeRO-1: each bucket is reduce-scattered instead; rank r receives the reduced gradient of piece r of every bucket,
  updates only those pieces (its Adam moments exist only for them), and `gather_params` allgathers the new parameters.
"""

from __future__ import annotations

from hpc_llm.parallel.comm import Comm


def split_counts(n: int, parts: int) -> list[int]:
    """n elements in `parts` near-equal pieces, the first n % parts one longer."""
    return [n // parts + (1 if r < n % parts else 0) for r in range(parts)]


class GradientSync:
    def __init__(self, grad_flat, dp_comm: Comm, bucket_elems: int, zero: bool):
        n = grad_flat.size
        self.g = grad_flat
        self.comm = dp_comm
        self.zero = zero and dp_comm.size > 1
        bucket_elems = max(1, bucket_elems)
        self.buckets = [(max(0, b - bucket_elems), b) for b in range(n, 0, -bucket_elems)]  # last bucket first
        self.counts = [split_counts(b - a, dp_comm.size) for a, b in self.buckets]
        r = dp_comm.rank
        if self.zero:
            pieces = [(a + sum(c[:r]), a + sum(c[:r + 1])) for (a, _), c in zip(self.buckets, self.counts)]
            self.owned = sorted(p for p in pieces if p[1] > p[0])
        else:
            self.owned = [(0, n)]
        self._handles: list = []
        self._launched = 0

    def start(self) -> None:
        """Before the last micro-batch's backward."""
        self._handles, self._launched = [], 0

    def grad_ready(self, offset: int) -> None:
        """Every gradient from `offset` to the end is final: start the buckets that lie there."""
        if self.comm.size == 1:
            return
        while self._launched < len(self.buckets) and self.buckets[self._launched][0] >= offset:
            a, b = self.buckets[self._launched]
            if self.zero:
                self._handles.append(self.comm.ireduce_scatter_(self.g[a:b], self.counts[self._launched]))
            else:
                self._handles.append(self.comm.iallreduce_(self.g[a:b]))
            self._launched += 1
        for h in self._handles:  # progress the ones in flight while backward goes on
            h.test()

    def finish(self) -> None:
        """Wait for the buckets in flight, then reduce what is left: the owned gradients are then reduced. Buckets
        that only became ready at the end of backward have nothing left to overlap with, so they take the blocking
        allreduce, which MPI runs several times faster than the nonblocking one (docs/performance.md)."""
        for h in self._handles:
            h.wait()
        self._handles = []
        if self.comm.size == 1:
            return
        for i in range(self._launched, len(self.buckets)):
            a, b = self.buckets[i]
            if self.zero:
                self.comm.ireduce_scatter_(self.g[a:b], self.counts[i]).wait()
            else:
                self.comm.allreduce_(self.g[a:b])
        self._launched = len(self.buckets)

    def gather(self, flat) -> None:
        """ZeRO-1: each rank's pieces of `flat` (parameters, or Adam moments laid out like them) to every rank."""
        if not self.zero:
            return
        for (a, b), counts in zip(self.buckets, self.counts):
            self.comm.allgather_(flat[a:b], counts)

    def gather_to(self, compact, out, root: int = 0) -> None:
        """ZeRO-1: this rank's owned pieces, `compact` (their concatenation in the order of self.owned: how AdamW
        keeps its moments), into `out` (laid out like the flat buffer) on root only: the other ranks need no
        full-size buffer. Without ZeRO-1, root's compact array is the whole buffer."""
        if not self.zero:
            if self.comm.rank == root:
                out[...] = compact
            return
        base, offset = {}, 0
        for a, b in self.owned:
            base[a], offset = offset, offset + b - a
        r = self.comm.rank
        for (a, b), counts in zip(self.buckets, self.counts):
            start, n = a + sum(counts[:r]), counts[r]
            piece = compact[base[start]:base[start] + n] if n else compact[:0]
            self.comm.gather_(piece, out[a:b] if r == root else None, counts, root)
