"""`python -m hpc_llm ...` end to end: prepare, train, generate, and one-line user errors with exit status 2."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import hpc_llm_cli

from hpc_llm.config import ModelConfig
from hpc_llm.errors import UserError
from hpc_llm.model.gpt import GPT

TINY_TOML = """\
[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 16

[data]
path = "{data}"

[train]
batch_size = 4
max_iters = 6
lr = 1e-2
min_lr = 1e-3
warmup_iters = 2
lr_decay_iters = 6
eval_interval = 3
eval_iters = 2
log_interval = 2
peak_tflops = 1.0
out_dir = "{out}"
"""


cli = hpc_llm_cli


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hpc-llm: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_config(tmp_path, data_dir, name="tiny.toml", out="run", extra="") -> str:
    path = tmp_path / name
    path.write_text(
        TINY_TOML.format(data=data_dir.as_posix(), out=(tmp_path / out).as_posix()) + extra
    )
    return str(path)


# -- the happy path --------------------------------------------------------------------------------------------------


def test_prepare_prints_token_counts(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello world\n" * 50)  # 600 bytes -> 540 train + 60 val
    proc = cli("prepare", src, "--out", tmp_path / "tok")
    assert proc.returncode == 0, proc.stderr
    assert "540 train + 60 val tokens" in proc.stdout
    assert "vocab 256" in proc.stdout
    assert (tmp_path / "tok" / "meta.json").is_file()
    assert (tmp_path / "tok" / "train.bin").stat().st_size == 2 * 540


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """One `train` run through the CLI (with --set overrides), shared by the tests that inspect its outputs."""
    tmp = tmp_path_factory.mktemp("cli_train")
    config = write_config(tmp, data_dir)
    proc = cli("train", config, "--set", "train.max_iters=8", "--set", "train.seed=3")
    return tmp, proc


def test_train_writes_summary_metrics_and_checkpoint(trained):
    tmp, proc = trained
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # the final line is the JSON summary
    assert summary["step"] == 8  # the --set override won over the file's max_iters = 6
    assert np.isfinite(summary["loss"]) and np.isfinite(summary["val_loss"])
    ckpt = tmp / "run" / "ckpt_00000008.h5"
    assert summary["checkpoint"] == str(ckpt) and ckpt.is_file()

    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]  # log_interval = 2
    assert all(np.isfinite(r["loss"]) for r in train_rows)
    assert [r["step"] for r in eval_rows] == [0, 3, 6, 8]
    assert eval_rows[-1]["val_loss"] == summary["val_loss"]

    from hpc_llm.checkpoint import load_checkpoint

    saved = load_checkpoint(ckpt)
    assert saved.config["train"]["seed"] == 3 and saved.state["step"] == 8


def test_generate_from_checkpoint(trained):
    tmp, proc = trained
    assert proc.returncode == 0, proc.stderr
    gen = cli(
        "generate", tmp / "run" / "ckpt_00000008.h5", "--prompt", "ab", "--max-new-tokens", 20
    )
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("ab")
    # a byte model may emit invalid UTF-8 bytes, decoded as U+FFFD
    assert len(gen.stdout.encode()) >= 2
    again = cli(
        "generate", tmp / "run" / "ckpt_00000008.h5", "--prompt", "ab", "--max-new-tokens", 20
    )
    assert again.stdout == gen.stdout  # the default seed makes sampling reproducible


# -- user errors: exit 2, one line, no traceback ---------------------------------------------------------------------


def test_missing_config_file(tmp_path):
    assert_user_error(cli("train", tmp_path / "nope.toml"), "nope.toml")


def test_invalid_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_layer = = 2\n")
    assert_user_error(cli("train", bad), "bad.toml", "TOML")


def test_unknown_section(tmp_path, data_dir):
    config = write_config(tmp_path, data_dir, extra="\n[nosuch]\nx = 1\n")
    assert_user_error(cli("train", config), "nosuch")


def test_unknown_key_in_file(tmp_path, data_dir):
    config = write_config(tmp_path, data_dir, extra="\n[checkpoint]\nbogus_key = 1\n")
    assert_user_error(cli("train", config), "checkpoint.bogus_key")


@pytest.mark.parametrize(
    "override, needles",
    [
        ("train.nope=1", ["train.nope"]),
        ("train.lr=abc", ["train.lr", "abc"]),
        ("model.n_layer=2.5", ["model.n_layer", "2.5"]),
        ("trainlr=1", ["trainlr=1"]),  # no dot
        ("train.lr", ["train.lr"]),  # no '='
        ("model.n_embd=33", ["model.n_embd", "33", "n_head"]),  # not divisible by n_head = 2
        ("checkpoint.writer=fast", ["checkpoint.writer", "fast", '"gather"']),
    ],
)
def test_bad_override(tmp_path, data_dir, override, needles):
    config = write_config(tmp_path, data_dir)
    assert_user_error(cli("train", config, "--set", override), *needles)
    assert not (tmp_path / "run").exists()  # rejected before any work


def test_generate_from_non_checkpoint(tmp_path):
    fake = tmp_path / "notes.h5"
    fake.write_text("just some text, not HDF5\n")
    assert_user_error(cli("generate", fake, "--prompt", "ab", "--max-new-tokens", 3), "notes.h5")
    assert_user_error(cli("generate", tmp_path / "missing.h5"), "missing.h5")


def test_resume_from_non_checkpoint(tmp_path, data_dir):
    fake = tmp_path / "notes.h5"
    fake.write_text("just some text, not HDF5\n")
    config = write_config(tmp_path, data_dir)
    assert_user_error(cli("train", config, "--resume", fake), "notes.h5")
    assert_user_error(cli("train", config, "--resume", tmp_path / "missing.h5"), "missing.h5")


# -- Python API ------------------------------------------------------------------------------------------------------


def _tiny_model(vocab_size: int) -> GPT:
    return GPT(
        ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=vocab_size), seed=0
    )


# padded vocab 256 (no pad rows) and 64 (pad rows 50..63)
@pytest.mark.parametrize("vocab_size", [256, 50])
def test_loss_with_token_outside_vocab(vocab_size):
    model = _tiny_model(vocab_size)
    x = np.zeros((1, 4), dtype=np.int64)
    y = np.ones((1, 4), dtype=np.int64)
    assert np.isfinite(model.loss(x, y))
    bad = x.copy()
    bad[0, 2] = vocab_size
    with pytest.raises(UserError, match=f"token id {vocab_size}"):
        model.loss(bad, y)
    bad_y = y.copy()
    bad_y[0, 1] = vocab_size
    with pytest.raises(UserError, match=f"token id {vocab_size}"):
        model.loss(x, bad_y)
    with pytest.raises(UserError, match="token id -1"):
        model.loss(x - 1, y)


def test_api_sequence_longer_than_block():
    model = _tiny_model(50)
    x = np.zeros((1, 9), dtype=np.int64)  # block_size 8
    with pytest.raises(UserError, match="block_size"):
        model.loss(x, x)
    with pytest.raises(UserError, match="block_size"):
        model.logits(x)


def test_api_checks_that_exist():
    """gradients() checks its inputs like loss() and logits()."""
    model = _tiny_model(50)
    x = np.zeros((1, 4), dtype=np.int64)
    with pytest.raises(UserError, match="token id 50"):
        model.gradients(x, x + 50)
    with pytest.raises(UserError, match="block_size"):
        model.gradients(np.zeros((1, 9), dtype=np.int64), np.zeros((1, 9), dtype=np.int64))


# -- stop signals (Slurm's --signal=B:USR1@T, forwarded by the batch script; SIGTERM at the time limit) ---------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signal_checkpoints_exits_75_and_resume_continues_exactly(tmp_path, data_dir, signum):
    """A real signal to a running `hpc-llm train`: it finishes the step, writes a verified checkpoint, exits 75; a
    `--resume auto` run finishes, and its loss history is bitwise the uninterrupted run's."""
    from hpc_llm.checkpoint import find_latest, load_checkpoint
    from hpc_llm.runtime.stop import EXIT_PREEMPTED

    steps = 400
    sets = [
        "--set",
        f"train.max_iters={steps}",
        "--set",
        f"train.lr_decay_iters={steps}",
        "--set",
        "train.log_interval=1",
        "--set",
        "train.eval_interval=100",
        "--set",
        "model.dtype=float64",
    ]
    cfg = write_config(tmp_path, data_dir)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpc_llm", "train", cfg, *sets],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    # an event wait (3 logged steps), its timeout generous: no timing claim
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, (out, err)
    assert f"stop signal {signal.Signals(signum).name}" in out
    stopped = find_latest(run_dir)
    k = load_checkpoint(stopped).state["step"]
    assert 3 <= k < steps, k
    assert json.loads(out.strip().splitlines()[-1])["stopped_by"] == signum

    resumed = cli("train", cfg, *sets, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {stopped}" in resumed.stdout
    whole = cli("train", cfg, *sets, "--set", f"train.out_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    a = load_checkpoint(find_latest(run_dir))
    b = load_checkpoint(find_latest(tmp_path / "whole"))
    assert a.state["step"] == b.state["step"] == steps
    np.testing.assert_array_equal(a.metrics["train"]["step"], np.arange(1, steps + 1))
    np.testing.assert_array_equal(a.metrics["train"]["loss"], b.metrics["train"]["loss"])
    for name in b.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)


def test_fresh_run_refuses_a_directory_with_checkpoints(trained):
    """A second fresh run in the same out_dir would mix two runs' checkpoints: refused, nothing touched; the first
    run left its resolved config beside them."""
    tmp, _ = trained
    cfg, run_dir = tmp / "tiny.toml", tmp / "run"
    assert json.loads((run_dir / "config.json").read_text())["train"]["max_iters"] == 8
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.iterdir())
    assert_user_error(
        cli("train", cfg), "train.out_dir=", "already holds checkpoints", "--resume auto"
    )
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.iterdir()) == before


