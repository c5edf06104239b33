"""`hpc-llm bench calibrate`'s link figures: the bandwidth by message size written beside bw and nb_bw, and read back
by the planner (fields and their agreement checked, never timings)."""

from __future__ import annotations

import tomllib

import pytest
from helpers import plan_cluster_dict

from hpc_llm.bench.calibrate import (
    GEMM_CLASSES,
    _bandwidth,
    _median_figures,
    bf16_gemm_rates,
    collective_calls,
    link_figures,
)
from hpc_llm.plan.cluster import MEASURED
from hpc_llm.plan.cluster_file import cluster_from_dict, to_toml


def test_median_figures_take_tables_size_by_size():
    groups = [
        {"bw": 1.0, "bw_by_size": {"64": 1.0, "128": 6.0}, "collectives": {"p2p": {"64": 1.0}}},
        {"bw": 3.0, "bw_by_size": {"64": 2.0, "128": 4.0}, "collectives": {"p2p": {"64": 7.0}}},
        {"bw": 2.0, "bw_by_size": {"64": 9.0, "128": 5.0}, "collectives": {"p2p": {"64": 3.0}}},
    ]
    assert _median_figures(groups) == {
        "bw": 2.0,
        "bw_by_size": {"64": 2.0, "128": 5.0},
        "collectives": {"p2p": {"64": 3.0}},
    }


@pytest.mark.parametrize("kind", ["allreduce", "ireduce_scatter", "allgather_along", "p2p"])
@pytest.mark.parametrize("n", [2, 4])
def test_bandwidth_inverts_the_planners_formula(kind, n):
    from hpc_llm.plan.cluster import COLLECTIVES

    # 16 MiB at 1 GB/s, 10 us: each kind's seconds from the planner's formula give that bandwidth back
    t = COLLECTIVES[kind][0](1 << 24, n, 1e-5, 1e9)
    assert _bandwidth(kind, 1 << 24, n, 1e-5, t) == pytest.approx(1e9, rel=1e-12)


@pytest.mark.timeout(60)
@pytest.mark.parallel(nprocs=2)
def test_link_figures_write_tables_the_planner_reads():
    from pytest_mpi.parallel_assert import parallel_assert

    from hpc_llm.parallel.comm import world_comm

    sizes = {1 << 12: 1, 1 << 14: 1}
    fig = link_figures(world_comm(), sizes, train_bytes=1 << 15)
    ok = (
        set(fig["bw_by_size"]) == set(fig["nb_bw_by_size"]) == {"4096", "16384"}
        # bw and nb_bw: the largest size's, as the one size measured before the tables
        and fig["bw"] == fig["bw_by_size"]["16384"]
        and fig["nb_bw"] == fig["nb_bw_by_size"]["16384"]
        and all(v > 0 for t in ("bw_by_size", "nb_bw_by_size") for v in fig[t].values())
        # every other kind the planner prices, at the same sizes
        and set(fig["collectives"]) == set(MEASURED)
        and all(set(t) == {"4096", "16384"} for t in fig["collectives"].values())
        and all(v > 0 for t in fig["collectives"].values() for v in t.values())
        and 0 <= fig["overlap"] <= 1
        and fig["latency_s"] > 0
    )
    parallel_assert(ok, f"link figures: {fig}")
    d = {
        "node": {"devices": 2, "memory_bytes": 1e9},
        "compute": {
            "gemm_call_s": 1e-6,
            "call_s": 1e-6,
            "transcendental_rate": 1e9,
            "scatter_rate": 1e8,
            "elementwise_bw": {"65536": 1e10},
            "gemm": {"float32": {"32": 1e10}},
        },
        "link": {"intra": fig},
        "storage": {"write_bw": 1e9},
    }
    link = cluster_from_dict(tomllib.loads(to_toml(d))).link("intra")
    parallel_assert(
        link.bw_at(4096) == pytest.approx(fig["bw_by_size"]["4096"], rel=1e-5)
        and link.nb_bw_at(1 << 30) == pytest.approx(fig["nb_bw"], rel=1e-5)
        and dict(link.collectives)["p2p"][0][1]
        == pytest.approx(fig["collectives"]["p2p"]["4096"], rel=1e-5),
        f"read back: {link}",
    )


@pytest.mark.timeout(60)
@pytest.mark.parallel(nprocs=2)
def test_p2p_is_timed_both_ways_as_a_pipeline_exchanges():
    """The pipeline's combined steps send an activation forward while a gradient comes back: calibrate's p2p makes
    that exchange, one message each way (a one-way message would price the step's trains at twice their rate)."""
    from pytest_mpi.parallel_assert import parallel_assert

    from hpc_llm.parallel.comm import world_comm

    comm = world_comm()
    comm.ledger.reset()
    collective_calls(comm, 1 << 12)["p2p"]()
    sent, got = comm.ledger.bytes["world.p2p_send"], comm.ledger.bytes["world.p2p_recv"]
    parallel_assert(sent == got == 1 << 12, f"rank {comm.rank}: sent {sent} B, received {got} B")


def test_bf16_gemm_figure_written_exactly_where_onednn_runs_bf16(monkeypatch):
    """compute.gemm.bfloat16 (oneDNN's bf16 GEMM by shape class) is measured where bf16 training's products run on
    it (gemm.reads_bf16), and the planner reads the figure as that (Cluster.reads_bf16); elsewhere none. Small
    shapes, one timing each: the fields, not the rates."""
    from hpc_llm.kernels import gemm
    from hpc_llm.model.precision import Precision

    rates = bf16_gemm_rates(other=64, repeats=1)
    if gemm.reads_bf16(Precision("bf16")):
        assert set(rates) == {str(d) for d in GEMM_CLASSES} and min(rates.values()) > 0
        d = plan_cluster_dict()
        d["compute"]["gemm"]["bfloat16"] = rates
        assert cluster_from_dict(d).reads_bf16
    else:
        assert rates is None
    monkeypatch.setenv("HPC_LLM_KERNELS", "numpy")
    assert bf16_gemm_rates(other=64, repeats=1) is None
