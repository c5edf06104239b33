"""The planner's 16-bit GEMMs: a CPU cluster with a compute.gemm.bfloat16 figure runs bf16's products of
kernels/gemm.py's sizes on oneDNN (Cluster.reads_bf16), a CuPy cluster the blocks' linears on 16-bit operands
(gemm16); files without the figure priced bit for bit as before."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import plan_cluster_dict

from hpc_llm.config import ModelConfig
from hpc_llm.kernels.gemm import MIN_MACS, MIN_MACS_HELD, MIN_SIDE
from hpc_llm.plan import cluster as K
from hpc_llm.plan import cluster_file as KF
from hpc_llm.plan.compute import (
    chunk_costs,
    head_backward_input,
    head_forward,
    head_weight,
)
from hpc_llm.plan.memory import Layout, specs_of, stage_plan
from hpc_llm.plan.predict import PRECISIONS, bytes_of, predict
from hpc_llm.plan.pricer import Pricer

F32 = {"32": 5e10, "1024": 1e11}
TWICE = {k: 2 * v for k, v in F32.items()}
MODEL = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=100)
LAYOUTS = [
    Layout(batch_size=2, micro_batches=2),
    Layout(pp=2, tp=2, dp=2, zero=1, batch_size=2, micro_batches=4, schedule="zb-h1"),
    Layout(dp=2, zero=3, batch_size=2, micro_batches=2),
]


def cluster(bf16: dict | None = None, backend: str = "numpy", call_s: float = 1e-6) -> K.Cluster:
    d = plan_cluster_dict()
    gemm = {"float32": F32, "float64": d["compute"]["gemm"]["float64"]}
    if bf16 is not None:
        gemm["bfloat16"] = gemm["float16"] = bf16
    d["compute"] = {**d["compute"], "gemm": gemm, "backend": backend, "gemm_call_s": call_s}
    return KF.cluster_from_dict(d)


def test_without_the_figure_or_at_float32s_rate_predictions_are_as_before():
    """No bfloat16 figure: the bytes are PRECISIONS' and fp32/fp16 predict the same with or without it; a figure
    of float32's rates gives bf16 the same seconds, bit for bit, and only the memory of what the oneDNN path keeps:
    the compute copy's bf16 bits (2 bytes a parameter, not under ZeRO-3)."""
    plain, same = cluster(), cluster(F32)
    assert not plain.reads_bf16 and same.reads_bf16
    for lay in LAYOUTS:
        for precision in ("fp32", "bf16", "fp16"):
            assert bytes_of(precision, plain, lay) == PRECISIONS[precision][1]
        for precision in ("fp32", "fp16"):
            a, b = (predict(MODEL, lay, c, precision).as_dict() for c in (plain, same))
            assert a == b, (lay, precision)
        a, b = (predict(MODEL, lay, c, "bf16") for c in (plain, same))
        assert a.time == b.time, lay
        n = sum(s.size for s in specs_of(MODEL, lay.tp, stage_plan(MODEL, lay, b.memory_stage)))
        bits = 2 * n if lay.zero < 3 else 0
        assert b.memory["master"] - a.memory["master"] == bits, lay


def test_pricer_takes_onednn_by_kernels_gemm_rule():
    """bf16 on a CPU with the figure: a product at the bfloat16 rate exactly from gemm.MIN_MACS multiply-adds and
    MIN_SIDE rows and columns (MIN_MACS_HELD with both operands bfloat16: attention's); fp16 and other clusters
    never."""
    fast = Pricer(cluster(TWICE, call_s=0.0), "float32", 4, 1, None, low="bfloat16")
    fp16 = Pricer(cluster(TWICE, call_s=0.0), "float32", 4, 1, None, low="float16")
    k = MIN_MACS // (MIN_SIDE * MIN_SIDE)
    f32 = cluster(call_s=0.0).gemm_time("float32", MIN_SIDE, MIN_SIDE, k)
    assert fast.gemm(MIN_SIDE, MIN_SIDE, k).gemm == f32 / 2
    assert fast.gemm(MIN_SIDE, MIN_SIDE, k - 1).gemm > f32 * (k - 1) / k / 2
    assert fp16.gemm(MIN_SIDE, MIN_SIDE, k).gemm == f32
    assert fast.gemm(MIN_SIDE - 1, 4 * MIN_SIDE, k).gemm > fast.gemm(MIN_SIDE, MIN_SIDE, k).gemm
    kh = MIN_MACS_HELD // (MIN_SIDE * MIN_SIDE)
    held = cluster(call_s=0.0).gemm_time("float32", MIN_SIDE, MIN_SIDE, kh)
    assert fast.gemm(MIN_SIDE, MIN_SIDE, kh, held=True).gemm == held / (2 if kh < k else 1)
    assert fast.gemm(MIN_SIDE, MIN_SIDE, kh).gemm == (held if kh < k else held / 2)


