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
NULL = np.uint64(0)  # a null pointer argument (an optional array a kernel skips)


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


# -- the block's fused elementwise kernels (layers.py calls these on a device; `twin` is its NumPy code) ----------


ROUNDING = {"fp32": 0, "bf16": 1, "fp16": 2}  # round.cuh's modes


def _fusable(xp, *arrays) -> bool:
    """CuPy arrays the float32 kernels take (C-contiguous float32); others run the twin on the device."""
    return all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)


def run_kernel(xp, name: str, nbytes: int, twin, args, launch):
    """The kernel `name` (one launch moving nbytes): launched on CuPy, counted with its twin computing elsewhere,
    the twin alone on CuPy for what the kernel does not take."""
    if xp.__name__ != "cupy":
        with launches.record_kernel(name, nbytes):
            return twin(*args)
    if not _fusable(xp, *(a for a in args if hasattr(a, "dtype"))):
        return twin(*args)
    return launch()


def grid_1d(n: int) -> tuple:
    return (max(1, min(-(-n // THREADS), 4096)),)


def gelu_forward(xp, x, twin, bias=None):
    """layers.gelu_forward: (out, t) in one pass (bias_gelu.cu); bias (the fc layer's, not yet added): x += bias
    in the same pass, x left holding GELU's input as the twin leaves it. twin(x, bias)."""

    def launch():
        out, t = xp.empty_like(x), xp.empty_like(x)
        fn = module("bias_gelu").get_function("bias_gelu_forward")
        n, width = np.int64(x.size), np.int32(x.shape[-1])
        b, x_out = (NULL, NULL) if bias is None else (bias, x)
        fn(grid_1d(x.size), (THREADS,), (x, b, x_out, out, NULL, t, n, width, np.int32(0)))
        return out, t

    if bias is None:
        return run_kernel(xp, "bias_gelu_forward", 3 * x.nbytes, twin, (x,), launch)
    nbytes = 4 * x.nbytes + bias.nbytes
    return run_kernel(xp, "bias_gelu_forward", nbytes, twin, (x, bias), launch)


def gelu_backward(xp, dout, x, t, twin):
    """layers.gelu_backward, in place over dout, in one pass."""

    def launch():
        fn = module("bias_gelu").get_function("bias_gelu_backward")
        fn(grid_1d(x.size), (THREADS,), (dout, x, t, np.int64(x.size), np.int32(0)))
        return dout

    return run_kernel(xp, "bias_gelu_backward", 4 * x.nbytes, twin, (dout, x, t), launch)


def layernorm_forward(xp, x, w, b, twin):
    """layers.layernorm_forward: (out, (xhat, rstd)), one block per row."""

    def launch():
        C = x.shape[-1]
        out, xhat = xp.empty_like(x), xp.empty_like(x)
        rstd = xp.empty((*x.shape[:-1], 1), dtype=x.dtype)
        fn = module("layernorm").get_function("layernorm_forward")
        args = (x, w, NULL if b is None else b, out, xhat, rstd, np.int32(C), np.int32(0))
        fn((x.size // C,), (THREADS,), args, shared_mem=THREADS * 4)
        return out, (xhat, rstd)

    return run_kernel(xp, "layernorm_forward", 3 * x.nbytes, twin, (x, w, b), launch)


def layernorm_backward_input(xp, dout, cache, w, twin):
    """layers.layernorm_backward_input: the input gradient, one block per row."""
    xhat, rstd = cache

    def launch():
        C = dout.shape[-1]
        dx = xp.empty_like(dout)
        fn = module("layernorm").get_function("layernorm_backward")
        args = (dout, xhat, rstd, w, dx, np.int32(C), np.int32(0))
        fn((dout.size // C,), (THREADS,), args, shared_mem=THREADS * 4)
        return dx

    nbytes = 3 * dout.nbytes
    return run_kernel(
        xp,
        "layernorm_backward",
        nbytes,
        lambda d, x_, r, w_: twin(d, (x_, r), w_),
        (dout, xhat, rstd, w),
        launch,
    )


def causal_softmax_(xp, att, prec, twin):
    """layers.causal_softmax_ of a query block's scores (..., Tq, Tk), in place, one block per row, rounded to
    prec's format in the same pass."""

    def launch():
        Tq, Tk = att.shape[-2], att.shape[-1]
        fn = module("softmax").get_function("masked_softmax_forward")
        mode = np.int32(ROUNDING[prec.name])
        args = (att, np.int32(Tq), np.int32(Tk), np.int32(Tk - Tq), mode)
        fn((att.size // Tk,), (THREADS,), args, shared_mem=THREADS * 4)
        return att

    def twin_(a):
        return twin(a, prec)

    return run_kernel(xp, "masked_softmax_forward", 2 * att.nbytes, twin_, (att,), launch)


def softmax_backward_(xp, datt, att, prec, twin):
    """layers.softmax_backward_: in place over datt, rounded to prec's format (model/precision.py) in the same
    pass."""

    def launch():
        Tk = datt.shape[-1]
        fn = module("softmax").get_function("masked_softmax_backward")
        args = (att, datt, np.int32(Tk), np.int32(ROUNDING[prec.name]))
        fn((datt.size // Tk,), (THREADS,), args, shared_mem=THREADS * 4)
        return datt

    def twin_(d, a):
        return twin(d, a, prec)

    return run_kernel(xp, "masked_softmax_backward", 3 * datt.nbytes, twin_, (datt, att), launch)


def round_(xp, x, prec, twin, out=None):
    """Precision.round_ (out None: in place) or Precision.operand (out: a new array) in one pass."""
    res = x if out is None else out

    def launch():
        fn = module("round").get_function("round_format")
        fn(grid_1d(x.size), (THREADS,), (x, res, np.int64(x.size), np.int32(ROUNDING[prec.name])))
        return res

    def twin_(x_):
        return twin(x_) if out is None else _into(out, twin(x_))

    return run_kernel(xp, "round_format", 2 * x.nbytes, twin_, (x,), launch)


def _into(out, x):
    out[...] = x
    return out


def dropout_scale(xp, x, keep, scale: float, twin, out=None):
    """DropoutMask.scaled (out: a new array) or apply_ (out None: in place) in one pass."""
    res = x if out is None else out

    def launch():
        fn = module("dropout_residual").get_function("dropout_scale")
        fn(grid_1d(x.size), (THREADS,), (x, keep, np.float32(scale), res, np.int64(x.size)))
        return res

    def twin_(x_):
        return twin(x_) if out is None else _into(out, twin(x_))

    return run_kernel(xp, "dropout_scale", 2 * x.nbytes + keep.nbytes, twin_, (x,), launch)


def dropout_residual_(xp, x, a, keep, scale: float, twin, bias=None):
    """kernels.dropout_residual_: x += (a + bias) * keep * scale (bias None: none; keep None: no dropout) in one
    pass, in place over x; twin(x, a, keep, scale, bias)."""

    def launch():
        fn = module("dropout_residual").get_function("dropout_residual_forward")
        k, b = (NULL if v is None else v for v in (keep, bias))
        n, width = np.int64(x.size), np.int32(x.shape[-1])
        fn(grid_1d(x.size), (THREADS,), (x, a, b, k, np.float32(scale), n, width))
        return x

    def twin_(x_, a_):
        return twin(x_, a_, keep, scale, bias)

    nbytes = 3 * x.nbytes + sum(0 if v is None else v.nbytes for v in (keep, bias))
    return run_kernel(xp, "dropout_residual_forward", nbytes, twin_, (x, a), launch)


# -- the 16-bit formats stored natively (Precision.keep / use on a device) -----------------------------------------


def storage_dtype(xp, prec):
    """The dtype a format's 16 bits are stored in on xp: NumPy's (ml_dtypes' bfloat16, float16); on CuPy, which has
    no bfloat16 dtype, bfloat16's bit patterns in uint16 (round.cu converts)."""
    if xp.__name__ == "cupy" and prec.name == "bf16":
        return np.dtype(np.uint16)
    return prec.low


def narrow(xp, x, prec, twin):
    """Precision.keep: float32 x (contiguous) stored in the format, 2 bytes an element, one pass; twin(x, low)."""

    def launch():
        out = xp.empty(x.shape, dtype=storage_dtype(xp, prec))
        fn = module("round").get_function("narrow_format")
        fn(grid_1d(x.size), (THREADS,), (x, out, np.int64(x.size), np.int32(ROUNDING[prec.name])))
        return out

    return run_kernel(
        xp, "narrow_format", 3 * x.size * 2, lambda x_: twin(x_, prec.low), (x,), launch
    )


def widen(xp, kept, prec, dtype, twin):
    """Precision.use: a narrow()ed array back in dtype (exact), one pass (float32; another dtype one cast more);
    twin(kept, dtype)."""
    nbytes = 3 * kept.size * 2
    if xp.__name__ != "cupy":
        with launches.record_kernel("widen_format", nbytes):
            return twin(kept, dtype)
    out = xp.empty(kept.shape, dtype=np.float32)
    fn = module("round").get_function("widen_format")
    src = xp.ascontiguousarray(kept)
    fn(
        grid_1d(kept.size),
        (THREADS,),
        (src, out, np.int64(kept.size), np.int32(ROUNDING[prec.name])),
    )
    return out if np.dtype(dtype) == np.float32 else out.astype(dtype)


def narrow_round(xp, x, prec, twin):
    """Precision.keep_use: (x kept in the format, its float32 rounded value) from float32 x (contiguous) in one
    pass; twin(x) -> the pair."""

    def launch():
        bits = xp.empty(x.shape, dtype=storage_dtype(xp, prec))
        out = xp.empty_like(x)
        fn = module("round").get_function("narrow_round")
        mode = np.int32(ROUNDING[prec.name])
        fn(grid_1d(x.size), (THREADS,), (x, bits, out, np.int64(x.size), mode))
        return bits, out

    return run_kernel(xp, "narrow_round", 5 * x.size * 2, twin, (x,), launch)


class WideRuns:
    """The runs [a, b) of the flat buffer refresh_compute also keeps in float32 (packed in that order), and on CuPy
    their starts and packed ends on the device once."""

    def __init__(self, xp, runs):
        self.runs = list(runs)
        self.total = sum(b - a for a, b in self.runs)
        self.cols = None
        if xp.__name__ == "cupy" and self.runs:
            ends = np.cumsum([b - a for a, b in self.runs], dtype=np.int64)
            self.cols = (
                xp.asarray(np.array([a for a, _ in self.runs], dtype=np.int64)),
                xp.asarray(ends),
            )


def refresh_compute(xp, master, bits, wide, runs: WideRuns, prec) -> None:
    """GPT.refresh_compute of a 2-byte compute copy: master (float32) stored in the format into bits, and runs of
    it as rounded float32 into wide, in one launch (round.cu)."""
    nbytes = master.nbytes + bits.nbytes + 2 * runs.total * master.itemsize
    if xp.__name__ != "cupy":
        with launches.record_kernel("refresh_compute", nbytes):
            twins.refresh_compute(master, bits, wide, runs.runs, prec.low)
        return
    starts, ends = runs.cols if runs.cols is not None else (NULL, NULL)
    fn = module("round").get_function("refresh_compute")
    mode = np.int32(ROUNDING[prec.name])
    args = (master, bits, np.int64(master.size), wide, starts, ends, np.int32(len(runs.runs)))
    fn(grid_1d(master.size), (THREADS,), (*args, np.int64(runs.total), mode))
