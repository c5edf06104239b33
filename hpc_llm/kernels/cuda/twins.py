"""NumPy twins of the CUDA kernels here that the CPU kernels (hpc_llm/kernels) do not have: the arithmetic each
kernel does, op for op, so the CPU path runs it and the gpu-marked tests compare the kernel with it."""

from __future__ import annotations


def adamw_chunk(xp, pc, gc, mc, vc, tmp, tmp2, decayed: bool, coef: dict, b1: float, b2: float):
    """adamw.cu's arithmetic on one piece of the shard, in place: p, g, m, v and two temporaries of its length.
    coef: optim.AdamW.step's folded coefficients (keep, g1, g2, eps, step)."""
    if decayed:
        pc *= coef["keep"]
    mc *= b1
    xp.multiply(gc, coef["g1"], out=tmp)
    mc += tmp
    vc *= b2
    xp.multiply(gc, gc, out=tmp)
    tmp *= coef["g2"]
    vc += tmp
    xp.sqrt(vc, out=tmp)
    tmp += coef["eps"]
    xp.multiply(mc, coef["step"], out=tmp2)
    xp.divide(tmp2, tmp, out=tmp)
    pc -= tmp


def adamw_segments(p, g, m, v, segments, coef: dict, b1: float, b2: float) -> None:
    """adamw.cu's one launch: every segment (flat start, flat stop, moment offset, decayed) of the shard."""
    import numpy as np

    for a, b, o, decayed in segments:
        n = b - a
        tmp, tmp2 = np.empty(n, p.dtype), np.empty(n, p.dtype)
        adamw_chunk(
            np, p[a:b], g[a:b], m[o : o + n], v[o : o + n], tmp, tmp2, decayed, coef, b1, b2
        )


def sumsq(g, ranges) -> float:
    """adamw.cu's sumsq_*: the sum of g^2 over ranges, in float64 (the kernel adds in another order: equal within
    float64 rounding, not bitwise)."""
    import numpy as np

    return float(sum(float(np.dot(x, x)) for x in (g[a:b].astype(np.float64) for a, b in ranges)))
