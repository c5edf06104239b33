"""The device path's launch counts (kernels/cuda/launches.py, plan/launches.py) and the fused optimizer's twin.

The counts are what the code runs on a device, counted on NumPy: they must not grow with the model (the heads, the
width, the layers, the shard), and stay under stated bounds."""

import numpy as np
import pytest

from hpc_llm.config import TrainConfig
from hpc_llm.kernels.cuda.launches import counting, xp
from hpc_llm.optim import AdamW, global_grad_norm
from hpc_llm.plan.launches import block_counts, optimizer_counts

# launches per block, whatever T (the fused attention): forward, backward (B and W); GEMMs included
BLOCK_BOUNDS = {"fp32": (16, 28), "bf16": (40, 60)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "modes",
    [
        dict(precision="fp32"),
        dict(precision="bf16", tp=2, sp=True, recompute="selective", dropout=0.1),
    ],
    ids=["fp32", "bf16-tp2-sp-selective-dropout"],
)
def test_block_launches_do_not_grow_with_the_model_or_the_sequence(modes):
    small = block_counts(T=64, head_dim=16, heads_per_rank=2, **modes)
    large = block_counts(T=64, head_dim=32, heads_per_rank=3, **modes)
    longer = block_counts(
        T=256, head_dim=16, heads_per_rank=2, **modes
    )  # two attention tiles: eight
    for other in (large, longer):
        assert small.forward.launches == other.forward.launches
        assert small.backward.launches == other.backward.launches
    fwd, bwd = BLOCK_BOUNDS[modes["precision"]]
    assert small.forward.total <= fwd and small.backward.total <= bwd
    # the bytes do grow: what the planner scales
    assert large.forward.elementwise_bytes > 2 * small.forward.elementwise_bytes


@pytest.mark.timeout(60)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_optimizer_step_launches_do_not_grow_with_the_shard(precision):
    small, large = optimizer_counts(1, 64, precision), optimizer_counts(3, 192, precision)
    assert small.launches == large.launches
    # norm (2) + AdamW (1), and with a 16-bit compute copy its refresh (one rounding pass)
    assert small.total == (3 if precision == "fp32" else 4)
    assert large.elementwise_bytes > 10 * small.elementwise_bytes


def _optimizer(xpm, seed=0, n=3000):
    rng = np.random.default_rng(seed)
    p = xpm.asarray(rng.standard_normal(n).astype(np.float32))
    g = xpm.asarray(rng.standard_normal(n).astype(np.float32))
    t = TrainConfig(weight_decay=0.1)
    return AdamW(p, g, [(100, 1700), (2000, 2900)], t, owned=[(0, 1200), (1500, 3000)], chunk=256)


@pytest.mark.timeout(30)
def test_fused_adamw_equals_the_chunked_optimizer_bitwise():
    cpu, dev = _optimizer(np), _optimizer(xp)
    dev_chunks = dev.segments
    dev = AdamW(dev.p, dev.g, [(100, 1700), (2000, 2900)], dev.cfg, owned=dev.owned)
    assert len(dev.segments) < len(dev_chunks)  # one segment per decay edge, not per chunk
    with counting() as ledger:
        for step in range(3):
            for o in (cpu, dev):
                o.step(1e-2 * (step + 1), grad_scale=0.5)
    assert ledger.total == 3  # one launch a step
    for a in ("p", "m", "v"):
        assert np.array_equal(np.asarray(getattr(cpu, a)), np.asarray(getattr(dev, a))), a


@pytest.mark.timeout(30)
def test_fused_norm_equals_the_chunked_norm():
    from types import SimpleNamespace

    comm = SimpleNamespace(allreduce_scalar=lambda v: v)
    g = np.random.default_rng(3).standard_normal(200_000).astype(np.float32) * 1e3
    ranges = [(0, 70_000), (90_000, 200_000)]
    want = global_grad_norm(g, ranges, comm)
    gd = xp.asarray(g)
    with counting() as ledger:
        got = global_grad_norm(gd, ranges, comm)
    assert ledger.total == 2
    assert abs(got - want) <= 1e-13 * want


@pytest.mark.timeout(60)
def test_fused_attention_is_priced_from_its_bytes_and_tile_products():
    """The ledger holds the fused kernels' bytes (q, k, v, y, logsumexp once forward; plan/fused_attention.py's
    docstring), and the planner's products are 2 forward and 7 backward of T x (mean keys of a query tile) x hd."""
    from types import SimpleNamespace

    from hpc_llm.plan import fused_attention

    T, hd, heads = 64, 16, 2
    fwd = block_counts(T=T, head_dim=hd, heads_per_rank=heads).forward
    qkv = 3 * T * heads * hd * 4
    assert fwd.launches["attention_forward"] == 1
    assert fwd.nbytes["attention_forward"] == qkv + qkv // 3 + heads * T * 4
    p = SimpleNamespace(share=1.0, dtype="float32", cl=SimpleNamespace(gemm_rate=lambda *a: 1e12))
    keys = (32 * 32 + 32 * 64) / 64  # tiles [0, 32) and [32, 64): 32 and 64 keys
    one = 2.0 * T * keys * hd * 3 / 1e12  # b = 1, h = 3
    assert fused_attention.fused_seconds(p, 1, T, 3, hd, False) == pytest.approx(2 * one)
    assert fused_attention.fused_seconds(p, 1, T, 3, hd, True) == pytest.approx(7 * one)
