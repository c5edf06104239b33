"""Small measurements shared by the trainer's log (the MFU denominator) and the benchmark scripts."""

from __future__ import annotations

import time

import numpy as np


def synchronize(xp) -> None:
    if xp is not np:
        xp.cuda.get_current_device().synchronize()


def matmul_peak_flops(xp=np, dtype=np.float32, n: int = 2048, repeats: int = 3) -> float:
    """The best of `repeats` timings of one n^3 matmul, in FLOP/s: the machine's practical peak for this dtype."""
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((n, n)).astype(dtype))
    b = xp.asarray(rng.standard_normal((n, n)).astype(dtype))
    out = xp.empty((n, n), dtype=dtype)
    xp.matmul(a, b, out=out)  # warm-up: threads started, pages touched
    synchronize(xp)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        xp.matmul(a, b, out=out)
        synchronize(xp)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best
