"""GPT-2's layers as forward/backward pairs (llm.c style).

Each `*_forward` returns its output and the cache its backward needs; each `*_backward` takes the upstream gradient and
that cache and returns the input gradient, writing parameter gradients into the views it is given. With
`accumulate=False` a parameter gradient is overwritten (the first micro-batch of a step, no zeroing pass needed);
with `accumulate=True` it is added to.

A layer with weights has its backward in two parts too (zero-bubble pipelines): `*_backward_input` (B, the input
gradient, on the critical path to the previous pipeline stage) and `*_backward_weight` (W, the weight gradients, from
the layer's input and its output gradient only, so it can wait); `*_backward` is W then B, the same arithmetic.
`WeightWork` holds the W parts a module's B leaves, or runs them at once.

Array-module agnostic: `xp = array_module(x)` is NumPy or CuPy. Linear weights are stored (in, out), as Hugging Face's
GPT-2 Conv1D stores them, so `y = x @ w + b` with no transpose.

The elementwise work (LayerNorm's forward and backward parts, GELU's, the causal softmax's) is the kernel layer's
(hpc_llm/kernels: a NumPy twin and a compiled kernel each), imported here under the layers' names.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from hpc_llm.backend import array_module
from hpc_llm.kernels.bias_gelu import (  # noqa: F401  (the layers' names)
    ELEMENTWISE_CHUNK,
    GELU_C,
    bias_gelu_forward_bf16,
    gelu_backward,
    gelu_backward_bf16,
    gelu_forward,
    gelu_tanh,
)
from hpc_llm.kernels.cuda import device
from hpc_llm.kernels.gemm import as_float32, matmul
from hpc_llm.kernels.layernorm import (  # noqa: F401
    LN_EPS,
    layernorm_backward_input,
    layernorm_backward_weight,
    layernorm_forward,
    layernorm_forward_bf16,
)
from hpc_llm.kernels.rounding import sum_rows_low
from hpc_llm.kernels.rows import add_rows_, column_sums_into, scatter_add_rows_
from hpc_llm.kernels.softmax import causal_mask, causal_softmax_, softmax_backward_  # noqa: F401
from hpc_llm.model.precision import FP32, Precision


class Param(NamedTuple):
    """A parameter's value and its gradient: views of the same shape into the flat parameter and gradient buffers."""

    value: object
    grad: object


NO_PARAM = Param(None, None)  # a bias the model does not have (model.bias = false)


def _sum_rows_into(x2d, out, accumulate: bool) -> None:
    """out (=|+=) the sum of x2d's rows; a bf16 x2d (an output gradient made for oneDNN) summed in float32."""
    if x2d.dtype != out.dtype and type(x2d) is np.ndarray:
        summed = sum_rows_low(x2d, out if not accumulate else np.empty_like(out))
        if accumulate:
            out += summed
    else:
        column_sums_into(x2d, out, accumulate)


# ---------------------------------------------------------------------------------------------------------------------
# Embedding: token + learned position


def embedding_forward(wte, wpe, idx, pos0: int = 0):
    """x[b, t] = wte[idx[b, t]] + wpe[pos0 + t]."""
    T = idx.shape[1]
    x = wte[idx]
    x += wpe[pos0 : pos0 + T]
    return x


def position_embedding_backward(dx, dwpe, accumulate: bool) -> None:
    """Sum over the batch into the position rows used (pos0 = 0); the rows beyond T get zero."""
    T, C = dx.shape[1], dx.shape[2]
    if not accumulate:
        dwpe[T:] = 0
    _sum_rows_into(dx.reshape(dx.shape[0], T * C), dwpe[:T].reshape(T * C), accumulate)


def embedding_backward(dx, idx, dwte, dwpe, accumulate: bool, accumulate_wte: bool = True) -> None:
    """Scatter-add into the token rows used; the position rows as above. With the tied head, wte already holds the
    head's gradient, so its rows are added to by default."""
    xp = array_module(dx)
    position_embedding_backward(dx, dwpe, accumulate)
    if not accumulate_wte:
        dwte[...] = 0
    if xp is np:
        scatter_add_rows_(dwte, idx.reshape(-1), dx.reshape(-1, dx.shape[-1]))
    else:
        xp.add.at(dwte, idx.reshape(-1), dx.reshape(-1, dx.shape[-1]))


