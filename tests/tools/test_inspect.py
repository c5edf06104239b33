"""`hpc-llm inspect`: one checkpoint's contents and statistics, two checkpoints compared, one-line user errors."""

from __future__ import annotations

import functools
import math
import shutil
import subprocess

import numpy as np
import pytest
from helpers import hpc_llm_cli

from hpc_llm.checkpoint import checkpoint_path, save_checkpoint, write_latest

cli = functools.partial(hpc_llm_cli, "inspect", timeout=60)


def ok(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return proc.stdout.splitlines()


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpc-llm: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def row(lines: list[str], name: str) -> list[str]:
    """The whitespace-separated fields of the table row for tensor ``name``."""
    found = [line.split() for line in lines if line.split()[:1] == [name]]
    assert len(found) == 1, (name, lines)
    return found[0]


def contents(**changes):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    params = {"w": w, "b": np.array([1.0, -1.0], dtype=np.float64)}
    params.update(changes)
    return dict(
        params=params,
        optimizer={
            "m": {k: np.zeros_like(v) for k, v in params.items()},
            "v": {k: np.full_like(v, 0.5) for k, v in params.items()},
        },
        state={"step": 7, "tokens_seen": 448, "layout": {"world": 1, "dp": 1, "tp": 1}},
        config={"model": {"n_layer": 2, "n_embd": 4}, "train": {"lr": 0.01}},
        metrics={"train": {"step": [1, 2, 3], "loss": [3.0, 2.5, 2.25]}},
    )


@pytest.fixture
def ckpt_file(tmp_path):
    path = tmp_path / "a.h5"
    save_checkpoint(path, **contents())
    return path


def test_describe_prints_header_config_stats_and_metrics(ckpt_file):
    lines = ok(cli(ckpt_file))
    text = "\n".join(lines)
    assert "step              7" in text
    assert "tokens_seen       448" in text
    assert '"tp": 1' in text
    assert "format_version    1" in text
    assert "  n_layer = 2" in text and "  n_embd = 4" in text
    name, shape, dtype, norm, mean, std, lo, hi = row(lines, "params/w")
    x = np.arange(12, dtype=np.float64)
    assert (shape, dtype) == ("3x4", "float32")
    assert float(norm) == pytest.approx(math.sqrt(506), rel=1e-5)
    assert float(mean) == pytest.approx(5.5) and float(std) == pytest.approx(x.std(), rel=1e-5)
    assert (float(lo), float(hi)) == (0.0, 11.0)
    assert row(lines, "optimizer/v/w")[3:] == [
        f"{math.sqrt(12 * 0.25):.6g}",
        "0.5",
        "0",
        "0.5",
        "0.5",
    ]
    assert row(lines, "optimizer/m/b")[1:3] == ["2", "float64"]
    assert "  train: rows 3; last step=3, loss=2.25" in lines


def test_run_directory_argument(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for step in (3, 7):
        c = contents()
        c["state"]["step"] = step
        save_checkpoint(checkpoint_path(run, step), **c)
    write_latest(run, checkpoint_path(run, 7))
    text = ok(cli(run))
    assert f"checkpoint        {checkpoint_path(run, 7)}" in text and "step              7" in text


def test_compare_with_itself_is_all_identical(ckpt_file):
    lines = ok(cli(ckpt_file, ckpt_file))
    assert lines[-1] == "6 tensors identical, 0 differ, 0 only in one"
    assert "config differences (0):" in lines
    assert row(lines, "params/w")[1:5] == ["3x4", "identical", "0", "0"]


def test_compare_perturbed_copy(tmp_path, ckpt_file):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    w[1, 2] += 0.25
    other = tmp_path / "b.h5"
    c = contents(w=w, extra=np.ones(3, dtype=np.float32))
    c["state"]["step"] = 9
    c["config"]["train"]["lr"] = 0.02
    save_checkpoint(other, **c)
    lines = ok(cli(ckpt_file, other))
    name, shape, result, max_abs, rel = row(lines, "params/w")
    assert result == "differs" and float(max_abs) == 0.25
    assert float(rel) == pytest.approx(0.25 / np.linalg.norm(w.astype(np.float64)), rel=1e-5)
    assert row(lines, "params/b")[2] == "identical"
    assert row(lines, "optimizer/v/w")[2] == "identical"
    assert "  params/extra  only in B" in lines and "  optimizer/m/extra  only in B" in lines
    assert "  train.lr: 0.01 -> 0.02" in lines
    assert f"A  {ckpt_file}  (step 7)" in lines and f"B  {other}  (step 9)" in lines
    assert lines[-1] == "5 tensors identical, 1 differ, 3 only in one"


def test_bad_inputs_are_one_line_user_errors(tmp_path, ckpt_file):
    assert_user_error(cli(tmp_path / "missing.h5"), "does not exist")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all\n" * 10)
    assert_user_error(cli(junk), "not a readable HDF5 file")
    assert_user_error(cli(ckpt_file, junk), "junk.h5")

    corrupt = tmp_path / "corrupt.h5"
    shutil.copy(ckpt_file, corrupt)
    import h5py

    with h5py.File(corrupt, "r") as f:
        offset = f["params/w"].id.get_offset()
    data = bytearray(corrupt.read_bytes())
    data[offset + 4] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    assert_user_error(cli(corrupt), "checksum mismatch", "/params/w")

    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    assert_user_error(cli(empty_run), "no verified checkpoint")
    assert_user_error(cli(ckpt_file, ckpt_file, ckpt_file), "expected one checkpoint or two")
