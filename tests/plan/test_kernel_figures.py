"""compute.kernels (the kernel layer's calls as a rank runs them, bench/kernel_rates.py): written by calibrate and read
back, priced in place of the layers' NumPy passes in a float32 step, a file without them priced by the passes."""

from __future__ import annotations

import math
import tomllib

import pytest
from helpers import plan_cluster_dict

from hpc_llm.bench.kernel_rates import KERNEL_CALLS, gemm_batched_rates, kernel_rates
from hpc_llm.config import ModelConfig
from hpc_llm.errors import UserError
from hpc_llm.plan.cluster import KERNELS
from hpc_llm.plan.cluster_file import cluster_from_dict, load_cluster, to_toml
from hpc_llm.plan.memory import Layout
from hpc_llm.plan.predict import predict
from hpc_llm.plan.pricer import Pricer

MODEL = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=100)
LAYOUTS = [Layout(batch_size=8), Layout(tp=2, batch_size=8)]


def cluster(kernels=None, **compute):
    d = plan_cluster_dict()
    d["compute"].update(compute)
    if kernels is not None:
        d["compute"]["kernels"] = kernels
    return cluster_from_dict(d)


def flat(rate: float) -> dict:
    return {"1024": rate, "4194304": rate}


def every(rate: float) -> dict:
    return {k: flat(rate) for k in KERNELS}


def test_calibrate_times_every_kernel_the_planner_reads_and_the_file_keeps_them():
    assert set(KERNEL_CALLS) == set(KERNELS)
    rates = kernel_rates(sizes=(1 << 12,), repeats=1)  # tiny arrays: the fields, not the rates
    assert set(rates) == set(KERNELS)
    assert all(len(t) == 1 and min(t.values()) > 0 for t in rates.values()), rates
    d = plan_cluster_dict()
    d["compute"]["kernels"] = rates
    back = cluster_from_dict(tomllib.loads(to_toml(d)))
    for k, t in rates.items():
        ((size, rate),) = back.kernels[k]
        assert size == float(next(iter(t))) and rate == pytest.approx(t[next(iter(t))], rel=1e-5)


def test_stacked_products_priced_by_their_own_table():
    """compute.gemm_batched (calibrate's stacked products by multiply-adds per matrix): a batch > 1 product at its
    rate, a single product by compute.gemm; written and read back."""
    rates = gemm_batched_rates(repeats=1, sides=(8, 16))
    assert set(rates) == {"256", "2048"} and min(rates.values()) > 0
    d = plan_cluster_dict()
    d["compute"]["gemm_batched"] = {"float32": rates}
    back = cluster_from_dict(tomllib.loads(to_toml(d)))
    assert [s for s, _ in back.gemm_batched["float32"]] == [256.0, 2048.0]
    plain = cluster()
    slow = cluster(gemm_batched={"float32": {"1024": 1e9, "1048576": 1e9}})
    p, q = Pricer(plain, "float32", 4, 1, None), Pricer(slow, "float32", 4, 1, None)
    m, n, k = 128, 256, 64
    assert q.gemm(m, n, k, 48).compute == pytest.approx(
        48 * (1e-6 + 2 * m * n * k / 1e9), rel=1e-12
    )
    assert q.gemm(m, n, k).compute == p.gemm(m, n, k).compute
    assert q.gemm(m, n, k, 48, held=True).compute > p.gemm(m, n, k, 48).compute
    for lay in LAYOUTS:  # attention's products slower, nothing else
        before, after = (predict(MODEL, lay, c, "fp32").time for c in (plain, slow))
        assert after["step"] > before["step"] and after["optimizer"] == before["optimizer"]
    with pytest.raises(
        UserError, match=r"compute\.gemm_batched\.float32\.1024 must be a finite positive"
    ):
        cluster(gemm_batched={"float32": {"1024": 0}})


def test_wide_products_priced_between_the_two_tables():
    """compute.gemm_wide (the same classes from 2048-wide products): a product whose other two dimensions are 768
    (or less) at compute.gemm's rate, 2048 (or more) at gemm_wide's, between them in log; written and read back."""
    wide = cluster(gemm_wide={"float32": {"32": 2.5e10, "1024": 5e10}})
    plain = cluster()
    back = cluster_from_dict(
        tomllib.loads(
            to_toml(
                {
                    **plan_cluster_dict(),
                    "compute": {
                        **plan_cluster_dict()["compute"],
                        "gemm_wide": {"float32": {"32": 2.5e10, "1024": 5e10}},
                    },
                }
            )
        )
    )
    assert back.gemm_wide == wide.gemm_wide
    for m, n, k in ((768, 768, 32), (512, 32, 300)):
        assert wide.gemm_rate("float32", m, n, k) == plain.gemm_rate("float32", m, n, k)
    assert wide.gemm_rate("float32", 4096, 2048, 1024) == pytest.approx(5e10, rel=1e-12)
    # other dimensions 1254 (their geometric mean): half-way in log from 768 to 2048, at min dimension 32
    mid = round(math.sqrt(768 * 2048))
    assert wide.gemm_rate("float32", mid, 32, mid) == pytest.approx(
        5e10 + 0.5 * (2.5e10 - 5e10), rel=1e-3
    )
    assert wide.gemm_rate("float64", 4096, 2048, 1024) == plain.gemm_rate(
        "float64", 4096, 2048, 1024
    )
    with pytest.raises(UserError, match=r"compute\.gemm_wide\.float32 must be a table"):
        cluster(gemm_wide={"float32": 3})


