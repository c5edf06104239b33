"""int8 weight-only quantization for inference: per-output-channel absmax scales, dequantized on the fly.

Each 2-D weight W is held as int8 q and float32 scales s, one per output channel, with W ~ q * s and
|W - q * s| <= s / 2 (s = absmax / 127, q = round(W / s)). The linears store W (in, out), so an output channel is a
column and y = x @ W ~ (x @ q) * s, an exact factorisation: the matmul runs on q converted to the compute dtype in
blocks of columns (bounded temporaries), the scale applied once per output. The tied embedding wte (V, C) is used
as the head's x @ wte^T, so its output channel is a ROW (one scale per vocabulary entry), and the embedding lookup
dequantizes just the rows it looks up. LayerNorms, biases and the position embedding stay float.

Under tensor parallelism each rank quantizes its shard: a column-parallel layer's columns are whole on a rank, and a
row-parallel layer's columns are split along their rows, so their absmax is allreduced (max) over the TP group: the
scales, and so the quantized weights, are those of the single-process model whatever the layout.
"""

from __future__ import annotations

import numpy as np

from hpc_llm.errors import UserError
from hpc_llm.model.layers import Param
from hpc_llm.model.tensor_parallel import RowParallelLinear

MODES = ("int8",)
# the dequantized temporary of one block of columns: within L2 (measured best: docs/performance.md)
BLOCK_BYTES = 1 << 18


