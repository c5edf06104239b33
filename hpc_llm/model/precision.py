"""Mixed precision (`train.precision`): the format of matmul operands and of the activations kept for backward.

    fp32   everything in the model's dtype (float32, or float64 for checks); nothing is rounded or copied.
    bf16   bfloat16 (8 exponent bits, 8 significant: unit roundoff u = 2^-8), through the ml_dtypes package.
    fp16   IEEE half (5 exponent bits, 11 significant: u = 2^-11; overflow above 65504: needs loss scaling).

With bf16/fp16 every matmul takes operands rounded to the format and accumulates their products in fp32: what a GPU
tensor core does (cuBLAS with bf16/fp16 inputs and CUBLAS_COMPUTE_32F). On NumPy that arithmetic is exactly an fp32
GEMM of the rounded operands, so it runs at fp32 speed. LayerNorm statistics, softmax, GELU, the cross-entropy, the
residual stream and every gradient buffer stay fp32; the activations kept for backward are stored in the format (half
the bytes). The weights' compute copy (GPT.compute) holds the master weights rounded to the format, refreshed after
each optimizer step; the fp32 master weights and Adam moments are the optimizer's, and the checkpoint's.
"""

from __future__ import annotations

import numpy as np

from hpc_llm.backend import array_module, low_dtype
from hpc_llm.kernels import gemm
from hpc_llm.kernels.cuda import device
from hpc_llm.kernels.rounding import from_low, round_into, round_low_, to_low

UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}


class Precision:
    def __init__(self, name: str = "fp32"):
        self.name = name
        self.low = low_dtype(name)
        self.u = UNIT_ROUNDOFF[name]

    def operand(self, x, out=None, bits=None):
        """x rounded to the format, in x's own dtype: a matmul operand (on a device one pass, round.cu); into out
        when given, and on the host its bf16 bit patterns into bits when given (one pass: rounding.round_into)."""
        if self.low is None:
            return x
        xp = array_module(x)
        if device.on_device(xp) and x.flags.c_contiguous:
            assert bits is None
            out = xp.empty_like(x) if out is None else out
            return device.round_(xp, x, self, self._operand, out=out)
        if out is None:
            return self._operand(x)
        return round_into(x, out, self.low, bits)

    def _operand(self, x):
        return round_low_(x.copy(), self.low)

    def gemm_operand(self, x):
        """x rounded to the format as the host's products read it: a bfloat16 array where they take bf16 as it is
        (oneDNN, kernels/gemm.reads_bf16: one pass, no float32 copy), else operand(x). Only for a value that goes to
        matmuls alone (or is widened again first: gemm.as_float32)."""
        if self.reads_low(x) and x.dtype == np.float32:
            return to_low(np.ascontiguousarray(x), self.low)
        if self.is_low(x.dtype) and self.reads_low(x):  # made in the format already
            return x
        return self.operand(x)

    def gemm_round_(self, x):
        """x (contiguous, ours) rounded to the format as the host's products read it: into a new bfloat16 array where
        they take bf16 as it is (x's float32 bytes then free to go), else round_(x) in place. Only for a value that
        goes to matmuls alone."""
        if self.reads_low(x) and x.dtype == np.float32:
            return to_low(x, self.low)
        return self.round_(x)

    def reads_low(self, x) -> bool:
        """Whether the host's products take x's format as it is (bf16 arrays on oneDNN: kernels/gemm.reads_bf16)."""
        return self.low is not None and type(x) is np.ndarray and gemm.reads_bf16(self)

    def round_(self, x):
        """x (contiguous, ours to overwrite) rounded to the format in place, a piece at a time: no temporaries the
        size of x (the largest operands, the probabilities and dlogits, are the largest arrays of a step); on a
        device one pass (round.cu)."""
        if self.low is None:
            return x
        xp = array_module(x)
        if device.on_device(xp) and x.flags.c_contiguous:
            return device.round_(xp, x, self, self._round_)
        return self._round_(x)

    def _round_(self, x):
        return round_low_(x, self.low)

    def keep(self, x):
        """An activation kept for backward: stored in the format (its rounded value, in half the bytes); on a
        device one pass (round.cu; CuPy holds bfloat16 as uint16 bit patterns: device.storage_dtype)."""
        if self.low is None or x.dtype == self.low:  # x.dtype == low: made in the format already
            return x
        xp = array_module(x)
        if device.on_device(xp) and x.dtype == np.float32:
            return device.narrow(xp, xp.ascontiguousarray(x), self, to_low)
        return to_low(x, self.low)

    def keep_use(self, x, dtype):
        """(keep(x), use(keep(x), dtype)): a linear layer's input kept, and its operand; on a device one pass
        (round.cu's narrow_round) where the two would be two."""
        if self.low is None:
            return x, x
        xp = array_module(x)
        if device.on_device(xp) and x.dtype == np.float32 and np.dtype(dtype) == np.float32:
            return device.narrow_round(xp, xp.ascontiguousarray(x), self, self._keep_use)
        kept = self.keep(x)
        # an x made in the format already: its operand in float32 where the products widen it
        return kept, self.gemm_use(kept, np.float32 if self.is_low(dtype) else dtype)

    def _keep_use(self, x):
        kept = to_low(x, self.low)
        return kept, from_low(kept, x.dtype)

    def is_low(self, dtype) -> bool:
        """Whether dtype is the format's own (a value held in 2 bytes); never in fp32 (np.dtype(None) is float64)."""
        return self.low is not None and np.dtype(dtype) == self.low

    def use(self, kept, dtype):
        """A kept activation back in the compute dtype (the rounded value: an operand as it is)."""
        if self.low is None:
            return kept
        xp = array_module(kept)
        if device.on_device(xp):
            return device.widen(xp, kept, self, dtype, from_low)
        return from_low(kept, dtype)

    def gemm_use(self, kept, dtype):
        """A kept activation as the host's products read it: itself where they take bf16 (gemm.reads_bf16), else
        use(kept, dtype). Only for a value that goes to matmuls alone."""
        if self.reads_low(kept) and kept.dtype == self.low and dtype in (np.float32, self.low):
            return kept
        return self.use(kept, dtype)


FP32 = Precision("fp32")