# ---------------------------------------------------------------------------------------------------------------------
# LayerNorm over the last axis


def layernorm_forward_kept(x, w, b, prec: Precision = FP32, narrow: bool = False):
    """(out, (xhat kept in prec's format, rstd)). narrow: out in bf16 too where the host's kernel makes it so, the
    rounding in its pass (a product's operand only: Precision.keep_use takes it as it is), else float32."""
    if prec.name == "bf16":
        got = layernorm_forward_bf16(x, w, b, prec.low, narrow)
        if got is not None:
            return got
    out, (xhat, rstd) = layernorm_forward(x, w, b)
    return out, (prec.keep(xhat), rstd)


def layernorm_backward(dout, cache, w, dw, db, accumulate: bool):
    layernorm_backward_weight(dout, cache[0], dw, db, accumulate)
    return layernorm_backward_input(dout, cache, w)


# ---------------------------------------------------------------------------------------------------------------------
# GELU with its kept values in the precision's format


def gelu_forward_kept(f, b, prec: Precision = FP32, keep_t: bool = True):
    """(gelu(f + b), f + b kept, GELU's tanh term kept, or None unless keep_t): kept in prec's format (its values
    rounded, Precision.keep); in bf16 on the host the output too (the next product's operand, its rounded value),
    each written as bf16 by the pass that makes it (kernels/bias_gelu.py), bitwise the float32 pass then keep. f
    (b None: no bias) is left holding f + b."""
    if prec.name == "bf16":
        got = bias_gelu_forward_bf16(f, b, prec.low, keep_t)
        if got is not None:
            return got[1], got[0], got[2]
    g, t = gelu_forward(f, b)
    return g, prec.keep(f), prec.keep(t) if keep_t else None


def gelu_backward_kept(dg, f, t, prec: Precision = FP32, narrow: bool = False):
    """GELU's input gradient from its kept input f and tanh term t (None: recomputed from f) and the output
    gradient dg (overwritten; float32). narrow (only where the next products read bf16 arrays: Precision.reads_low):
    it may come back in bf16 already, rounded where it is made; bf16 values kept on the host are read as they
    are."""
    if t is not None and prec.name == "bf16" and prec.is_low(f.dtype) and prec.is_low(t.dtype):
        got = gelu_backward_bf16(dg, f, t, narrow)
        if got is not None:
            return got
    f = prec.use(f, dg.dtype)
    t = gelu_tanh(f) if t is None else prec.use(t, dg.dtype)
    return gelu_backward(dg, f, t)


# ---------------------------------------------------------------------------------------------------------------------
# Linear (weights stored (in, out))


# a matmul with 2 to this many rows (decoding: one per sequence; 1 row is a GEMV, fast) ...
SMALL_ROWS = 4
PANEL_BYTES = 1 << 19  # ... runs over column panels of w of this size (they stay in L2)