class QuantizedWeight:
    """A 2-D int8 weight with float32 scales along `axis` (1: one per column, 0: one per row) that NumPy's `x @ w`
    and `w[idx]` accept (`__array_ufunc__ = None` makes ndarray defer `@` to `__rmatmul__`); `.T` is the transpose
    (no copy), its scales then along the other axis. `dtype` is the compute dtype the layers see."""

    __array_ufunc__ = None

    def __init__(self, q: np.ndarray, scale: np.ndarray, axis: int, dtype=np.float32):
        self.q, self.scale, self.axis, self.dtype = q, scale, axis, np.dtype(dtype)

    @classmethod
    def quantize(cls, w: np.ndarray, axis: int, comm=None) -> QuantizedWeight:
        """absmax per channel along `axis` (over the other axis; maxed over `comm` when given: the channel is split
        over its ranks), q = round(w / s) in [-127, 127]."""
        w32 = np.asarray(w, dtype=np.float32)
        amax = np.abs(w32).max(axis=1 - axis)
        if comm is not None:
            comm.allreduce_(amax, op="max")
        scale = (amax / 127.0).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        shape = (1, -1) if axis == 1 else (-1, 1)
        q = np.clip(np.rint(w32 / safe.reshape(shape)), -127, 127).astype(np.int8)
        return cls(q, scale, axis, w32.dtype)

    @property
    def shape(self) -> tuple:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    @property
    def T(self) -> QuantizedWeight:
        return QuantizedWeight(self.q.T, self.scale, 1 - self.axis, self.dtype)

    def dequantize(self) -> np.ndarray:
        shape = (1, -1) if self.axis == 1 else (-1, 1)
        return self.q.astype(self.dtype) * self.scale.reshape(shape)

    def __getitem__(self, idx):
        """Rows idx (any integer index array), dequantized: (*idx.shape, columns)."""
        rows = self.q[idx].astype(self.dtype)
        rows *= self.scale[idx][..., None] if self.axis == 0 else self.scale
        return rows

    def __rmatmul__(self, x):
        """x (N, in) @ W (in, out) in blocks of columns: (x @ q[:, a:b]) * s[a:b] (axis 1), or (x * s) @ q (axis 0,
        the scales on the input side)."""
        x = np.asarray(x)
        if x.ndim != 2:
            return NotImplemented
        dtype = np.result_type(x.dtype, self.dtype)
        if self.axis == 0:
            x = x * self.scale.astype(dtype)
        n_in, n_out = self.q.shape
        out = np.empty((x.shape[0], n_out), dtype=dtype)
        step = max(1, BLOCK_BYTES // (n_in * dtype.itemsize))
        # a prefill: wide blocks keep the GEMM efficient (the conversion is shared by many rows)
        if x.shape[0] > 16:
            step = max(step, 1024)
        for a in range(0, n_out, step):
            b = min(a + step, n_out)
            np.matmul(x, self.q[:, a:b].astype(dtype), out=out[:, a:b])
            if self.axis == 1:
                out[:, a:b] *= self.scale[a:b]
        return out


def check_quantize(mode: str | None, dtype, backend: str = "numpy") -> None:
    """UserError unless `mode` (None: no quantization) is known, the model float32 and the backend NumPy."""
    if mode is None:
        return
    if mode not in MODES:
        raise UserError(f"--quantize: expected one of {', '.join(MODES)}, got {mode!r}")
    if backend != "numpy":
        raise UserError(f"--quantize {mode}: the numpy backend only, got --backend {backend}")
    if np.dtype(dtype) != np.float32:
        raise UserError(
            f"--quantize {mode}: needs a float32 model, this one is {np.dtype(dtype)} (quantize for "
            "speed and memory; analyse in float64 without it)"
        )


def _copy(p: Param) -> Param:
    return Param(None if p.value is None else np.array(p.value), None)


def quantize_model(model, mode: str = "int8") -> None:
    """Replace the model's linear weights and the tied embedding by int8 ones (this rank's shards), its other
    parameters by their own small copies, and free the float32 buffers: the model is for inference from here on
    (no gradients, no training). weight_bytes(model) (this module) tells what it holds."""
    check_quantize(mode, model.dtype, "numpy" if model.xp is np else "cupy")
    held = {}
    for chunk in model.chunks:
        for block in chunk.blocks:
            for lin in (block.qkv, block.attn_proj, block.fc, block.mlp_proj):
                if isinstance(lin.w.value, QuantizedWeight):
                    continue
                comm = (
                    lin.comm if isinstance(lin, RowParallelLinear) and lin.comm.size > 1 else None
                )
                lin.w = Param(QuantizedWeight.quantize(lin.w.value, 1, comm), None)
                lin.b = _copy(lin.b)
                if getattr(lin, "lora", None) is not None:  # adapters stay float
                    A, B, s = lin.lora
                    lin.lora = (_copy(A), _copy(B), s)
            for ln in (block.ln_1, block.ln_2):
                ln.w, ln.b = _copy(ln.w), _copy(ln.b)
        wte = None
        for part in (chunk.embedding, chunk.head):
            if part is None:
                continue
            if wte is None:
                wte = (
                    part.wte.value
                    if isinstance(part.wte.value, QuantizedWeight)
                    else QuantizedWeight.quantize(part.wte.value, 0)
                )
            part.wte = Param(wte, None)  # one int8 copy for the tied pair
        if chunk.embedding is not None:
            chunk.embedding.wpe = _copy(chunk.embedding.wpe)
        if chunk.head is not None:
            chunk.head.ln_f.w, chunk.head.ln_f.b = (
                _copy(chunk.head.ln_f.w),
                _copy(chunk.head.ln_f.b),
            )
    for chunk in model.chunks:
        for name, obj in _named_weights(model, chunk):
            held[name] = obj
    model.params, model.grads = held, {}
    model.flat = model.grad_flat = model.compute = None  # the float32 buffers go
    model.compute_bits = None
    model.quantized = mode


def _named_weights(model, chunk):
    """(name, held object) of a chunk's parameters after quantize_model."""
    if chunk.embedding is not None:
        yield "wte.weight", chunk.embedding.wte.value
        yield "wpe.weight", chunk.embedding.wpe.value
    for block in chunk.blocks:
        p = f"h.{block.layer}."
        for name, lin in (
            ("attn.c_attn", block.qkv),
            ("attn.c_proj", block.attn_proj),
            ("mlp.c_fc", block.fc),
            ("mlp.c_proj", block.mlp_proj),
        ):
            yield p + name + ".weight", lin.w.value
            if lin.b.value is not None:
                yield p + name + ".bias", lin.b.value
        for name, ln in (("ln_1", block.ln_1), ("ln_2", block.ln_2)):
            yield p + name + ".weight", ln.w.value
            if ln.b.value is not None:
                yield p + name + ".bias", ln.b.value
    if chunk.head is not None:
        if chunk.embedding is None:
            yield "wte.weight", chunk.head.wte.value
        yield "ln_f.weight", chunk.head.ln_f.w.value
        if chunk.head.ln_f.b.value is not None:
            yield "ln_f.bias", chunk.head.ln_f.b.value


def weight_bytes(model) -> int:
    """Bytes of the parameters this rank holds: its flat buffer (float), or after quantize_model the int8 weights,
    their scales and the float rest (each distinct array once: the tied embedding is one)."""
    if getattr(model, "quantized", None) is None:
        return int(model.flat.nbytes)
    seen = {id(v): v for v in model.params.values()}
    return int(sum(v.nbytes for v in seen.values()))
