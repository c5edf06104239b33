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

import os
import signal
import subprocess
import sys

import pytest
from kill_harness import CHILD, check_recovery, finished_run, kill_config, wait_until_paused

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


def config(tmp_path, data_dir, name, writer="gather"):
    return kill_config(tmp_path, data_dir, name, **WRITERS[writer])


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
    return finished_run(train, config(tmp, data_dir, "run"), tmp / "run")


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
        wait_until_paused(child, point)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.stdout.close()
        child.stderr.close()
    check_recovery(train, cfg, run_dir, new_complete, tmp_left, uninterrupted)
