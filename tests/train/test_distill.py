"""Distillation end to end (train.teacher; docs/compression.md): alpha 0 trains what plain training trains, bit for
bit; dp2 x tp2 (sequence-parallel) and pp2 x dp2 distilled runs equal the single process (float64, test_parallel.py's
1e-10), the teacher held only by the last stage, its logits at tp 2 the slices of tp 1's. The loss's gradient is
tests/model/test_gradients.py's, its vocabulary-parallel form tests/model/test_tensor_parallel.py's."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check, crc, random_model, reference_checks, run_config, train
from mpi4py import MPI

from hpc_llm import checkpoint as ckpt
from hpc_llm.config import Config
from hpc_llm.data.sampler import TRAIN_STREAM, get_batch
from hpc_llm.data.tokens import TokenData
from hpc_llm.parallel.grid import make_grid, single_process_grid

DISTILL = {
    "model.dtype": "float64",
    "train.grad_accum": 2,
    "train.max_iters": 2,
    "train.eval_interval": 2,
    "train.distill_alpha": 0.7,
    "train.distill_temperature": 2.0,
}


def write_teacher(data_dir, path, comm=None) -> str:
    """A teacher of another shape (3 layers, 2 heads, 48 dim) with random weights and the data's tokenizer."""
    if comm is None or comm.rank == 0:
        model = random_model((3, 2, 48, 16, 256), "float64", seed=7, std=0.2)
        ckpt.save_checkpoint(
            path,
            params=model.full_tensors(model.flat),
            optimizer={},
            state={"step": 0, "tokenizer": TokenData(data_dir).tokenizer.meta()},
            config=Config(model=model.cfg).to_dict(),
            metrics={},
        )
    if comm is not None:
        comm.Barrier()
    return str(path)


@pytest.mark.timeout(120)
def test_alpha_zero_is_plain_training(data_dir, tmp_path):
    teacher = write_teacher(data_dir, tmp_path / "teacher.h5")
    grid = single_process_grid()
    plain = train(run_config(data_dir, tmp_path / "plain", **DISTILL), grid)
    over = {**DISTILL, "train.teacher": teacher, "train.distill_alpha": 0.0}
    zero = train(run_config(data_dir, tmp_path / "zero", **over), grid)
    distilled = train(
        run_config(data_dir, tmp_path / "kd", **DISTILL, **{"train.teacher": teacher}), grid
    )
    assert zero.teacher.model is not None and zero.teacher.seconds > 0, "the teacher did not run"
    assert zero.metrics.train["loss"] == plain.metrics.train["loss"]
    assert crc(zero.model.flat) == crc(plain.model.flat)
    # alpha > 0 does change what trains (the premise of the equality above meaning something)
    assert distilled.metrics.train["loss"][1:] != plain.metrics.train["loss"][1:]


# name: (parallel.tp, parallel.pp, parallel.sequence_parallel): the head gathers the positions' slices under
# sequence parallelism, so its logits are the rows the teacher's are
LAYOUTS = {"DP2xTP2-SP": (2, 1, True), "PP2xDP2": (1, 2, False)}


@pytest.mark.parallel(nprocs=4)
@pytest.mark.timeout(240)
def test_distill_matches_single_process(data_dir, tmp_path, shared_tmp_path):
    comm = MPI.COMM_WORLD
    teacher = write_teacher(data_dir, shared_tmp_path / "teacher.h5", comm)
    over = {**DISTILL, "train.teacher": teacher}
    ref = train(run_config(data_dir, tmp_path / "ref", **over), single_process_grid())
    bad = []
    for name, (tp, pp, sp) in LAYOUTS.items():
        layout = {"parallel.tp": tp, "parallel.pp": pp, "parallel.sequence_parallel": sp}
        cfg = run_config(data_dir, shared_tmp_path / name, **over, **layout)
        tr = train(cfg, make_grid(comm, tp, pp))
        bad += reference_checks(tr, ref, name)
        held = tr.teacher.model is not None
        if held != (tr.grid.pp_rank == pp - 1):
            bad.append(f"{name}: stage {tr.grid.pp_rank} holds the teacher: {held}")
        if held and tp > 1:
            x, _ = get_batch(tr.train_tokens, 16, 4, 0, 0, 0, TRAIN_STREAM)
            got = tr.teacher.model.split_logits(x)
            want = ref.teacher.model.split_logits(x)
            Vl = want.shape[1] // tp
            want = want[:, tr.grid.tp_rank * Vl : (tr.grid.tp_rank + 1) * Vl]
            real = np.isfinite(want)  # -inf: the padding columns
            err = float(np.max(np.abs(got[real] - want[real]) / np.max(np.abs(want[real]))))
            if not (np.array_equal(np.isfinite(got), real) and err <= 1e-12):
                bad.append(
                    f"{name}: the teacher's logits at tp {tp} differ from tp 1's by {err:.2e}"
                )
    check(not bad, "\n".join(bad))
