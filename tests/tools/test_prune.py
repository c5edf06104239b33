"""Structured pruning (hpc_llm/tools/prune.py): the pruned model computes what the original computes with the removed
heads', neurons' and blocks' outputs zeroed (float64, to rounding); the lowest-scored units go; the pruned checkpoint
loads at tp 1 and tp 2 alike, fine-tunes with train.init_from under the original as teacher, and `eval`/`generate`
take it. Bad flags are tests/cli/test_bad_input.py's rows."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check, hpc_llm_cli, random_model, run_config, train
from mpi4py import MPI

from hpc_llm import checkpoint as ckpt
from hpc_llm.api import load_model
from hpc_llm.checkpoint.serial import save_fresh_checkpoint
from hpc_llm.config import Config
from hpc_llm.data.tokens import TokenData
from hpc_llm.parallel.grid import make_grid, single_process_grid
from hpc_llm.tools.prune import Pruning, prune, pruned

SHAPE = (3, 4, 32, 16, 256)  # layers, heads, dim, block, vocab


def write_model(path, data_dir=None, seed=3):
    """A random float64 model (GPT-2 widths), one head of block 0 and a quarter of its neurons made small: the
    lowest-scored, the ones pruning must take."""
    model = random_model(SHAPE, "float64", seed=seed, std=0.3)
    hd = 8
    for k in range(3):  # head 2's q, k and v columns
        model.params["h.0.attn.c_attn.weight"][:, k * 32 + 2 * hd : k * 32 + 3 * hd] *= 1e-3
    model.params["h.0.mlp.c_proj.weight"][::4] *= 1e-3
    tokenizer = TokenData(data_dir).tokenizer.meta() if data_dir else None
    ckpt.save_checkpoint(
        path,
        params=model.full_tensors(model.flat),
        optimizer={},
        state={"step": 0, "tokenizer": tokenizer},
        config=Config(model=model.cfg).to_dict(),
        metrics={},
    )
    return model


def masked_logits(model, record, idx):
    """The original's logits with the pruned units' (and dropped blocks') output rows zeroed."""
    params = {k: v.copy() for k, v in model.params.items()}
    kept = {b["layer"]: b for b in record["blocks"]}
    hd = model.cfg.n_embd // model.cfg.n_head
    for i in range(model.cfg.n_layer):
        p = f"h.{i}."
        attn_out, mlp_out = params[p + "attn.c_proj.weight"], params[p + "mlp.c_proj.weight"]
        if i not in kept:
            for t in (
                "attn.c_proj.weight",
                "attn.c_proj.bias",
                "mlp.c_proj.weight",
                "mlp.c_proj.bias",
            ):
                params[p + t][...] = 0
            continue
        for h in set(range(model.cfg.n_head)) - set(kept[i]["heads"]):
            attn_out[h * hd : (h + 1) * hd] = 0
        scores = np.linalg.norm(model.params[p + "mlp.c_fc.weight"], axis=0) ** 2
        scores = np.sqrt(scores + model.params[p + "mlp.c_fc.bias"] ** 2)
        scores *= np.linalg.norm(model.params[p + "mlp.c_proj.weight"], axis=1)
        order = np.argsort(-scores, kind="stable")
        mlp_out[order[kept[i]["neurons"] :]] = 0
    masked = random_model(SHAPE, "float64")
    masked.load_state(params)
    return masked.logits(idx)


CASES = {
    "heads": Pruning(heads=0.25),
    "mlp": Pruning(mlp=0.5),
    "all": Pruning(heads=0.5, mlp=0.25, layers=(0, 2)),
}


@pytest.mark.parametrize("case", CASES)
def test_pruned_model_is_the_masked_original(case, tmp_path):
    model = write_model(tmp_path / "big.h5")
    path, m = prune(tmp_path / "big.h5", tmp_path / "small.h5", CASES[case])
    small = load_model(path)
    with ckpt.CheckpointFile(path) as saved:
        record = saved.state["pruned"]
    assert small.cfg == m and m.head_size == 8 and small.num_params < model.num_params
    block0 = next(b for b in record["blocks"] if b["layer"] == 0)
    if CASES[case].heads:
        assert 2 not in block0["heads"], "the weakest head was kept"
    idx = np.random.default_rng(0).integers(0, 256, (2, 16))
    got, want = small.logits(idx), masked_logits(model, record, idx)
    assert np.max(np.abs(got - want)) <= 1e-12 * np.max(np.abs(want))


@pytest.mark.parallel(nprocs=2)
@pytest.mark.timeout(60)
def test_pruned_checkpoint_loads_at_tp1_and_tp2(shared_tmp_path):
    comm = MPI.COMM_WORLD
    if comm.rank == 0:  # prune() itself runs on one process only
        big = write_model(shared_tmp_path / "big.h5")
        params, m, _ = pruned(big.full_tensors(big.flat), big.cfg, CASES["all"])
        save_fresh_checkpoint(shared_tmp_path / "small.h5", params, {}, Config(model=m).to_dict())
    comm.Barrier()
    idx = np.random.default_rng(1).integers(0, 256, (2, 16))
    want = load_model(shared_tmp_path / "small.h5").logits(idx)
    grid = make_grid(comm, 2)
    got = load_model(shared_tmp_path / "small.h5", tp_comm=grid.tp_comm).logits(idx)
    err = float(np.max(np.abs(got - want)))
    check(
        err <= 1e-12 * float(np.max(np.abs(want))), f"tp 2 logits differ from tp 1's by {err:.2e}"
    )


@pytest.mark.timeout(120)
def test_prune_then_distill_then_eval_and_generate(data_dir, tmp_path):
    """The recipe's steps on a tiny model: prune (the CLI), fine-tune the pruned model from its weights with the
    original as teacher, then `eval` and `generate` on the result."""
    write_model(tmp_path / "big.h5", data_dir)
    r = hpc_llm_cli(
        "prune",
        tmp_path / "big.h5",
        "--heads",
        "0.5",
        "--mlp",
        "0.5",
        "--out",
        tmp_path / "small.h5",
    )
    assert r.returncode == 0 and "2 heads of 8, MLP width 64" in r.stdout, r.stderr
    over = {
        "model.n_layer": 3,
        "model.n_head": 2,
        "model.head_dim": 8,
        "model.n_inner": 64,
        "model.dtype": "float64",
        "train.max_iters": 2,
        "train.init_from": str(tmp_path / "small.h5"),
        "train.teacher": str(tmp_path / "big.h5"),
    }
    tr = train(run_config(data_dir, tmp_path / "run", **over), single_process_grid())
    assert tr.teacher.model.cfg.n_head == 4 and np.isfinite(tr.summary["val_loss"])
    r = hpc_llm_cli("eval", tr.summary["checkpoint"], "--data", data_dir, "--max-batches", "2")
    assert r.returncode == 0 and "loss" in r.stdout, r.stderr
    r = hpc_llm_cli("generate", tr.summary["checkpoint"], "--prompt", "ab", "--max-new-tokens", "5")
    assert r.returncode == 0 and r.stdout, r.stderr
