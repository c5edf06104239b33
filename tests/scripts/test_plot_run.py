"""scripts/plot_run.py: one PNG from a checkpoint, a run directory or a metrics.jsonl; one-line errors (status 2)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from helpers import REPO, tiny_config

from hpc_llm.model.layout import param_specs
from hpc_llm.train.trainer import Trainer

SCRIPT = REPO / "scripts" / "plot_run.py"
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib is not installed (pip install -e .[plot])",
)


def load_script():
    spec = importlib.util.spec_from_file_location("plot_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plot(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


def png_shape(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, after checking the signature and a plausible size."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    # axes, curves, labels, legend: far more than an empty figure
    assert len(data) > 10_000, len(data)
    return struct.unpack(">II", data[16:24])


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("plot_run: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir) -> Path:
    """12 steps: train lines logged every 2 steps, evals at 0, 4, 8, 12, checkpoints at 4, 8, 12."""
    out = tmp_path_factory.mktemp("plot_run") / "run"
    cfg = tiny_config(
        data_dir,
        out,
        **{
            "train.max_iters": 12,
            "train.eval_interval": 4,
            "train.log_interval": 2,
            "checkpoint.interval": 4,
            "checkpoint.keep_last": 5,
        },
    )
    Trainer(cfg).run()
    return out


@needs_matplotlib
@pytest.mark.parametrize(
    "what, size",
    [("dir", (1500, 900)), ("ckpt_00000008.h5", (1500, 900)), ("metrics.jsonl", (1500, 450))],
)
def test_png(run_dir, tmp_path, what, size):
    out = tmp_path / "plot.png"
    proc = plot(run_dir if what == "dir" else run_dir / what, "--out", out)
    assert proc.returncode == 0 and proc.stdout.strip() == str(out) and not proc.stderr, proc
    assert png_shape(out) == size  # the weight-norm row only when there are weights


def test_reads_every_input_kind(run_dir, tmp_path):
    mod = load_script()
    # the curves from ckpt_12 (every step), norms at 4, 8, 12
    metrics, snapshots, by_step = mod.read_run(run_dir)
    assert by_step and [s for s, _ in snapshots] == [4, 8, 12]
    assert list(metrics["train"]["step"]) == list(range(1, 13)) and list(
        metrics["eval"]["step"]
    ) == [0, 4, 8, 12]
    assert set(metrics["train"]) == {"step", "loss", "lr", "grad_norm"} and set(
        metrics["eval"]
    ) == {"step", "train_loss", "val_loss"}
    # GPT-2's names, in buffer order
    names = [s.name for s in param_specs(tiny_config(run_dir, run_dir).model)]
    assert list(snapshots[-1][1]) == names and all(v > 0 for v in snapshots[-1][1].values())
    assert {mod.layer(n) for n in names} == {"wte", "wpe", "h.0", "h.1", "ln_f"}
    assert mod.layer("h.1.mlp.c_fc.weight") == "h.1" and mod.layer("ln_f.bias") == "ln_f"

    # one checkpoint: every step up to its own (the eval at 8 runs after the save at 8)
    metrics, snapshots, by_step = mod.read_run(run_dir / "ckpt_00000008.h5")
    assert not by_step and [s for s, _ in snapshots] == [8]
    assert list(metrics["train"]["step"]) == list(range(1, 9)) and list(
        metrics["eval"]["step"]
    ) == [0, 4]

    # the log: every log_interval steps
    metrics, snapshots, _ = mod.read_run(run_dir / "metrics.jsonl")
    assert snapshots == [] and list(metrics["train"]["step"]) == [2, 4, 6, 8, 10, 12]
    assert list(metrics["eval"]["step"]) == [0, 4, 8, 12] and all(metrics["eval"]["val_loss"] > 0)

    # A run whose newest checkpoint is step 8: every step up to 8 from it, then what the log has after it (train
    # steps 10 and 12, evals 8 and 12); a step logged twice (as after a resume) keeps its last line.
    part = tmp_path / "part"
    shutil.copytree(run_dir, part)
    (part / "ckpt_00000012.h5").unlink()
    (part / "latest").write_text("ckpt_00000008.h5\n")
    with open(part / "metrics.jsonl", "a") as f:
        f.write(
            json.dumps({"kind": "train", "step": 12, "loss": 0.5, "lr": 1e-3, "grad_norm": 1.0})
            + "\n"
        )
    metrics, snapshots, _ = mod.read_run(part)
    assert [s for s, _ in snapshots] == [4, 8]
    assert (
        list(metrics["train"]["step"]) == [*range(1, 9), 10, 12]
        and metrics["train"]["loss"][-1] == 0.5
    )
    assert list(metrics["eval"]["step"]) == [0, 4, 8, 12]


@needs_matplotlib
def test_user_errors(run_dir, tmp_path):
    out = tmp_path / "x.png"
    assert_user_error(
        plot(tmp_path / "missing.h5", "--out", out), "missing.h5", "no such file or directory"
    )
    (tmp_path / "notes.txt").write_text("not a metrics line\n")
    assert_user_error(
        plot(tmp_path / "notes.txt", "--out", out),
        "neither an hpc_llm checkpoint nor a metrics.jsonl",
    )
    (tmp_path / "other.jsonl").write_text('{"kind": "something else", "step": 1}\n')
    assert_user_error(
        plot(tmp_path / "other.jsonl", "--out", out), 'no "kind": "train" or "eval" lines'
    )
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1.0
    assert_user_error(
        plot(tmp_path / "other.h5", "--out", out), "other.h5", "not an hpc_llm checkpoint"
    )
    (tmp_path / "empty").mkdir()
    assert_user_error(plot(tmp_path / "empty", "--out", out), "not an hpc_llm run directory")
    assert_user_error(plot(run_dir, "--out", tmp_path / "no" / "dir" / "x.png"), "cannot write")
    assert not out.exists()


def test_without_matplotlib(run_dir, tmp_path):
    fake = tmp_path / "fake" / "matplotlib"  # shadows any installed matplotlib
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    path = [str(fake.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    assert_user_error(plot(run_dir, "--out", tmp_path / "x.png", env=env), "pip install -e .[plot]")
