"""compute.tiny_block_s (a tiny Block's measured forward and backward): read from the file, priced as the layers'
per-call cost (plan/layer_calls.py), and a file without it priced as before."""

from __future__ import annotations

import tomllib

import pytest
from helpers import plan_cluster_dict

from hpc_llm.bench.calibrate import tiny_block_s
from hpc_llm.config import ModelConfig
from hpc_llm.errors import UserError
from hpc_llm.plan.cluster_file import cluster_from_dict, load_cluster, to_toml
from hpc_llm.plan.layer_calls import _tiny_block, in_layers, layer_call_s
from hpc_llm.plan.memory import Layout
from hpc_llm.plan.predict import predict
from hpc_llm.plan.pricer import Pricer

MODEL = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=100)
LAYOUTS = [Layout(batch_size=8), Layout(tp=2, batch_size=8), Layout(pp=2, micro_batches=4)]


def cluster(**compute):
    d = plan_cluster_dict()
    return cluster_from_dict({**d, "compute": {**d["compute"], **compute}})


def test_without_the_figure_the_layers_are_priced_at_call_s():
    """inputs/clusters have no tiny_block_s: their layers' pricer is the step's own, so they price as before."""
    for path in ("a100_dgx_ib200", "cpu_epyc_2x64", "h100_nvlink_ib400", "this_machine"):
        cl = load_cluster(f"inputs/clusters/{path}.toml")
        pr = Pricer(cl, "float32", 4, 1, None)
        assert cl.tiny_block_s is None and layer_call_s(cl) is None and in_layers(pr) is pr


def test_the_figure_prices_each_layer_call_at_what_the_tiny_block_implies():
    plain = cluster()  # call_s = gemm_call_s = 1 us
    # the tiny Block priced back at the measured seconds, and the per call that gives them
    work = _tiny_block(cluster(call_s=0.0, gemm_call_s=0.0))
    calls = (_tiny_block(plain) - work) / 1e-6
    slow = cluster(tiny_block_s=work + calls * 3e-6)
    assert layer_call_s(slow) == pytest.approx(3e-6, rel=1e-9)
    layers = in_layers(Pricer(slow, "float32", 4, 1, None)).cl
    assert _tiny_block(layers) == pytest.approx(slow.tiny_block_s, rel=1e-9)
    # a figure that implies call_s prices every layout as the file without it; 3 us a call makes it slower
    same = cluster(tiny_block_s=_tiny_block(plain))
    for lay in LAYOUTS:
        before = predict(MODEL, lay, plain, "fp32").time
        assert predict(MODEL, lay, same, "fp32").time["step"] == pytest.approx(before["step"], 1e-9)
        after = predict(MODEL, lay, slow, "fp32").time
        assert after["step"] > before["step"] and after["optimizer"] == before["optimizer"], lay


@pytest.mark.parametrize("value", [-1.0, 0, "fast", float("nan")])
def test_a_bad_figure_is_one_line_naming_it(value):
    with pytest.raises(UserError, match=r"compute\.tiny_block_s must be a finite positive number"):
        cluster(tiny_block_s=value)


def test_calibrate_measures_it_and_the_file_keeps_it():
    t = tiny_block_s(calls=2)
    assert t > 0
    d = plan_cluster_dict()
    d["compute"]["tiny_block_s"] = t
    back = cluster_from_dict(tomllib.loads(to_toml(d)))
    assert back.tiny_block_s == pytest.approx(t, rel=1e-5)
