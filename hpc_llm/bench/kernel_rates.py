"""The kernel layer's rates as a rank runs it (`hpc-llm bench calibrate`'s [compute.kernels] and
[compute.gemm_batched]): each elementwise call of the layers that plan/compute.py prices by a kernel figure
(plan/cluster.KERNELS), made through the function the step calls, so the compiled kernel or its NumPy twin and the
pool's parallel variant run as HPC_LLM_KERNELS and HPC_LLM_POOL choose in this process, at the layers' array sizes;
and attention's stacked products through kernels/gemm.matmul."""

from __future__ import annotations

import numpy as np

from hpc_llm.bench.timer import best_time
from hpc_llm.config import TrainConfig
from hpc_llm.kernels import gemm
from hpc_llm.kernels.cross_entropy import cross_entropy_backward_
from hpc_llm.kernels.dropout_residual import dropout_residual_
from hpc_llm.kernels.layernorm import layernorm_backward_input, layernorm_backward_weight
from hpc_llm.kernels.rows import (
    add_rows_,
    column_sums_into,
    from_heads,
    scatter_add_rows_,
    to_heads,
)
from hpc_llm.model.attention import rounded_softmax_, rounded_softmax_backward_
from hpc_llm.model.layers import gelu_backward_kept, gelu_forward_kept, layernorm_forward_kept
from hpc_llm.model.precision import FP32
from hpc_llm.model.vocab_parallel import vocab_parallel_cross_entropy_forward
from hpc_llm.optim import AdamW
from hpc_llm.parallel.comm import Comm

# array elements of the calls timed: the layers' activations span 2^16 (shakespeare-char) to 2^22 (GPT-2 small's
# MLP), its logits and AdamW's parameters 2^26-2^27; from 2^24 (64 MiB an array, past the caches) a call streams
# from memory, as larger ones do
KERNEL_SIZES = (1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24)
ROW = 384  # a row of the activations (n_embd): LayerNorm's, the bias's, the head layout's (6 heads of 64)
HEADS = 6
SCORES = (128, 256)  # a causal query block of the scores: 128 queries by 256 keys
VOCAB_ROW = 1024  # a row of logits


def _rng():
    return np.random.default_rng(0)