def linear_forward(x, w, b, prec: Precision = FP32):
    """y = x @ w + b over the last axis, as one 2-D matmul (b None: no bias, e.g. before a TP reduction). w may be
    any object `@` accepts (an int8 quantize.QuantizedWeight). A float32 product of few rows by a large weight is
    taken over column panels (_matmul_panels). prec: the operands' format (kernels/gemm.py)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= SMALL_ROWS:
        # a bf16 operand (Precision.gemm_use) of few rows: BLAS's product, by panels
        x2 = as_float32(x2)
    if (
        type(w) is np.ndarray
        and 2 <= x2.shape[0] <= SMALL_ROWS
        and w.dtype == np.float32 == x2.dtype
        and w.nbytes > 4 * PANEL_BYTES
    ):
        out = _matmul_panels(x2, w)
    else:
        out = matmul(x2, w, prec=prec)
    if b is not None:
        add_rows_(out, b)
    return out.reshape(*x.shape[:-1], w.shape[1])


def _matmul_panels(x2, w):
    """x2 @ w for a few rows x2 (M, K) by panels of w's columns that fit in L2. OpenBLAS's sgemm with M of 2-4
    packs all of w for each call and runs at a third of the memory bandwidth on this machine (2-3x slower than
    reading w once, measured: docs/performance.md); a panel at a time is packed from L2 instead. From 8 rows on the
    plain call is as fast with one BLAS thread and much faster with two (a thread hand-off per panel): measured."""
    K, N = w.shape
    out = np.empty((x2.shape[0], N), dtype=w.dtype)
    step = max(16, PANEL_BYTES // (K * w.itemsize) // 16 * 16)
    for a in range(0, N, step):
        np.matmul(x2, w[:, a : a + step], out=out[:, a : a + step])
    return out


def linear_backward(dout, x, w, dw, db, accumulate: bool, prec: Precision = FP32):
    """The cache of a linear layer is its input x. dw None: a frozen weight, no gradient computed."""
    linear_backward_weight(dout, x, dw, db, accumulate, prec)
    return linear_backward_input(dout, w, prec)


def linear_backward_weight(
    dout, x, dw, db, accumulate: bool, prec: Precision = FP32, dout_bits=None
) -> None:
    """W: dw = x^T dout (dw None: frozen, skipped), db = the sum of dout's rows (None: no bias). dout_bits: dout
    held in 2 bytes too (a device's), which the GEMM reads."""
    d2 = dout.reshape(-1, dout.shape[-1])
    if dw is not None:
        b = d2 if dout_bits is None else dout_bits.reshape(d2.shape)
        matmul(x.reshape(-1, x.shape[-1]).T, b, dw, accumulate, prec)
    if db is not None:
        _sum_rows_into(d2, db, accumulate)


def linear_backward_input(dout, w, prec: Precision = FP32):
    """B: dx = dout w^T."""
    d2 = dout.reshape(-1, dout.shape[-1])
    return matmul(d2, w.T, prec=prec).reshape(*dout.shape[:-1], w.shape[0])


class WeightWork:
    """The weight-gradient part (W) of a module's backward: what its input-gradient part (B) leaves, in order, each a
    function and the arrays it needs (a layer's kept input and its output gradient), called with `accumulate` last.

    WeightWork(None) keeps them for run(accumulate) later (a zero-bubble schedule's W op); WeightWork(True/False) runs
    each as it is added, in B's order, which is the unsplit backward, bit for bit and with nothing kept."""

    def __init__(self, accumulate: bool | None = None):
        self.now, self.todo = accumulate, []

    @property
    def deferred(self) -> bool:
        return self.now is None

    def add(self, fn, *args) -> None:
        if self.now is None:
            self.todo.append((fn, args))
        else:
            fn(*args, self.now)

    def keep(self, x):
        """x as a W part will read it: a copy when deferred and B goes on to update x in place, else x itself."""
        return x.copy() if self.now is None else x

    def run(self, accumulate: bool) -> None:
        """The kept parts in order; their arrays are dropped as they go."""
        todo, self.todo = self.todo, []
        while todo:
            fn, args = todo.pop(0)
            fn(*args, accumulate)


# ---------------------------------------------------------------------------------------------------------------------
# Dropout


class DropoutRNG:
    """Dropout randomness as a pure function of (seed, step, micro-batch, row of the global batch, site): one
    generator per row and site, advanced through that site's dropout draws in order. A site is a place in the model:
    0 the embedding, i + 1 block i; so a pipeline stage that holds blocks 4..7 draws exactly the masks the single
    process draws there, a data-parallel rank makes the generators of its own rows, and a resumed run draws what an
    uninterrupted one does, with no RNG state to checkpoint. ``for_heads`` is the view attention uses under tensor
    parallelism: each row draws the masks of all heads and keeps this rank's; ``for_positions`` the view of the
    dropouts on a slice of the sequence (sequence parallelism): each row draws the masks of all positions and keeps
    the slice's. A view shares its site's generators, so draws through any of them follow the site's one order.
    Masks are drawn on the host (NumPy) and moved to ``xp``."""

    def __init__(self, seed: int, step: int, micro: int, rows: range, xp=np):
        self.key, self.rows, self.xp = (seed, 0xD80, step, micro), rows, xp
        self.gens, self.heads, self.positions = None, None, None
        # k of site(k): the device path's attention masks hash it (kernels/attention.py)
        self.site_index = None

    def _view(self, gens, heads=None, positions=None, site_index=None) -> DropoutRNG:
        view = DropoutRNG.__new__(DropoutRNG)
        view.key, view.rows, view.xp = self.key, self.rows, self.xp
        view.site_index = self.site_index if site_index is None else site_index
        view.gens, view.heads, view.positions = gens, heads, positions
        return view

    def site(self, k: int) -> DropoutRNG:
        """The generators of site k, fresh (each site is drawn from once per forward)."""
        return self._view(
            [np.random.Generator(np.random.PCG64([*self.key, r, k])) for r in self.rows],
            site_index=k,
        )

    def for_heads(self, h0: int, h1: int, n_head: int) -> DropoutRNG:
        """Draws of shape (rows, heads h0..h1 of n_head, ...): each row draws all n_head and keeps [h0, h1)."""
        return self._view(self.gens, heads=(h0, h1, n_head))

    def for_positions(self, t0: int, t1: int, T: int) -> DropoutRNG:
        """Draws of shape (rows, positions t0..t1 of T, ...): each row draws all T and keeps [t0, t1)."""
        return self._view(self.gens, positions=(t0, t1, T))

    def random(self, shape, dtype) -> object:
        """Uniform [0, 1) of ``shape`` = (this rank's rows, ...); with heads, (rows, this rank's heads, ...); with
        positions, (rows, the slice's positions, ...)."""
        assert self.gens is not None, "draw from a site: DropoutRNG.site(k)"
        assert shape[0] == len(self.gens), (shape, len(self.gens))
        part = self.heads or self.positions
        out = np.empty(shape, dtype)
        for gen, row in zip(self.gens, out):
            if part is None or part[1] - part[0] == part[2]:
                gen.random(row.shape, dtype=dtype, out=row)
            else:
                a, b, n = part
                row[...] = gen.random((n, *row.shape[1:]), dtype=dtype)[a:b]
        return out if self.xp is np else self.xp.asarray(out)


def dropout_site(rng, k: int):
    """rng's generator for site k: a DropoutRNG's own (layout-independent), or any other Generator as it is."""
    return rng.site(k) if isinstance(rng, DropoutRNG) else rng


class DropoutMask(NamedTuple):
    """A dropout's mask as backward keeps it: which elements were kept, one byte each (bool), and the scale
    1 / (1 - p) they are multiplied by. Multiplying by the kept flags (exact: x * 1 or x * 0) then by the scale gives
    bitwise what one multiplication by the scaled mask gives, at a quarter of a float32 mask's bytes."""

    keep: object  # bool array
    scale: float

    def apply_(self, x):
        """x *= the scaled mask, in place (on a device one pass: cuda/dropout_residual.cu)."""
        xp = array_module(x)
        if device.on_device(xp) and x.flags.c_contiguous:
            return device.dropout_scale(xp, x, self.keep, self.scale, self._apply_)
        return self._apply_(x)

    def _apply_(self, x):
        x *= self.keep
        x *= self.scale
        return x

    def scaled(self, x):
        """x times the scaled mask, a new array (on a device one pass)."""
        xp = array_module(x)
        if device.on_device(xp) and x.flags.c_contiguous:
            out = xp.empty_like(x)
            return device.dropout_scale(xp, x, self.keep, self.scale, self._scaled, out=out)
        return self._scaled(x)

    def _scaled(self, x):
        out = x * self.keep
        out *= self.scale
        return out


def dropout_forward(x, p: float, rng):
    """Inverted dropout; rng: a NumPy/CuPy Generator or a DropoutRNG. Returns out and the mask (the cache)."""
    mask = dropout_mask(x.shape, x.dtype, p, rng)
    return mask.scaled(x), mask


def dropout_mask(shape, dtype, p: float, rng) -> DropoutMask:
    """The next mask rng draws (uniforms of `dtype`, kept where >= p)."""
    return DropoutMask(rng.random(shape, dtype=dtype) >= p, 1.0 / (1.0 - p))


def dropout_backward(dout, mask: DropoutMask):
    return mask.apply_(dout)
