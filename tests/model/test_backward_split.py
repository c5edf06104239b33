"""The backward in two parts (zero-bubble schedules): B (Chunk.backward_input, the input gradient) for every
micro-batch first, then W (Chunk.backward_weight, the weight gradients) for each in order, is bitwise the unsplit
backward (Chunk.backward): every gradient (the tied embedding's to rounding: split_checks), every input gradient
between chunks, and grad_ready's calls in the same order. Run over the whole model on one chunk (embedding, blocks,
tied head) and split in two chunks, with dropout, each recompute mode, no biases, frozen weights, LoRA, bf16, and
under tensor parallelism (with sequence parallelism: the LayerNorms' partials, SlicePartials, reduced in W). All of
B before any W also shows W reads nothing a later B overwrites. The layer functions' own two parts (linear,
LayerNorm) against the unsplit functions' sums at float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check
from mpi4py import MPI

from hpc_llm.config import ModelConfig
from hpc_llm.model import layers as L
from hpc_llm.model.gpt import GPT
from hpc_llm.model.layout import StagePlan
from hpc_llm.parallel.grid import make_grid

B, T, MICRO = 2, 16, 3


def run(model: GPT, split: bool):
    """MICRO micro-batches through model's chunks; -> (gradients, input gradients between chunks, grad_ready's
    offsets)."""
    rng = np.random.default_rng(5)
    ready, dxs, pending = [], [], []
    for micro in range(MICRO):
        x, y = rng.integers(0, 65, (B, T)), rng.integers(0, 65, (B, T))
        drop = L.DropoutRNG(11, 1, micro, range(B))
        inp, caches = x, []
        for chunk in model.chunks:
            inp, cache = chunk.forward(inp, y if chunk.head else None, drop)
            caches.append(cache)
        d = None
        for chunk, cache in zip(reversed(model.chunks), reversed(caches)):
            if split:
                d, weights = chunk.backward_input(d, cache, 0.5, head_accumulate=micro > 0)
                pending.append((chunk, weights, micro > 0))
            else:
                d = chunk.backward(d, cache, 0.5, accumulate=micro > 0, grad_ready=ready.append)
            dxs.append(None if d is None else d.copy())
    for chunk, weights, accumulate in pending:
        chunk.backward_weight(weights, accumulate, grad_ready=ready.append)
    return model.grad_flat.copy(), dxs, ready


def split_checks(pair, name: str) -> list[str]:
    """Bitwise, except the tied embedding's gradient: the head's W runs with its B (Chunk.backward_input), so the
    head's shares of all micro-batches are summed before the embedding's, not alternating with them: the same terms
    in another order, equal to a few roundings of the largest entry."""
    model, again = pair
    got, want = run(again, split=True), run(model, split=False)
    bad = []
    wte = model.spec["wte.weight"]
    tied = slice(wte.offset, wte.offset + wte.size)
    scale = np.abs(want[0][tied]).max()
    err = np.abs(got[0][tied] - want[0][tied]).max()
    if not err <= 8 * np.finfo(model.dtype).eps * scale:
        bad.append(
            f"{name}: the tied embedding's gradient differs by {err:.3e} (largest {scale:.3e})"
        )
    got[0][tied] = want[0][tied]
    if not np.array_equal(got[0], want[0]):
        diff = np.flatnonzero(got[0] != want[0])
        bad.append(f"{name}: {diff.size} gradient entries differ (first at {diff[:3]})")
    if len(got[1]) != len(want[1]) or any(
        (a is None) != (b is None) or (a is not None and not np.array_equal(a, b))
        for a, b in zip(got[1], want[1])
    ):
        bad.append(f"{name}: the input gradients differ")
    if got[2] != want[2] or not want[2]:
        bad.append(f"{name}: grad_ready calls {got[2]}, unsplit {want[2]}")
    return bad


VARIANTS = {
    "dropout": {},
    "no-dropout": {"dropout": 0.0},
    "no-bias": {"bias": False},
    "recompute-block": {"recompute": "block"},
    "recompute-selective": {"recompute": "selective"},
    "frozen": {"freeze": ("h.*.attn.c_attn.weight", "h.*.mlp.c_proj.bias", "wte.weight")},
    "lora": {"lora_rank": 4, "lora_alpha": 2.0, "lora_targets": ["attn.c_attn", "mlp.c_proj"]},
    "bf16": {"precision": "bf16", "dtype": "float32"},
}


def pair_for(plan: str, variant: dict, tp_comm=None):
    """Two identical models; plan "whole" (one chunk) or "two" (two chunks on this rank: embedding + block 0,
    block 1 + head, the input gradient passing between them)."""
    kw = dict(variant)
    recompute = kw.pop("recompute", "none")
    model_kw = {k: kw.pop(k) for k in ("precision", "freeze", "sequence_parallel") if k in kw}
    cfg = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": T, "vocab_size": 65}
    cfg = ModelConfig(**{**cfg, "dropout": 0.1, "dtype": "float64", **kw})
    layers = (range(2),) if plan == "whole" else (range(1), range(1, 2))
    stages = StagePlan(layers, virtual=len(layers))
    return tuple(
        GPT(cfg, seed=3, tp_comm=tp_comm, plan=stages, recompute=recompute, **model_kw)
        for _ in range(2)
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_b_then_w_is_bitwise_the_backward(variant):
    bad = []
    for plan in ("whole", "two"):
        bad += split_checks(pair_for(plan, VARIANTS[variant]), f"{variant} {plan}")
    assert not bad, "\n".join(bad)


TP_VARIANTS = {
    "tp": {"dropout": 0.0},
    "tp-sp-selective": {"sequence_parallel": True, "recompute": "selective"},
    "tp-sp-frozen": {"sequence_parallel": True, "freeze": ("h.*.mlp.c_fc.weight",)},
    "tp-lora": {"lora_rank": 4, "lora_targets": ["attn.c_attn", "attn.c_proj"]},
}


@pytest.mark.timeout(120)
@pytest.mark.parallel(nprocs=2)
def test_b_then_w_is_bitwise_the_backward_under_tensor_parallelism():
    assert MPI.COMM_WORLD.Get_size() == 2
    grid = make_grid(MPI.COMM_WORLD, 2)
    bad = []
    for name, variant in TP_VARIANTS.items():
        for plan in ("whole", "two"):
            bad += split_checks(pair_for(plan, variant, grid.tp_comm), f"{name} {plan}")
    check(not bad, "\n".join(bad))


@pytest.mark.timeout(30)
def test_layer_parts_sum_to_the_float64_gradients():
    """linear and LayerNorm: W's gradients and B's input gradient against the definitions, accumulate on and off."""
    rng = np.random.default_rng(0)
    x, dout, w = (
        rng.standard_normal((3, 5, 6)),
        rng.standard_normal((3, 5, 4)),
        rng.standard_normal((6, 4)),
    )
    dw, db = np.full((6, 4), 2.0), np.full(4, 2.0)
    L.linear_backward_weight(dout, x, dw, db, accumulate=True)
    assert np.allclose(dw, 2 + np.einsum("bti,btj->ij", x, dout), rtol=1e-14)
    assert np.allclose(db, 2 + dout.sum((0, 1)), rtol=1e-14)
    L.linear_backward_weight(dout, x, dw, None, accumulate=False)
    assert np.allclose(dw, np.einsum("bti,btj->ij", x, dout), rtol=1e-14)
    assert np.allclose(L.linear_backward_input(dout, w), dout @ w.T, rtol=1e-14)
    xl, gl = rng.standard_normal((3, 5, 6)), rng.standard_normal(6)
    out, cache = L.layernorm_forward(xl, gl, np.zeros(6))
    dw, db = np.zeros(6), np.zeros(6)
    dl = rng.standard_normal((3, 5, 6))
    L.layernorm_backward_weight(dl, cache[0], dw, db, accumulate=False)
    assert np.allclose(dw, (dl * cache[0]).sum((0, 1)), rtol=1e-14)
    assert np.allclose(db, dl.sum((0, 1)), rtol=1e-14)
    # B: finite differences of sum(dl * layernorm(x)) along a random direction
    e = rng.standard_normal(xl.shape) * 1e-6
    up = (dl * L.layernorm_forward(xl + e, gl, None)[0]).sum()
    down = (dl * L.layernorm_forward(xl - e, gl, None)[0]).sum()
    got = (L.layernorm_backward_input(dl, cache, gl) * e).sum()
    assert abs(got - (up - down) / 2) <= 1e-8 * abs(got)