def test_without_figures_the_calls_are_priced_by_their_passes():
    """The committed cluster files have none (the Megatron rows do not move); a missing kernel falls back to its
    passes while the others take their figures."""
    for path in ("a100_dgx_ib200", "cpu_epyc_2x64", "h100_nvlink_ib400", "this_machine"):
        cl = load_cluster(f"inputs/clusters/{path}.toml")
        assert cl.kernels == cl.gemm_batched == cl.gemm_wide == {}
    plain, n = cluster(), 8 * 64 * 64
    passes = Pricer(plain, "float32", 4, 1, None).ew(10 * n, n, 9)
    without = every(1e9)
    del without["layernorm_forward"]
    for cl in (plain, cluster(without)):
        p = Pricer(cl, "float32", 4, 1, None)
        assert p.kernel("layernorm_forward", n, passes) is passes
    got = Pricer(cluster(without), "float32", 4, 1, None).kernel("bias_add", n, passes)
    assert got.compute == pytest.approx(n / 1e9 + plain.call_s, rel=1e-12)


@pytest.mark.parametrize("lay", LAYOUTS, ids=["tp1", "tp2"])
def test_a_figure_prices_its_calls_and_nothing_else(lay):
    """LayerNorm's forward at 1e9 elements/s: the step moves by exactly its calls' difference (two a block and
    ln_f, each over the b T C activations), the optimizer not at all."""
    plain, rate = cluster(), 1e9
    one = cluster({"layernorm_forward": flat(rate)})
    before = predict(MODEL, lay, plain, "fp32").time
    after = predict(MODEL, lay, one, "fp32").time
    n = 8 * MODEL.block_size * MODEL.n_embd
    passes = Pricer(plain, "float32", 4, lay.tp, None).ew(10 * n, n, 9).compute
    calls = 2 * MODEL.n_layer + 1
    expect = calls * (n / rate + plain.call_s - passes)
    assert after["step"] - before["step"] == pytest.approx(expect, rel=1e-6)
    assert after["optimizer"] == before["optimizer"]


def test_the_rate_sets_the_price():
    """Every kernel's time is elements / rate + call_s: doubling every rate takes half of what is left of the
    elements' part each time (the step's difference halves), and a faster layer is a faster step."""
    steps = [predict(MODEL, LAYOUTS[0], cluster(every(r)), "fp32").time for r in (1e8, 2e8, 4e8)]
    d1, d2 = steps[0]["step"] - steps[1]["step"], steps[1]["step"] - steps[2]["step"]
    assert d1 > 0 and d1 / d2 == pytest.approx(2.0, rel=1e-6)
    assert steps[0]["optimizer"] > steps[1]["optimizer"]


def test_bf16_and_devices_keep_their_pricing():
    """The figures are of float32 calls on the host: a bf16 step (its conversions fused or not) and a device's
    counted kernels are priced as before, bit for bit."""
    plain, fast = cluster(), cluster(every(1e12))
    for lay in LAYOUTS:
        assert predict(MODEL, lay, fast, "bf16").time == predict(MODEL, lay, plain, "bf16").time
    gpu_plain, gpu_fast = cluster(backend="cupy"), cluster(every(1e12), backend="cupy")
    assert predict(MODEL, LAYOUTS[0], gpu_fast, "fp32").time == (
        predict(MODEL, LAYOUTS[0], gpu_plain, "fp32").time
    )


@pytest.mark.parametrize(
    "kernels, message",
    [
        (
            {"layernorm_forward": {"65536": -1.0}},
            r"compute\.kernels\.layernorm_forward\.65536 must be a finite positive number, got -1\.0",
        ),
        ({"adamw": {"65536": float("nan")}}, r"compute\.kernels\.adamw\.65536 must be a finite"),
        ({"adamw": 5}, r"compute\.kernels\.adamw must be a table \{size = value, \.\.\.\}, got 5"),
        ({"adamw": {"big": 1e9}}, r"compute\.kernels\.adamw: key 'big' is not a finite positive"),
        (
            {"fast_gelu": flat(1e9)},
            r"compute\.kernels\.fast_gelu: expected one of layernorm_forward",
        ),
        (5, r"\[compute\.kernels\] must be a table, got 5"),
    ],
)
def test_a_bad_figure_is_one_line_naming_it(kernels, message):
    with pytest.raises(UserError, match=r"^cluster file cluster: " + message) as e:
        cluster(kernels)
    assert "\n" not in str(e.value)
