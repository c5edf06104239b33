"""`parallel.layout = "auto"` (hpc_llm/plan/auto.py): the planner's fastest layout that fits, for the job's ranks on
the machine a cluster file describes; its line names the winner and the runner-up; bad input is one line before
any compute. (On the virtual cluster, a run resumed at the layout picked: tests/cluster/test_vcluster.py.)"""

from __future__ import annotations

import copy
import re

import pytest
from helpers import REPO, hpc_llm_cli, tiny_config, write_toml

from hpc_llm.config import read_toml
from hpc_llm.errors import UserError
from hpc_llm.plan.auto import auto_layout
from hpc_llm.plan.cluster_file import to_toml

MACHINE = (
    REPO / "docs" / "planning_data" / "this_machine.toml"
)  # 2 devices a node, its intra-node link


def cluster_file(tmp_path, inter_bw: float, memory_bytes: float | None = None):
    """this_machine.toml with a link between nodes of inter_bw B/s (and the device memory, when given)."""
    d = copy.deepcopy(read_toml(MACHINE, "cluster"))
    d["link"]["inter"] = {"latency_s": 1e-4, "bw": inter_bw, "nb_bw": inter_bw, "overlap": 0.0}
    if memory_bytes is not None:
        d["node"]["memory_bytes"] = memory_bytes
    path = tmp_path / f"cluster-{inter_bw:g}.toml"
    path.write_text(to_toml(d))
    return path


def cfg_of(data_dir, tmp_path, **kw):
    over = {"model.n_head": 4, "train.batch_size": 8, "parallel.layout": "auto", **kw}
    return tiny_config(data_dir, tmp_path / "run", **over).with_vocab(65)


# 4 ranks on 2 nodes: over a slow link only a pipeline's activations should cross it (TP inside each node); over a
# fast one data parallelism's one reduction per step beats the pipeline's bubble
@pytest.mark.parametrize("inter_bw, grid", [(1e5, (2, 1, 2)), (1e9, (1, 2, 2))])
def test_auto_picks_the_fastest_layout_for_the_link_and_says_why(
    data_dir, tmp_path, inter_bw, grid
):
    cfg = cfg_of(data_dir, tmp_path, **{"train.grad_accum": 1})
    chosen, line = auto_layout(cfg, str(cluster_file(tmp_path, inter_bw)), 4)
    par, t = chosen.parallel, chosen.train
    assert (par.pp, 4 // (par.pp * par.tp), par.tp) == grid, line
    assert par.layout == "" and t.batch_size * t.grad_accum == 8  # the same global batch
    assert chosen.model == cfg.model and par.grad_comm == cfg.parallel.grad_comm
    head, runner_up = line.split("; next ")
    assert head.startswith(f'parallel.layout = "auto": pp{grid[0]} dp{grid[1]} tp{grid[2]}'), line
    # the runner-up is another grid (or ZeRO stage), slower
    grid_of = re.compile(r"(pp\d+ dp\d+ tp\d+(?: zero\d)?) ")
    assert grid_of.match(runner_up)[1] != grid_of.search(head)[1], line
    assert runner_up.endswith("%))") and "(+" in runner_up, line


def test_auto_without_a_cluster_or_a_fitting_layout_is_one_line(data_dir, tmp_path):
    cfg = cfg_of(data_dir, tmp_path)
    with pytest.raises(UserError, match=r"train --cluster FILE"):
        auto_layout(cfg, None, 4)
    with pytest.raises(UserError, match=r"no-such\.toml"):
        auto_layout(cfg, str(tmp_path / "no-such.toml"), 4)
    tiny = cluster_file(tmp_path, 1e9, memory_bytes=1e4)
    with pytest.raises(
        UserError, match=r'^parallel.layout = "auto" on 4 ranks of .*fits on no layout'
    ):
        auto_layout(cfg, str(tiny), 4)


@pytest.mark.timeout(60)
def test_train_refuses_auto_without_a_cluster_and_a_cluster_without_auto(data_dir, tmp_path):
    toml = write_toml(cfg_of(data_dir, tmp_path), tmp_path / "auto.toml")
    r = hpc_llm_cli("train", toml)
    assert r.returncode != 0 and "train --cluster FILE" in r.stderr, r.stderr
    r = hpc_llm_cli("train", toml, "--set", "parallel.layout=", "--cluster", MACHINE)
    assert r.returncode != 0 and '--cluster: used only with parallel.layout = "auto"' in r.stderr
    assert not (tmp_path / "run").exists()  # nothing trained


def test_the_planner_prices_compressed_gradient_reductions(data_dir, tmp_path):
    """parallel.grad_comm (plan/grad_comm.py) at dp 2 across nodes on a slow link, where the reduction is the step:
    16-bit halves its bytes, PowerSGD sends (rows + cols) r per compressible matrix."""
    from hpc_llm.plan.cluster_file import load_cluster
    from hpc_llm.plan.memory import Layout
    from hpc_llm.plan.predict import predict

    cl = load_cluster(cluster_file(tmp_path, 1e5))
    cl.devices = 1  # one rank a node: the dp group crosses the link
    model = cfg_of(data_dir, tmp_path).model
    exposed = {
        gc: predict(model, Layout(1, 2, 1, batch_size=8, grad_comm=gc), cl, "fp32").time[
            "dp_exposed"
        ]
        for gc in ("fp32", "bf16", "fp16", "powersgd")
    }
    assert exposed["bf16"] == pytest.approx(exposed["fp32"] / 2, rel=0.05), exposed
    assert exposed["fp16"] == pytest.approx(exposed["fp32"] / 2, rel=0.05), exposed
    assert exposed["powersgd"] < exposed["bf16"] / 2, exposed