def _rows(n: int, width: int = ROW) -> np.ndarray:
    return _rng().standard_normal((max(1, n // width), width)).astype(np.float32)


def _restored(fn, arrays: list):
    """fn after restoring the arrays it overwrites (each (target, saved copy)), and the restores alone."""

    def restore():
        for target, saved in arrays:
            np.copyto(target, saved)

    return (lambda: (restore(), fn())), restore


def _layernorm_forward(n):
    x, w, b = _rows(n), np.ones(ROW, np.float32), np.zeros(ROW, np.float32)
    return lambda: layernorm_forward_kept(x, w, b), None


def _layernorm_backward_input(n):
    x, w = _rows(n), np.ones(ROW, np.float32)
    _, cache = layernorm_forward_kept(x, w, np.zeros(ROW, np.float32))
    dout = _rows(n)
    return lambda: layernorm_backward_input(dout, cache, w), None


def _layernorm_backward_weight(n):
    xhat, dout = _rows(n), _rows(n)
    dw, db = np.empty(ROW, np.float32), np.empty(ROW, np.float32)
    return lambda: layernorm_backward_weight(dout, xhat, dw, db, False), None


def _bias_add(n):
    x, b = _rows(n), np.full(ROW, 1e-3, np.float32)
    return lambda: add_rows_(x, b), None


def _residual_add(n):
    x, a = _rows(n), _rows(n) * np.float32(1e-3)
    return lambda: dropout_residual_(x, a), None


def _column_sums(n):
    x, out = _rows(n), np.empty(ROW, np.float32)
    return lambda: column_sums_into(x, out, False), None


def _to_heads(n):
    x = _rows(n, 3 * ROW)[None]  # (1, T, 3 C): qkv
    return lambda: to_heads(x, HEADS, 3, 0.125), None


def _from_heads(n):
    x = _rows(n, 3 * ROW)[None]
    xh = to_heads(x, HEADS, 3)
    return lambda: from_heads(xh, 0.125), None


def _scores(n) -> np.ndarray:
    q, k = SCORES
    return _rng().standard_normal((max(1, n // (q * k)), q, k)).astype(np.float32)


def _softmax_forward(n):
    att = _scores(n)
    return lambda: rounded_softmax_(att, FP32), None


def _softmax_backward(n):
    att = rounded_softmax_(_scores(n), FP32)
    datt = _scores(n)
    return _restored(
        lambda: rounded_softmax_backward_(datt, att, None, FP32), [(datt, datt.copy())]
    )


def _gelu_forward(n):
    f = _rows(n, 4 * ROW)
    return lambda: gelu_forward_kept(f, None), None


def _gelu_backward(n):
    _, f, t = gelu_forward_kept(_rows(n, 4 * ROW), None)
    dg = _rows(n, 4 * ROW)
    saved = [(a, a.copy()) for a in (dg, t)]
    return _restored(lambda: gelu_backward_kept(dg, f, t), saved)


def _targets(rows: int):
    return _rng().integers(0, VOCAB_ROW, rows)


def _cross_entropy(n):
    logits = _rows(n, VOCAB_ROW)
    targets, comm = _targets(logits.shape[0]), Comm()
    saved = [(logits, logits.copy())]
    return _restored(
        lambda: vocab_parallel_cross_entropy_forward(logits, targets, VOCAB_ROW, 0, comm), saved
    )


def _cross_entropy_backward(n):
    logits = _rows(n, VOCAB_ROW)
    _, (probs, local, mine) = vocab_parallel_cross_entropy_forward(
        logits, _targets(logits.shape[0]), VOCAB_ROW, 0, Comm()
    )
    fn = lambda: cross_entropy_backward_(probs, local, mine, 1.0 / probs.shape[0])  # noqa: E731
    return _restored(fn, [(probs, probs.copy())])


def _scatter_add(n):
    rows = _rows(n)
    table = np.zeros((1024, ROW), np.float32)
    idx = _rng().integers(0, table.shape[0], rows.shape[0])
    return lambda: scatter_add_rows_(table, idx, rows), None


def _adamw(n):
    p = _rng().standard_normal(n).astype(np.float32)
    g = _rng().standard_normal(n).astype(np.float32) * np.float32(1e-3)
    opt = AdamW(p, g, [(0, n)], TrainConfig())
    return lambda: opt.step(1e-4), None


# each kernel figure the planner reads (plan/cluster.KERNELS), by the call that makes it: (elements, n) -> (the
# call, what of it is not the kernel's: restoring what the call overwrites, or None)
KERNEL_CALLS = {
    "layernorm_forward": _layernorm_forward,
    "layernorm_backward_input": _layernorm_backward_input,
    "layernorm_backward_weight": _layernorm_backward_weight,
    "bias_add": _bias_add,
    "residual_add": _residual_add,
    "column_sums": _column_sums,
    "to_heads": _to_heads,
    "from_heads": _from_heads,
    "softmax_forward": _softmax_forward,
    "softmax_backward": _softmax_backward,
    "gelu_forward": _gelu_forward,
    "gelu_backward": _gelu_backward,
    "cross_entropy": _cross_entropy,
    "cross_entropy_backward": _cross_entropy_backward,
    "scatter_add": _scatter_add,
    "adamw": _adamw,
}


def _elements(name: str, n: int) -> int:
    """The elements a call of kernel `name` covers on arrays made for n (rounded to whole rows)."""
    width = {
        "to_heads": 3 * ROW,
        "from_heads": 3 * ROW,
        "gelu_forward": 4 * ROW,
        "gelu_backward": 4 * ROW,
        "cross_entropy": VOCAB_ROW,
        "cross_entropy_backward": VOCAB_ROW,
        "softmax_forward": SCORES[0] * SCORES[1],
        "softmax_backward": SCORES[0] * SCORES[1],
        "adamw": 1,
    }.get(name, ROW)
    return max(1, n // width) * width


def kernel_rates(sizes=KERNEL_SIZES, repeats: int = 5, names=None) -> dict:
    """{kernel: {elements: elements/s}}: each call of KERNEL_CALLS (names: those only) at each size, the best of
    `repeats` after a warm-up call (its compilation), twice round; a call that overwrites its input pays for
    restoring it, and that restore, timed alone, is taken off."""
    out: dict = {}
    for name in names or KERNEL_CALLS:
        table = out.setdefault(name, {})
        for n in sizes:
            call, restore = KERNEL_CALLS[name](n)
            call()
            t = min(best_time(call, repeats) for _ in range(2))
            if restore is not None:
                t -= min(best_time(restore, repeats) for _ in range(2))
            elems = _elements(name, n)
            table[str(elems)] = elems / max(t, 1e-9)
    return out


# the stacked products gemm_batched_rates times, by multiply-adds per matrix: r x r x r/2, HEADS matrices (rows x
# heads of a step: their operands past the L2 cache, as a step's are); attention's per-head products are 2^17
# (shakespeare-char) to 2^23 (GPT-2 small's last query block)
BATCHED_SIDES = (32, 64, 128, 256, 512)
HEADS = 48


def gemm_batched_rates(dtype=np.float32, repeats: int = 9, sides=BATCHED_SIDES) -> dict:
    """{multiply-adds per matrix: FLOP/s} of stacked products through kernels/gemm.matmul (a call per matrix: BLAS,
    or oneDNN's sgemm from gemm.POOL_MIN_MACS with the shared pool on), as attention makes them: for each side r,
    HEADS heads of r positions and r/2 dimensions, the mean rate of the scores' q @ k^T (k's transpose a view) and the
    output's att @ v, the better of two rounds."""
    rng = np.random.default_rng(0)
    out = {}
    for r in tuple(sides) * 2:
        h = r // 2
        q, k, v = (rng.standard_normal((HEADS, r, h)).astype(dtype) for _ in range(3))
        att = rng.standard_normal((HEADS, r, r)).astype(dtype)
        rates = []
        for a, b in ((q, k.transpose(0, 2, 1)), (att, v)):
            rates.append(2.0 * HEADS * r * r * h / best_time(lambda: gemm.matmul(a, b), repeats))
        key = str(r * r * h)
        out[key] = max(out.get(key, 0.0), float(np.mean(rates)))
    return out
