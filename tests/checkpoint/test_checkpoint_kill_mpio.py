"""test_checkpoint_kill.py's kill points for the mpio writer: `hpc-llm train` on 2 ranks under Debian's
/usr/bin/mpiexec (parallel HDF5), the whole job SIGKILLed during the step-4 save (its process group: mpiexec and
both ranks), then `--resume auto` on 2 ranks ends where an uninterrupted run does.

Runs in scripts/test_mpio.sh's environment only, and outside mpiexec (this test starts it; Open MPI 4.1 cannot
start mpiexec inside mpiexec): scripts/test.sh leaves the file out (--ignore), and without /usr/bin/mpiexec it is
skipped. The child ranks load h5py's MPI build (mpiexec sets OMPI_COMM_WORLD_SIZE); this process reads the files with
the serial one.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest
from kill_harness import CHILD, check_recovery, finished_run, kill_config, wait_until_paused

MPIEXEC = "/usr/bin/mpiexec"
# Debian's h5py, whose MPI build the ranks load (PyPI's h5py has none, and its mpi4py is not /usr/bin/mpiexec's MPI)
if importlib.util.find_spec("h5py._debian_h5py_mpi") is None or not os.path.exists(MPIEXEC):
    _why = f"no Debian MPI h5py or no {MPIEXEC}: the mpio kill test runs in scripts/test_mpio.sh"
    if os.environ.get("HPC_LLM_REQUIRE_MPIO"):
        raise RuntimeError(f"HPC_LLM_REQUIRE_MPIO is set, but {_why}")
    pytest.skip(_why, allow_module_level=True)

# point: (is the step-4 checkpoint complete when the job dies?, is a partial save left beside it?)
POINTS = {
    "write_data:3": (False, True),  # the shared temporary file half written
    "replace:1": (False, True),  # closed, verified by every rank, not renamed
    "write_latest:1": (True, False),  # renamed; `latest` still names step 2
}


def config(tmp_path, data_dir, name):
    """kill_config's run on 2 ranks (ZeRO-1) by the mpio writer."""
    return kill_config(
        tmp_path, data_dir, name, **{"checkpoint.writer": "mpio", "parallel.zero": 1}
    )


def mpiexec(*args, **extra_env):
    """A command and environment for 2 ranks under Debian's mpiexec (no Open MPI variables of a parent run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "OPAL_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra_env)
    return [MPIEXEC, "--oversubscribe", "-n", "2", sys.executable, *args], env


def train(cfg, *args):
    cmd, env = mpiexec("-m", "hpc_llm", "train", str(cfg), *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (mpiexec, started in a session of its own, and its ranks) until none
    is left running: a rank still exiting holds the run directory's lock, and a resume then finds a live run."""
    while True:
        running = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state, *rest = f.read().rsplit(")", 1)[1].split()
            except (OSError, ValueError):
                continue
            # rest[2]: the session; a zombie ("Z") holds no lock any more
            if rest[2] == str(sid) and state != "Z":
                running.append(int(entry))
        if not running:
            return
        for pid in running:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("whole")
    return finished_run(train, config(tmp, data_dir, "run"), tmp / "run")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", list(POINTS))
def test_kill_during_an_mpio_save(point, tmp_path, data_dir, uninterrupted):
    new_complete, tmp_left = POINTS[point]
    run_dir = tmp_path / "run"
    cfg = config(tmp_path, data_dir, "run")
    cmd, env = mpiexec("-c", CHILD, "train", str(cfg), KILL_POINT=point, RUN_DIR=str(run_dir))
    child = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        wait_until_paused(child, point)
    finally:
        kill_session(child.pid)
        child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()
    check_recovery(train, cfg, run_dir, new_complete, tmp_left, uninterrupted)
