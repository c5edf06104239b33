"""train.recompute = "block" (Megatron's full recompute): backward runs each block's forward again from its kept
input instead of keeping its activations; "selective" (Megatron's selective recompute): each block keeps all but
attention's probabilities and dropout masks and GELU's tanh, which backward recomputes from the kept q, k, v and
GELU input. The same arithmetic on the same input gives the same values bit for bit, and a DropoutRNG's sites draw
the same masks again, so the gradients are bitwise those of keeping activations: in one process (float32 and
float64, dropout on, gradient accumulation, 1-3 query blocks), and through the trainer at tp 2 and pp 2. Recompute
must also keep less: "block" only each block's input, "selective" exactly the probabilities, masks and tanh less.
(Under bf16/fp16 selective's tanh is that of the kept, rounded GELU input: close to, not bitwise, the kept tanh.)"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import cache_bytes, check, crc, run_config, train
from mpi4py import MPI

from hpc_llm.config import ModelConfig
from hpc_llm.model.gpt import GPT
from hpc_llm.model.layers import DropoutRNG
from hpc_llm.parallel.grid import make_grid


@pytest.mark.parametrize(
    "mode, dtype, T",
    [
        ("block", "float32", 12),
        ("block", "float64", 12),
        ("selective", "float32", 12),
        ("selective", "float64", 12),
        # 3 query blocks (SA.ATTN_BLOCK = 128): each block's mask is drawn again in forward's order
        ("selective", "float64", 300),
    ],
)
def test_recompute_gradients_are_bitwise_the_same(mode, dtype, T):
    cfg = ModelConfig(
        n_layer=3, n_head=2, n_embd=16, block_size=T, vocab_size=40, dropout=0.2, dtype=dtype
    )
    keep, again = GPT(cfg, seed=3), GPT(cfg, seed=3, recompute=mode)
    rng = np.random.default_rng(0)
    for micro in range(2):  # two micro-batches accumulated
        x, y = rng.integers(0, 40, (4, T)), rng.integers(0, 40, (4, T))
        losses = [
            m.forward(x, y, rng=DropoutRNG(7, 0, micro, range(4)), keep_cache=True)
            for m in (keep, again)
        ]
        assert losses[0] == losses[1]
        for m in (keep, again):
            m.backward(loss_scale=0.5, accumulate=micro > 0)
    assert np.count_nonzero(keep.grad_flat) > 0.9 * keep.local_size  # a gradient worth comparing
    assert np.array_equal(keep.grad_flat, again.grad_flat)
    # and the premise: different masks (another micro-batch's) would change the gradients
    again.forward(x, y, rng=DropoutRNG(7, 0, 5, range(4)), keep_cache=True)
    again.backward(loss_scale=0.5, accumulate=True)
    assert not np.array_equal(keep.grad_flat, again.grad_flat)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_recompute_keeps_less(dropout):
    T, b, H = 64, 2, 2
    cfg = ModelConfig(
        n_layer=4,
        n_head=H,
        n_embd=32,
        block_size=T,
        vocab_size=40,
        dropout=dropout,
        dtype="float32",
    )
    x = np.random.default_rng(0).integers(0, 40, (b, T))
    kept = {}
    for recompute in ("none", "selective", "block"):
        model = GPT(cfg, seed=1, recompute=recompute)
        _, cache = model.chunks[0].forward(x, x, DropoutRNG(1, 0, 0, range(b)))
        kept[recompute] = cache_bytes(cache[1])  # the blocks' part
    block_input = b * T * 32 * 4
    assert kept["block"] == cfg.n_layer * block_input
    # attention probabilities, MLP activations, LayerNorm outputs, ...
    assert kept["none"] > 10 * kept["block"]
    # selective: exactly each block's probabilities (T x T causal, one query block: T^2 per head, float32), their
    # dropout masks (1 byte an entry) and GELU's tanh (b, T, 4C)
    scores, tanh = b * H * T * T, b * T * 4 * 32 * 4
    assert kept["none"] - kept["selective"] == cfg.n_layer * (
        scores * (4 + (1 if dropout else 0)) + tanh
    )


def test_recompute_with_a_plain_generator_and_dropout_is_refused():
    """A numpy Generator cannot draw the same masks again: refused rather than silently wrong."""
    cfg = ModelConfig(
        n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10, dropout=0.1, dtype="float64"
    )
    x = np.zeros((1, 4), dtype=np.int64)
    for mode in ("block", "selective"):
        with pytest.raises(ValueError, match="DropoutRNG"):
            GPT(cfg, seed=0, recompute=mode).forward(
                x, x, rng=np.random.default_rng(0), keep_cache=True
            )


@pytest.mark.parametrize(
    "layout",
    [pytest.param(name, marks=pytest.mark.parallel(nprocs=2), id=name) for name in ("TP2", "PP2")],
)
def test_recompute_through_the_trainer_is_bitwise(layout, data_dir, shared_tmp_path):
    """3 steps at tp 2 or pp 2 (1F1B, 4 micro-batches), dropout on, with and without recompute: the same losses,
    grad norms and parameters, bit for bit."""
    tp, pp = (2, 1) if layout == "TP2" else (1, 2)
    common = {
        "model.dropout": 0.1,
        "model.n_head": 4,
        "train.max_iters": 3,
        "train.eval_iters": 0,
        "train.grad_accum": 4,
        "parallel.tp": tp,
        "parallel.pp": pp,
    }
    runs = {
        r: train(
            run_config(data_dir, shared_tmp_path / r, **common, **{"train.recompute": r}),
            make_grid(MPI.COMM_WORLD, tp, pp),
        )
        for r in ("none", "selective", "block")
    }
    a = runs["none"]
    for mode in ("selective", "block"):
        b = runs[mode]
        same = (
            all(a.metrics.train[k] == b.metrics.train[k] for k in ("loss", "grad_norm"))
            and crc(a.model.flat) == crc(b.model.flat)
            and b.model.recompute == mode
            and a.model.recompute == "none"
        )
        check(same, f"{mode}: losses {a.metrics.train['loss']} vs {b.metrics.train['loss']}")