@pytest.mark.parametrize("T, C, faster", [(1024, 256, True), (32, 64, False)])
def test_bf16_gemm_time_falls_by_the_rate_ratio(T, C, faster):
    """Every product of a model whose products all pass the cut-over (T 1024, C 256: attention's per-head ones
    from 2^20 held, the linears' and head's past 2^22) takes half the GEMM seconds at twice the rate; a model
    whose products are all below it, the same."""
    cfg = ModelConfig(n_layer=1, n_head=4, n_embd=C, block_size=T, vocab_size=128)
    plain, fast = (
        Pricer(cluster(r, call_s=0.0), "float32", 4, 1, None, low="bfloat16") for r in (None, TWICE)
    )
    a, b = (chunk_costs(cfg, p, 1, 1, True, True) for p in (plain, fast))
    for key in ("F", "B", "Bi", "W"):
        assert a[key].gemm > 0
        assert b[key].gemm == (a[key].gemm / 2 if faster else a[key].gemm), key
        # the rest (elementwise passes, conversions) unchanged: the sums differ only in float rounding
        assert b[key].compute == pytest.approx(
            a[key].compute - a[key].gemm + b[key].gemm, rel=1e-12
        )


def test_device_linears_and_head_at_the_formats_rate():
    """A CuPy cluster: bf16/fp16 blocks' linears and the tied head's three GEMMs read 16-bit operands (gemm16), at
    the format's rate; a CPU cluster's head stays at float32's."""
    cl = cluster(TWICE, backend="cupy", call_s=0.0)
    assert not cl.reads_bf16
    f32 = Pricer(cl, "float32", 4, 1, None)
    for low in ("bfloat16", "float16"):
        p = Pricer(cl, "float32", 4, 1, None, low=low)
        assert p.linear(256, 768, 256).gemm == f32.linear(256, 768, 256).gemm / 2
        for head in (head_forward, head_backward_input, head_weight):
            args = (2, 128, 64, 128) + ((True,) if head is head_weight else ())
            assert head(p, *args).gemm == head(f32, *args).gemm / 2, head.__name__
        # ZeRO-3 keeps the compute copy in float32 (model/gpt.compute_16_bit): the products are float32's
        z3 = Pricer(cl, "float32", 4, 1, None, low=low, zero3=True)
        assert not z3.gemm16 and z3.linear(256, 768, 256).gemm == f32.linear(256, 768, 256).gemm
    host = cluster(TWICE, call_s=0.0)
    args = (2, 128, 64, 128)
    host_p = Pricer(host, "float32", 4, 1, None, low="float16")
    assert (
        head_forward(host_p, *args).gemm
        == head_forward(Pricer(host, "float32", 4, 1, None), *args).gemm
    )
    lay = Layout(batch_size=2)
    assert dataclasses.replace(bytes_of("bf16", cl, lay), device=False).master == 2


def test_bf16_host_conversions_fused_from_the_kernels_threshold(monkeypatch):
    """bf16 on a host: GELU's kept values and attention's head layout are written in the format by the compiled
    passes that make them (Pricer.fused, from dispatch.AUTO_MIN_ELEMENTS), so a block whose arrays pass the
    threshold is priced faster than with those conversions after the passes; below it (the twins), the same. fp16
    and a device never."""
    from hpc_llm.plan.compute import block_backward_input, block_forward

    def costs(low, backend="numpy"):
        p = Pricer(cluster(TWICE, backend=backend), "float32", 4, 1, None, low=low)
        return [
            f(p, *shape).compute
            for shape in ((8, 256, 384, 6), (1, 8, 16, 2))
            for f in (block_forward, block_backward_input)
        ]

    fused = {
        (low, be): costs(low, be) for low in ("bfloat16", "float16") for be in ("numpy", "cupy")
    }
    monkeypatch.setattr(Pricer, "fused", lambda self, elems: False)
    for (low, be), got in fused.items():
        want = costs(low, be)
        faster = low == "bfloat16" and be == "numpy"
        assert [g < w for g, w in zip(got, want)] == [faster, faster, False, False], (low, be)
        assert all(g <= w for g, w in zip(got, want))
