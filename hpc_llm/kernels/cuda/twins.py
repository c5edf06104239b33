"""NumPy twins of the CUDA kernels here, where the CPU kernels (hpc_llm/kernels) have none of the same shape: the
arithmetic each kernel does, op for op, so the CPU path runs it and the gpu-marked tests compare the kernel with it."""

from __future__ import annotations


def adamw_segments(p, g, m, v, segments, coef: dict, b1: float, b2: float) -> None:
    """adamw.cu's one launch: every segment (flat start, flat stop, moment offset, decayed) of the shard, with the
    CPU kernels' twin's arithmetic op for op (kernels/adamw.py)."""
    import numpy as np

    from hpc_llm.kernels.adamw import adamw_update_numpy

    n = max((b - a for a, b, _, _ in segments), default=0)
    tmp, tmp2 = np.empty(n, p.dtype), np.empty(n, p.dtype)
    adamw_update_numpy(p, g, m, v, segments, coef, b1, b2, tmp, tmp2)


def sumsq(g, ranges) -> float:
    """adamw.cu's sumsq_*: the sum of g^2 over ranges, in float64 (the kernel adds in another order: equal within
    float64 rounding, not bitwise)."""
    import numpy as np

    return float(sum(float(np.dot(x, x)) for x in (g[a:b].astype(np.float64) for a, b in ranges)))


def refresh_compute(master, bits, wide, runs, low) -> None:
    """round.cu's refresh_compute: master stored in the format into bits, and the runs [a, b) of it packed into
    wide as the widened bits (the rounded float32 values)."""
    from hpc_llm.kernels.rounding import from_low, to_low

    bits[...] = to_low(master, low)
    at = 0
    for a, b in runs:
        wide[at : at + b - a] = from_low(bits[a:b], wide.dtype)
        at += b - a