def test_mpio_writer_without_parallel_h5py(tmp_path, data_dir):
    from hpc_llm.checkpoint import mpio_available

    if mpio_available():
        pytest.skip(
            "this h5py has MPI: the mpio writer is tested in tests/checkpoint/test_checkpoint_mpio.py"
        )
    assert_user_error(
        cli("train", write_config(tmp_path, data_dir), "--set", "checkpoint.writer=mpio"),
        "checkpoint.writer=mpio",
        "no MPI support",
    )
    assert not (tmp_path / "run").exists()


# -- the watchdog: armed before every verb ---------------------------------------------------------------------------

# the verbs that may talk to other ranks (they take --comm-timeout-s), and those that run on one process only (under
# mpiexec they refuse, or each rank works alone): a new verb must be put in one of the two
TALKING_VERBS = {"prepare", "train", "generate", "eval", "bench comm", "bench calibrate"}
SINGLE_PROCESS_VERBS = {"inspect", "import-gpt2", "export-hf", "merge-lora", "prune", "plan"}


def _verbs(parser, prefix=""):
    """{"generate": its parser, "bench comm": ..., ...}: every leaf of the command line."""
    import argparse

    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(_verbs(sub, f"{prefix}{name} "))
    return out or {prefix.strip(): parser}


def test_every_verb_that_talks_to_other_ranks_takes_comm_timeout_s():
    from hpc_llm.cli import build_parser
    from hpc_llm.config import Config

    verbs = _verbs(build_parser())
    assert set(verbs) == TALKING_VERBS | SINGLE_PROCESS_VERBS, set(verbs)
    for name, p in verbs.items():
        flags = {a.dest: a for a in p._actions}
        if name in TALKING_VERBS:
            # the same default as the config field train re-arms it with
            assert flags["comm_timeout_s"].default == Config().parallel.comm_timeout_s == 600.0
            assert "--comm-timeout-s" in p.format_help()
        else:
            assert "comm_timeout_s" not in flags, name


@pytest.mark.parametrize(
    "argv, timeout, source",
    [
        (["eval", "ck.h5", "--data", "d", "--comm-timeout-s", "7.5"], 7.5, "--comm-timeout-s"),
        (["eval", "ck.h5", "--data", "d", "--comm-timeout-s", "0"], 0.0, "--comm-timeout-s"),
        (["eval", "ck.h5", "--data", "d"], 600.0, "--comm-timeout-s"),
        (["inspect", "ck.h5"], 600.0, "the default comm timeout"),
    ],
)
def test_main_arms_the_watchdog_before_the_verb_runs(monkeypatch, argv, timeout, source):
    """cli.main configures the watchdog once the arguments are parsed, before the verb's first line (any verb: one
    without the flag gets the default)."""
    from hpc_llm.cli import commands, main
    from hpc_llm.runtime.faults import WATCHDOG

    calls = []
    monkeypatch.setattr(WATCHDOG, "configure", lambda t, source: calls.append(("arm", t, source)))
    for verb in ("run_eval", "run_inspect"):
        monkeypatch.setattr(commands, verb, lambda args: calls.append(("verb",)))
    assert main(argv) == 0
    assert calls == [("arm", timeout, source), ("verb",)]
