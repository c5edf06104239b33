"""A pipeline message on the 16-bit wire (parallel/wire16.py: n words of the values scaled by a power of two s and
rounded to the format, then s in SCALE_WORDS words) made and read on a device, one kernel each (round.cu's
wire_narrow / wire_widen): what is staged through the host is the 2-byte words, not the float32 values, and the
casts run on the device. Their twins are compression.write16 / read16, the host path's own code."""

from __future__ import annotations

import numpy as np

from hpc_llm.backend import low_dtype
from hpc_llm.kernels.cuda import device, launches
from hpc_llm.parallel.compression import SCALE_WORDS, read16, write16


def narrow_message(xp, x, fmt: str, s: float):
    """x (float32, C-contiguous, on the device) as a message's words, a new device array of x.size + SCALE_WORDS
    uint16."""
    words = xp.empty(x.size + SCALE_WORDS, dtype=np.uint16)
    if xp.__name__ != "cupy":
        with launches.record_kernel("wire_narrow", 6 * x.size):
            write16(words, 0, x.reshape(-1), low_dtype(fmt), s)
        return words
    fn = device.module("round").get_function("wire_narrow")
    mode = np.int32(device.ROUNDING[fmt])
    fn(device.grid_1d(x.size), (device.THREADS,), (x, words, np.int64(x.size), np.float32(s), mode))
    return words


def widen_message(xp, words, out, fmt: str) -> None:
    """A message's words (on the device) widened and unscaled into out (float32, C-contiguous, on the device)."""
    if xp.__name__ != "cupy":
        with launches.record_kernel("wire_widen", 6 * out.size):
            read16(words, 0, out.size, low_dtype(fmt), out.reshape(-1))
        return
    fn = device.module("round").get_function("wire_widen")
    mode = np.int32(device.ROUNDING[fmt])
    fn(device.grid_1d(out.size), (device.THREADS,), (words, out, np.int64(out.size), mode))
