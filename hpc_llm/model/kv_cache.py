"""The KV cache of incremental decoding: every layer's keys and values of the positions decoded so far."""

from __future__ import annotations

import math

import numpy as np


class KVCache:
    """Keys and values of the positions decoded so far, per layer: (B, H, block_size, hd) each, and each row's
    length (rows of a batch of prompts of different lengths fill their caches at their own pace)."""

    def __init__(self, model, batch: int, reuse: bool = False):
        """model: the GPT that decodes with this cache (its config, heads per rank, dtype, array module).
        reuse: take the memory from the model's pool (`release()` gives it back), not fresh memory: first
        touching hundreds of MB of new pages costs more than a GPT-2 small prefill's attention (measured:
        docs/performance.md). The pool keeps one flat buffer per dtype, the largest released, and a cache of any
        batch is a view of its first elements: caches of many sizes (generate's rebuilt rows, a last smaller batch)
        pin no more than the largest of them. A reused buffer holds stale keys and values beyond each row's length,
        which are never read: a query sees only the positions up to its own, all written for this sequence."""
        cfg = model.cfg
        hd = cfg.head_size
        shape = (cfg.n_layer, 2, batch, model.heads, cfg.block_size, hd)
        dtype, size = np.dtype(model.dtype), math.prod(shape)
        self._pool = model.__dict__.setdefault("_kv_pool", {}) if reuse else None
        free = self._pool.pop(dtype.str, None) if reuse else None
        if free is not None and free.size < size:
            free = None  # too small: freed before the larger one is allocated (which replaces it on release)
        self._buf = free if free is not None else model.xp.zeros(size, dtype=dtype)
        self.kv = self._buf[:size].reshape(shape)
        self.lengths = np.zeros(batch, dtype=np.int64)

    def release(self) -> None:
        """Give a reused buffer back to the model's pool, unless it holds a larger one; the cache is unusable
        after."""
        if self._pool is not None and self._buf is not None:
            held = self._pool.get(self._buf.dtype.str)
            if held is None or held.size < self._buf.size:
                self._pool[self._buf.dtype.str] = self._buf
        self.kv = self._buf = None

    @property
    def length(self) -> int:
        """The longest row's length (every row's, when they are all the same)."""
        return int(self.lengths.max()) if self.lengths.size else 0

    def take(self, rows, other: KVCache) -> None:
        """Rows `rows` of this cache become other's rows 0, 1, ... (a rebuilt context), up to other's length."""
        n = other.length
        for i, r in enumerate(rows):
            self.kv[:, :, r, :, :n] = other.kv[:, :, i, :, :n]
            self.lengths[r] = other.lengths[i]
