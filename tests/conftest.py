"""Shared fixtures: a small generated corpus, its prepared token directory, and tiny model/run configs; the timeouts
of the MPI tests and a directory shared by their ranks; no silent skips in CI. The helpers that test files import
(tiny_config and the rest) live in helpers.py."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from helpers import tiny_config

from hpc_llm.config import Config
from hpc_llm.data.prepare import prepare


def make_corpus(n_bytes: int = 6000, seed: int = 0) -> str:
    """Repetitive but not trivial English-like text: random subject-verb-object sentences (about 2.8 nats/byte
    unigram entropy, far below ln 256, so a model that learns anything at all beats the uniform guess)."""
    r = random.Random(seed)
    subj = ["the cat", "a dog", "my friend", "the old man", "every bird", "her brother"]
    verb = ["sees", "likes", "chases", "finds", "calls", "feeds"]
    obj = ["the ball", "a red fish", "some bread", "the moon", "two mice", "his hat"]
    out, size = [], 0
    while size < n_bytes:
        line = f"{r.choice(subj)} {r.choice(verb)} {r.choice(obj)}.\n"
        out.append(line)
        size += len(line)
    return "".join(out)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus())
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_file):
    """A byte-tokenized data directory (vocab 256, ~5400 train + ~600 val tokens), shared read-only by the tests."""
    out = tmp_path_factory.mktemp("data") / "tokens"
    prepare([corpus_file], out, tokenizer="byte")
    return out


@pytest.fixture
def make_cfg(data_dir, tmp_path):
    """make_cfg(out="run", **{"train.max_iters": 5}) -> a tiny Config writing under tmp_path/out."""

    def make(out: str = "run", **overrides) -> Config:
        return tiny_config(data_dir, tmp_path / out, **overrides)

    return make


# -- MPI tests (mpi-pytest) ------------------------------------------------------------------------------------------
#
# A test marked @pytest.mark.parallel(nprocs=N) is run by the plain pytest process (the "parent") as
# `mpiexec --oversubscribe -n 1 pytest <test> : -n N-1 pytest <test>`; those N "child" ranks run the test body.
# A rank blocked in an MPI call sits in C and never returns to Python, so each child gets pytest-timeout's `thread`
# method (a watchdog thread dumps the stacks and os._exit()s the rank; mpiexec then aborts the whole job), and the
# parent, waiting in subprocess.run, a longer `signal` timeout (SIGALRM fails the test and kills mpiexec) as a
# backstop. Environment overrides (seconds): HPC_LLM_MPI_TIMEOUT (child), HPC_LLM_MPI_PARENT_TIMEOUT (parent).

MPI_CHILD_TIMEOUT = float(os.environ.get("HPC_LLM_MPI_TIMEOUT", "150"))
MPI_PARENT_TIMEOUT = float(
    os.environ.get("HPC_LLM_MPI_PARENT_TIMEOUT", str(MPI_CHILD_TIMEOUT + 50))
)


def _is_mpi_rank() -> bool:
    """True in a rank of an MPI job (mpi-pytest's child, or pytest run under an outer mpiexec)."""
    if "_PYTEST_MPI_CHILD_PROCESS" in os.environ:
        return True
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size() > 1


def pytest_collection_modifyitems(config, items):
    """Every test carrying the `parallel` marker gets a timeout (unless it sets its own): thread method in the ranks,
    a longer signal method in the parent."""
    rank = None
    for item in items:
        if (
            item.get_closest_marker("parallel") is None
            or item.get_closest_marker("timeout") is not None
        ):
            continue
        if rank is None:
            rank = _is_mpi_rank()
        if rank:
            item.add_marker(pytest.mark.timeout(MPI_CHILD_TIMEOUT, method="thread"))
        else:
            item.add_marker(pytest.mark.timeout(MPI_PARENT_TIMEOUT, method="signal"))


@pytest.fixture
def shared_tmp_path(tmp_path):
    """One directory for all ranks of an MPI test (rank 0's tmp_path; each rank's own tmp_path differs)."""
    from mpi4py import MPI

    return Path(MPI.COMM_WORLD.bcast(str(tmp_path), root=0))


# -- no silent skips in CI -------------------------------------------------------------------------------------------
#
# Where CI=true (.ci/run sets it), a skipped test is a failed one, with the skip's reason: an environment that did not
# install or start (Slurm, matplotlib, ...) must turn CI red, not quietly shrink the suite. Only tests marked `gpu`
# may skip there (a CPU machine has no GPU); HPC_LLM_REQUIRE_GPU=1 makes those required too (tests/model/test_gpu.py).

STRICT_SKIPS = os.environ.get("CI", "").lower() in ("true", "1")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_skip(report, where: str) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"{where} was skipped under CI=true, where nothing but the GPU tests may skip: "
        f"{_skip_reason(report)}"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if (
        STRICT_SKIPS
        and report.skipped
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker("gpu") is None
    ):
        _fail_skip(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()
    # a module-level skip (pytest.skip(allow_module_level=True), importorskip)
    if STRICT_SKIPS and report.skipped:
        _fail_skip(report, collector.nodeid)
