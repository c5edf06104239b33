"""The CUDA kernels of this folder, launched on a device backend (CuPy), or counted on the launch-counting stand-in
(launches.py) while their NumPy twins compute. Imported by code that runs on any backend: CuPy is imported only when
an array is CuPy's.

A kernel's .cu file is compiled once per process by CuPy (NVRTC) with --fmad=false, so a twin that rounds after each
operation computes the same bits."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

from hpc_llm.kernels.cuda import launches, twins

HERE = Path(__file__).parent
OPTIONS = ("--fmad=false", "-std=c++17")  # and -I this folder (round.cuh)
THREADS = 256
NORM_BLOCKS = 1024  # fixed: the norm's partial sums, and so its bits, do not depend on the device


def on_device(xp) -> bool:
    """Whether xp takes the device path: CuPy, or the counting stand-in for it."""
    return xp.__name__ != "numpy"


@functools.cache
def module(name: str):
    """The compiled RawModule of NAME.cu (CuPy only)."""
    import cupy

    return cupy.RawModule(code=(HERE / f"{name}.cu").read_text(), options=(*OPTIONS, f"-I{HERE}"))


def compile_ptx(name: str, arch: str) -> str:
    """NAME.cu compiled to PTX for `arch` (compute_80, compute_90) by NVRTC, which needs no GPU; a compile error
    raises RuntimeError with the compiler's log."""
    from cupy_backends.cuda.libs import nvrtc

    headers = sorted(HERE.glob("*.cuh"))
    prog = nvrtc.createProgram(
        (HERE / f"{name}.cu").read_text(),
        f"{name}.cu",
        [h.read_bytes() for h in headers],
        [h.name.encode() for h in headers],
    )
    try:
        nvrtc.compileProgram(prog, [f"-arch={arch}", *OPTIONS])
    except nvrtc.NVRTCError:
        raise RuntimeError(f"{name}.cu ({arch}): {nvrtc.getProgramLog(prog)}") from None
    ptx = nvrtc.getPTX(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


SOURCES = sorted(p.stem for p in HERE.glob("*.cu"))


def _suffix(dtype) -> str:
    return {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}[np.dtype(dtype)]


class SegmentTable:
    """The shard's segments for adamw.cu: flat start, moment offset, length, decayed; on the device once."""

    def __init__(self, xp, segments):
        self.segments = list(segments)
        self.total = sum(b - a for a, b, _, _ in self.segments)
        cols = list(zip(*self.segments)) if self.segments else [(), (), (), ()]
        flat, stop, mom, decay = cols
        lengths = [b - a for a, b in zip(flat, stop)]
        self.cols = None
        if xp.__name__ == "cupy":
            self.cols = tuple(
                xp.asarray(np.asarray(c, dtype=t))
                for c, t in (
                    (flat, np.int64),
                    (mom, np.int64),
                    (lengths, np.int64),
                    (decay, np.uint8),
                )
            )


def adamw_(xp, p, g, m, v, table: SegmentTable, coef: dict, b1: float, b2: float) -> None:
    """optim.AdamW's update of the whole shard: one launch."""
    if table.total == 0:
        return
    nbytes = table.total * p.itemsize * 7  # p, g, m, v read; p, m, v written
    if xp.__name__ != "cupy":
        with launches.record_kernel("adamw", nbytes):
            twins.adamw_segments(p, g, m, v, table.segments, coef, b1, b2)
        return
    c = [np.float64(coef[k]) for k in ("keep", "g1", "g2", "eps", "step")] + [
        np.float64(b1),
        np.float64(b2),
    ]
    kernel = module("adamw").get_function(f"adamw_{_suffix(p.dtype)}")
    blocks = min(-(-table.total // THREADS), 65535)
    kernel(
        (blocks,),
        (THREADS,),
        (p, g, m, v, *table.cols, np.int32(len(table.segments)), np.int64(table.total), *c),
    )


def sumsq(xp, g, ranges) -> float:
    """The sum of g^2 over ranges of g, in float64: two launches and one scalar back to the host."""
    ranges = [(a, b) for a, b in ranges if b > a]
    total = sum(b - a for a, b in ranges)
    if total == 0:
        return 0.0
    if xp.__name__ != "cupy":
        with launches.record_kernel("sumsq", total * g.itemsize):
            s = twins.sumsq(np.asarray(g), ranges)
        with launches.record_kernel("sumsq_finish", NORM_BLOCKS * 8):
            return s
    mod = module("adamw")
    start = xp.asarray(np.array([a for a, _ in ranges], dtype=np.int64))
    off = xp.asarray(np.cumsum([0] + [b - a for a, b in ranges[:-1]], dtype=np.int64))
    partial = xp.empty(NORM_BLOCKS, dtype=np.float64)
    out = xp.empty(1, dtype=np.float64)
    args = (g, start, off, np.int32(len(ranges)), np.int64(total), partial)
    mod.get_function(f"sumsq_{_suffix(g.dtype)}")((NORM_BLOCKS,), (THREADS,), args)
    mod.get_function("sumsq_finish")((1,), (THREADS,), (partial, np.int32(NORM_BLOCKS), out))
    return float(out.get()[0])


def global_norm(xp, g, ranges) -> float:
    return math.sqrt(sumsq(xp, g, ranges))
