"""The device path's launches and bytes, counted (kernels/cuda/launches.py): one Block's forward and backward, and
one optimizer step (gradient norm, AdamW, the compute copy's refresh), run on NumPy through the stand-in for CuPy.

What the planner prices for a device backend comes from here, so it prices what the code runs. A Block is run at
the target's sequence length, head size, tensor-parallel size and modes with one head per TP rank (n_embd = HEADS x tp x
head size) and one row: every elementwise array of a block is then proportional to the rows and to the heads per
rank (but the rows' LayerNorm statistics: < 1%), so the target's bytes are these times b x heads per rank / HEADS;
the launches depend on neither (tested)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace

import numpy as np

from hpc_llm.config import ModelConfig, TrainConfig
from hpc_llm.kernels.cuda.launches import Ledger, counting, record_kernel, xp
from hpc_llm.model.gpt import GPT
from hpc_llm.model.layers import DropoutRNG, WeightWork
from hpc_llm.optim import AdamW, global_grad_norm

HEADS = 2  # heads per TP rank that block_counts runs (one head would make some copies views)


class StandInTP:
    """A tensor-parallel group of `size` ranks as rank 0 sees it, for counting: collectives return arrays of the
    right shapes (their values are not the sums) and count as communication, not launches. wire ("bf16" | "fp16",
    parallel.act_comm): activations travel in 16 bits, so each collective is also a conversion kernel before
    (what this rank sends, narrow_format) and one after (what it receives, widen_format): round.cu's, as a device
    with CUDA-aware collectives runs them (Comm.with_wire converts on the host after staging today)."""

    def __init__(self, size: int, wire: str | None = None):
        self.size, self.rank, self.wire = size, 0, wire
        self.plain = StandInTP(size) if wire else self

    def _casts(self, sent: int, received: int) -> None:
        if self.wire:  # 4 bytes read and 2 written an element, or 2 read and 4 written
            with record_kernel("wire_narrow", 6 * sent):
                pass
            with record_kernel("wire_widen", 6 * received):
                pass

    def allreduce_(self, buf, op: str = "sum"):
        if self.size > 1:
            with record_kernel("tp_collective", 0):
                pass
            self._casts(buf.size, buf.size)
        return buf

    def allgather_along(self, x, axis: int):
        if self.size == 1:
            return x
        with record_kernel("tp_collective", 0):
            out = xp.asarray(np.concatenate([np.asarray(x)] * self.size, axis=axis))
        self._casts(x.size, out.size)
        return out

    def reduce_scatter_along(self, x, axis: int):
        if self.size == 1:
            return x
        with record_kernel("tp_collective", 0):
            n = x.shape[axis] // self.size
            out = xp.asarray(np.ascontiguousarray(np.take(np.asarray(x), range(n), axis=axis)))
        self._casts(x.size, out.size)
        return out

    def allgather_(self, flat, counts):
        with record_kernel("tp_collective", 0):
            return flat


@dataclass
class BlockCounts:
    """One Block's ledgers: forward and backward (B and W at once), at one row and one head per TP rank."""

    forward: Ledger
    backward: Ledger


@lru_cache(maxsize=32)
def block_counts(
    T: int,
    head_dim: int,
    tp: int = 1,
    precision: str = "fp32",
    recompute: str = "none",
    dropout: float = 0.0,
    sp: bool = False,
    dtype: str = "float32",
    heads_per_rank: int = HEADS,
    act_comm: str = "fp32",
) -> BlockCounts:
    """Counted on a fresh one-layer model; the forward runs once before (the causal masks are cached). act_comm:
    the TP collectives' format (StandInTP's wire)."""
    H = tp * heads_per_rank
    cfg = ModelConfig(
        n_layer=1,
        n_head=H,
        n_embd=H * head_dim,
        block_size=T,
        vocab_size=64 * tp,
        dropout=dropout,
        dtype=dtype,
    )
    sp = sp and tp > 1
    model = GPT(
        cfg,
        xp,
        seed=None,
        tp_comm=StandInTP(tp, None if act_comm == "fp32" else act_comm),
        recompute=recompute,
        precision=precision,
        sequence_parallel=sp,
    )
    model.flat[...] = np.random.default_rng(0).standard_normal(model.local_size) * 0.02
    model.refresh_compute()
    block = model.chunks[0].blocks[0]
    rows = T // tp if sp else T
    x0 = np.random.default_rng(1).standard_normal((1, rows, cfg.n_embd)).astype(dtype)

    def rng():
        return DropoutRNG(0, 0, 0, range(1), xp) if dropout > 0 else None

    block.forward(xp.asarray(x0.copy()), rng())
    with counting() as fwd:
        _, cache = block.forward(xp.asarray(x0.copy()), rng())
    dy = xp.asarray(np.ones_like(x0))
    with counting() as bwd:
        work = WeightWork(False)
        block.backward_input(dy, cache, work, rng())
        work.run(False)
    return BlockCounts(fwd, bwd)


def optimizer_model(n_layer: int, n_embd: int) -> ModelConfig:
    """optimizer_counts' model: n_layer blocks of width n_embd, one head per 64 columns."""
    return ModelConfig(
        n_layer=n_layer,
        n_head=max(1, n_embd // 64),
        n_embd=n_embd,
        block_size=16,
        vocab_size=64,
        dtype="float32",
    )


@lru_cache(maxsize=8)
def optimizer_counts(n_layer: int, n_embd: int, precision: str = "fp32") -> Ledger:
    """One optimizer step on a device: the global norm, AdamW over the whole shard and the compute copy's refresh,
    for a model of n_layer blocks of width n_embd (one head per 64 columns)."""
    model = GPT(optimizer_model(n_layer, n_embd), xp, seed=None, precision=precision)
    opt = AdamW(model.flat, model.grad_flat, model.decay_ranges(), TrainConfig())
    comm = SimpleNamespace(allreduce_scalar=lambda v: v)
    with counting() as ledger:
        norm = global_grad_norm(model.grad_flat, [(0, model.local_size)], comm)
        opt.step(1e-3, grad_scale=min(1.0, 1.0 / (norm + 1e-6)))
        model.refresh_compute()
    return ledger


def per_element_bytes(ledger: Ledger, elems: int) -> float:
    """A ledger's elementwise bytes per element of the shard it was counted on."""
    return ledger.elementwise_bytes / max(elems, 1)


def block_scale(b: int, n_head: int, tp: int) -> int:
    """What a block_counts ledger's bytes are multiplied by for b rows and n_head heads over tp ranks."""
    return b * max(1, n_head // tp)
