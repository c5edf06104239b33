"""AdamW's update over segments of the flat buffers (optim.AdamW builds the segments and the coefficients).

Per element, in this order (the coefficients in the buffers' dtype):

    p *= keep (decayed segments only);  m = m b1 + g g1;  v = v b2 + (g g) g2;  p -= (m step) / (sqrt(v) + eps)

Compiled: the twin's operations in the same order, segment by segment, so the two are bitwise equal
and neither depends on the thread count; with the shared pool on (kernels/pool.py) the segments are split over its
threads.
"""

from __future__ import annotations

import numpy as np

from hpc_llm.backend import array_module
from hpc_llm.kernels.dispatch import compiled, kernel, prange


def adamw_update(
    p, g, m, v, segments, coef: dict, b1: float, b2: float, tmp=None, tmp2=None
) -> None:
    """segments: (flat start, flat stop, moment offset, decayed) of p and g (m, v at the offset); coef: keep, g1, g2,
    eps, step (optim.AdamW.step). tmp, tmp2: the twin's scratch, at least the longest segment."""
    if compiled(_adamw, p, g, m, v):
        t = p.dtype.type
        seg = np.asarray(segments, dtype=np.int64).reshape(-1, 4)
        c = [t(coef[k]) for k in ("keep", "g1", "g2", "eps", "step")]
        _adamw(p, g, m, v, seg, t(b1), t(b2), t(1), *c)
        return
    adamw_update_numpy(p, g, m, v, segments, coef, b1, b2, tmp, tmp2)


def runs_compiled(p) -> bool:
    """Whether adamw_update on these buffers runs compiled (one call over every segment: no thread pool around it)."""
    return compiled(_adamw, p)


def adamw_update_numpy(p, g, m, v, segments, coef, b1, b2, tmp_buf, tmp2_buf) -> None:
    xp = array_module(p)
    for a, b, o, decayed in segments:
        a, b, o = int(a), int(b), int(o)
        n = b - a
        tmp, tmp2 = tmp_buf[:n], tmp2_buf[:n]
        pc, gc, mc, vc = p[a:b], g[a:b], m[o : o + n], v[o : o + n]
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


# error_model "numpy": IEEE division (no zero check, whose branch kept the loop from being vectorised: 3.0x the
# twin's speed at 6x384 on one thread with it)
@kernel(auto=True, pool=True, error_model="numpy")
def _adamw(p, g, m, v, seg, b1, b2, one, keep, g1, g2, eps, step):
    # an undecayed segment's p * one is p exactly
    for s in prange(seg.shape[0]):
        a, b, o = seg[s, 0], seg[s, 1], seg[s, 2]
        k = keep if seg[s, 3] else one
        _adamw_segment(
            p[a:b], g[a:b], m[o : o + b - a], v[o : o + b - a], b1, b2, k, g1, g2, eps, step
        )


@kernel(error_model="numpy")
def _adamw_segment(p, g, m, v, b1, b2, keep, g1, g2, eps, step):
    for i in range(p.size):
        gi = g[i]
        mi = m[i] * b1 + gi * g1
        vi = v[i] * b2 + gi * gi * g2
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * keep - mi * step / (np.sqrt(vi) + eps)
