"""A process killed (SIGKILL) at any point of a save leaves the previous checkpoint loadable, never a file under a
checkpoint's name that is not complete, and `--resume auto` continues from the newest complete checkpoint exactly.

The child is `hpc-llm train` (checkpoints at steps 2, 4, 6) with one function of the save wrapped so that
during the save of step 4 it stops at a chosen point, says so, and waits to be killed. The gather writer: while the
temporary file is being filled (first and a middle dataset), before its fsync, before verification, before the
rename, after the rename but before the `latest` pointer moves, and before old checkpoints are pruned. The parts
writer: while its part is written, before the part's fsync, before the master's, before the master's rename, before
`latest` moves; in the background (checkpoint.async_save), while the part is written as training goes on, and
while rank 0's thread writes the master, before its rename and before `latest` moves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import tiny_config, write_toml

from hpc_llm import checkpoint as ckpt
from hpc_llm.checkpoint import (
    checkpoint_path,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)

CHILD = textwrap.dedent("""
    import os, sys, time
    import h5py
    from hpc_llm import checkpoint as ckpt, cli
    from hpc_llm.checkpoint import parts, rundir, writers

    where, nth = os.environ["KILL_POINT"].split(":")
    saves, calls = 0, 0

    def pausing(fn, name):
        def wrapped(*args, **kwargs):
            global calls
            if name == where and saves == 2:
                calls += 1
                if calls == int(nth):
                    tmp = [p for p in os.listdir(os.environ["RUN_DIR"]) if ".tmp-" in p]
                    print("PAUSED", name, nth, tmp, flush=True)
                    time.sleep(600)
            return fn(*args, **kwargs)
        return wrapped

    save = ckpt.save_trainer
    def counting_save(*args, **kwargs):
        global saves
        saves += 1
        return save(*args, **kwargs)

    ckpt.save_trainer = counting_save
    for module, name in ((writers, "_fsync_path"), (writers, "verify_checkpoint"), (rundir, "write_latest"),
                         (rundir, "prune_checkpoints"), (parts, "_fsync_file")):
        setattr(module, name, pausing(getattr(module, name), name))
    os.replace = pausing(os.replace, "replace")
    h5py.Dataset.__setitem__ = pausing(h5py.Dataset.__setitem__, "write_data")
    sys.exit(cli.main(sys.argv[1:]))
""")

# (writer, point): (is the step-4 checkpoint complete when the process dies?, is a partial save left beside it?)
POINTS = {
    # the temporary file has its header and empty datasets, no data yet
    ("gather", "write_data:1"): (False, True),
    ("gather", "write_data:9"): (False, True),  # in the middle of the parameters
    ("gather", "_fsync_path:1"): (False, True),  # written and closed, not yet on disk for sure
    ("gather", "verify_checkpoint:1"): (False, True),
    ("gather", "replace:1"): (False, True),  # verified, not renamed
    ("gather", "write_latest:1"): (True, False),  # renamed; `latest` still names step 2
    ("gather", "prune_checkpoints:1"): (True, False),  # step 2 not yet pruned
    ("parts", "write_data:1"): (False, True),  # the part file has its datasets, no data yet
    ("parts", "_fsync_file:1"): (False, True),  # the part written, not yet on disk for sure
    ("parts", "_fsync_file:2"): (False, True),  # the master written under its temporary name
    ("parts", "replace:1"): (False, True),  # the master checked, not renamed
    ("parts", "write_latest:1"): (True, False),  # renamed; `latest` still names step 2
    ("async", "write_data:1"): (False, True),  # the background writer's part, training going on
    # rank 0's thread, training going on: the master written, not yet on disk for sure
    ("async", "_fsync_file:2"): (False, True),
    ("async", "replace:1"): (False, True),  # the master checked, not renamed
    ("async", "write_latest:1"): (True, False),  # renamed; `latest` still names step 2
}
WRITERS = {
    "gather": {"checkpoint.writer": "gather"},
    "parts": {"checkpoint.writer": "parts"},
    "async": {"checkpoint.writer": "parts", "checkpoint.async_save": True},
}


def partial_saves(run_dir) -> list[str]:
    """Temporary files, and parts directories that no checkpoint names: what an interrupted save leaves."""
    named = {ckpt.rundir.parts_of(p) for _s, p in list_checkpoints(run_dir)}
    return [
        p.name
        for p in run_dir.iterdir()
        if ".tmp-" in p.name or (".parts-" in p.name and p not in named)
    ]


def config(tmp_path, data_dir, name, writer="gather"):
    """Six float64 steps with dropout, checkpoints at steps 2, 4 and 6, the newest kept."""
    cfg = tiny_config(
        data_dir,
        tmp_path / name,
        **WRITERS[writer],
        **{
            "model.dtype": "float64",
            "model.dropout": 0.1,
            "train.max_iters": 6,
            "train.lr_decay_iters": 6,
            "train.eval_iters": 0,
            "train.log_interval": 1,
            "checkpoint.interval": 2,
            "checkpoint.keep_last": 1,
        },
    )
    return write_toml(cfg, tmp_path / f"{name}.toml")


def train(cfg, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "hpc_llm", "train", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("whole")
    proc = train(config(tmp, data_dir, "run"))
    assert proc.returncode == 0, proc.stderr
    return load_checkpoint(find_latest(tmp / "run"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("writer", "point"), list(POINTS), ids=[f"{w}-{p}" for w, p in POINTS])
def test_kill_during_save(writer, point, tmp_path, data_dir, uninterrupted):
    new_complete, tmp_left = POINTS[writer, point]
    run_dir = tmp_path / "run"
    cfg = config(tmp_path, data_dir, "run", writer)
    env = {**os.environ, "KILL_POINT": point, "RUN_DIR": str(run_dir)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "train", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for line in child.stdout:
            if line.startswith("PAUSED"):
                break
        else:
            pytest.fail(f"the child never reached {point}: {child.wait()} {child.stderr.read()}")
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.stdout.close()
        child.stderr.close()

    # every file under a checkpoint's name is complete and verifies; the partial one is only a temporary file
    named = list_checkpoints(run_dir)
    for _step, path in named:
        verify_checkpoint(path)
    assert [s for s, _ in named] == ([4, 2] if new_complete else [2])
    assert bool(partial_saves(run_dir)) == tmp_left
    newest = find_latest(run_dir)
    assert newest == checkpoint_path(run_dir, 4 if new_complete else 2)
    assert load_checkpoint(newest).state["step"] == (4 if new_complete else 2)

    # --resume auto picks it, cleans the interrupted save's temporary file and ends where the uninterrupted run does
    resumed = train(cfg, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {newest}" in resumed.stdout
    assert not partial_saves(run_dir)
    final = load_checkpoint(find_latest(run_dir))
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == final.state["step"] == 6
    np.testing.assert_array_equal(
        final.metrics["train"]["loss"], uninterrupted.metrics["train"]["loss"]
    )
    for name, want in uninterrupted.params.items():
        np.testing.assert_array_equal(final.params[name], want, err_msg=name)
