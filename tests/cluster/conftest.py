"""The virtual cluster's fixture: scripts/vcluster.sh brings 2 nodes up before each test that asks for it (a no-op
when they are up; it also undoes what a test changed: a rate, a link set down) and takes the cluster down after the
last. Where the cluster cannot start (not root, no `ip`, the kernel refuses a namespace) the test is skipped with the
reason, which under CI=true fails it (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, kill_session, mpiexec

VCLUSTER = REPO / "scripts" / "vcluster.sh"
NODES = 2
PREFIX = os.environ.get("VCLUSTER_NAME", "vc")  # the names vcluster.sh gives: vcbr0, vc-nodeK


def env() -> dict:
    """What vcluster.sh and the ranks it starts need: this Python's mpiexec, one BLAS thread per rank."""
    # a 10 s grace (vcluster.sh's default is 3): on a loaded CI machine the launcher may take longer than 3 s to say
    # which daemon it lost, and the tests check that it is named
    return {
        **os.environ,
        "MPIEXEC": mpiexec(),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "VCLUSTER_ABORT_GRACE_S": os.environ.get("VCLUSTER_ABORT_GRACE_S", "10"),
    }


def vcluster(*args, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
    """scripts/vcluster.sh ARGS (in the directory cwd), its output as text."""
    return subprocess.run(
        [str(VCLUSTER), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        cwd=cwd,
    )


class Cluster:
    """The running cluster, for a test: vcluster.sh's commands and mpiexec on its nodes."""

    script = VCLUSTER
    # its record and the UTS namespaces' mounts (vcluster.sh's default)
    state = os.environ.get(
        "VCLUSTER_STATE", "/run/vcluster" + (f"-{PREFIX}" if "VCLUSTER_NAME" in os.environ else "")
    )
    run = staticmethod(vcluster)

    @staticmethod
    def mpiexec_cmd(hosts: str, *args, mpi: tuple = ()) -> list[str]:
        """`vcluster.sh mpiexec -n N --host HOSTS MPI python ARGS` (N: the slots in HOSTS, e.g. node1:2,node2:2;
        MPI: more options of mpiexec's)."""
        n = sum(int(h.split(":")[1]) for h in hosts.split(","))
        return [
            str(VCLUSTER),
            "mpiexec",
            "-n",
            str(n),
            "--host",
            hosts,
            *mpi,
            sys.executable,
            *args,
        ]

    def start(self, hosts: str, *args, mpi: tuple = ()) -> subprocess.Popen:
        """The job, in a session of its own (stdout and stderr piped, as text)."""
        return subprocess.Popen(
            self.mpiexec_cmd(hosts, *map(str, args), mpi=mpi),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
            start_new_session=True,
        )

    def wait(self, proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
        """The job's (exit status, stdout, stderr). One still running after `timeout` s fails the test, and
        everything in the nodes is killed (PRRTE's daemons leave the launcher's session)."""
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
            vcluster("down")
            out, err = proc.communicate()
            pytest.fail(f"{proc.args} hung for {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
        return proc.returncode, out, err

    def mpiexec(
        self, hosts: str, *args, mpi: tuple = (), timeout: float = 120
    ) -> tuple[int, str, str]:
        """Run `python ARGS` on HOSTS to its end: (exit status, stdout, stderr)."""
        return self.wait(self.start(hosts, *args, mpi=mpi), timeout)


def _cannot_start() -> str | None:
    """Why the cluster cannot come up here, or None once it is up."""
    if os.geteuid() != 0:
        return "the virtual cluster needs root (network and UTS namespaces)"
    missing = [t for t in ("ip", "tc", "nsenter", "unshare") if shutil.which(t) is None]
    if missing:
        return f"the virtual cluster needs {', '.join(missing)} (iproute2, util-linux)"
    up = vcluster("up", NODES)
    if up.returncode != 0:
        return f"scripts/vcluster.sh up {NODES} failed: {up.stderr.strip() or up.stdout.strip()}"
    return None


@pytest.fixture(scope="session")
def _cluster_session():
    """Takes the cluster down after the session's last test that used it."""
    yield
    down = vcluster("down")
    assert down.returncode == 0, down.stderr


@pytest.fixture
def cluster(_cluster_session) -> Cluster:
    """2 nodes up, unshaped."""
    reason = _cannot_start()
    if reason:
        pytest.skip(reason)
    return Cluster()
