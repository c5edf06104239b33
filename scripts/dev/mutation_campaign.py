#!/usr/bin/env python3
"""Mutation campaign: does the test suite notice the one-line slips a careful engineer could make?

Each mutant (the table is scripts/dev/mutants.py) names the function it mutates by its qualified name, a snippet of
that function's source (which must occur exactly once in it) and its replacement, with a one-line description and
the tests relevant to it (test files by basename, found under tests/). The function is found by parsing every
hpc_llm/**/*.py (module-level functions and methods), so a mutant follows its function when code moves between
files; a name defined twice, a name not found, or a snippet not found exactly once makes the mutant stale, with the
reason. The campaign

1. copies the repository once into a temporary directory: the files `git ls-files --cached --others
   --exclude-standard` lists (tracked files as they are in the working tree, plus untracked, non-ignored ones, so
   tests being written are included), or with ``--rev REV`` the tree of commit REV (``git archive``), optionally
   with ``--overlay PATH`` files taken from the working tree on top (e.g. a new test file);
2. proves that the copy is what runs: ``import hpc_llm`` from the copy's PYTHONPATH resolves into the copy (the
   venv's editable install points at the repository itself), and a canary written into the copy only is seen by the
   pytest process, by a ``python -m hpc_llm`` subprocess, by ranks started with ``mpiexec`` and by mpi-pytest's
   ranks; it aborts otherwise;
3. runs an unmutated baseline of every test selection used and aborts if any is red (a red baseline would make
   every mutant look killed);
4. for each mutant writes the mutated file into the copy, runs ``pytest -x -q -p no:cacheprovider <selection>``
   there with the venv's python (with a per-mutant timeout), restores the file, and records the result: killed (a
   test failed or errored), survived (the selection passed), timeout, or error (pytest could not run the tests:
   a collection/usage error, reported separately, never counted as killed; a test that fails only by hitting
   pytest-timeout counts as a timeout, not a kill); a stale mutant is reported as stale, not skipped silently. A red
   baseline selection is run once more before the campaign aborts (the machine may be shared); green the second
   time, it is reported as flaky.

The environment of every pytest run is what scripts/test.sh sets (the venv's bin first on PATH, Open MPI allowed as
root, one BLAS/OpenMP thread, OPAL_PREFIX/PMIX_PREFIX = the venv), plus PYTHONPATH = the copy (inherited by the
subprocesses and mpiexec ranks the tests start) and PYTHONDONTWRITEBYTECODE=1 (a mutant of the same size written
within the same second as the original must never be served from a stale .pyc). Nothing under the repository is
ever written: mutants are applied to the copy only.

Run it from the repository root (it takes a while: run it in the background and watch stderr):

    .venv/bin/python scripts/dev/mutation_campaign.py --list          # the mutants, checked against the source
    .venv/bin/python scripts/dev/mutation_campaign.py                 # baseline + every mutant
    .venv/bin/python scripts/dev/mutation_campaign.py --only ln-unbiased-var,adam-no-bias-correction-1
    .venv/bin/python scripts/dev/mutation_campaign.py --rev HEAD --overlay tests/train/test_optim.py   # mid-edit

Results: a Markdown table (id, function, description, tests run, result, seconds) on stdout and in ``--out``
(default /tmp/mutation_results.md), the same as JSON beside it (``--json``, default: the same name with .json), and
a summary line "killed K / N, survived S: ids...". docs/testing.md holds the table of results of the last full
campaign.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mutants import MUTANTS, Mutant

SCRIPT_DIR = Path(__file__).resolve().parent
# the repository's own environment (scripts/setup.sh makes it)
DEFAULT_PYTHON = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python")
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-rfEs"]


# ---------------------------------------------------------------------------------------------------------------------
# Finding a mutant's function and its tests


@dataclass(frozen=True)
class Site:
    """Where a function is: its file (relative to the tree's root) and its lines, the def line to the last."""

    file: str
    start: int
    end: int


@dataclass(frozen=True)
class Resolution:
    """A mutant against one tree: the mutated text of its file, or (text None) why it does not apply."""

    file: str
    text: str | None
    why: str = ""


def functions_in(text: str) -> list[tuple[str, int, int]]:
    """(qualified name, def line, last line) of every module-level function and every method (of classes at module
    level, and of classes nested in them) in a module's source."""
    out = []

    def walk(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                out.append((prefix + node.name, node.lineno, node.end_lineno))
            elif isinstance(node, ast.ClassDef):
                walk(node.body, f"{prefix}{node.name}.")

    walk(ast.parse(text).body, "")
    return out


class Sources:
    """The hpc_llm/**/*.py files of one tree (a directory, or a commit with working-tree overlays): their text, and
    where each function is defined."""

    def __init__(self, paths: list[str], read: Callable[[str], str | None]):
        self.paths, self.read = sorted(paths), read
        # (module, qualified name) -> where it is
        self._index: dict[tuple[str, str], Site] | None = None
        self.unparsable: list[str] = []

    @classmethod
    def directory(cls, root: Path) -> Sources:
        def read(file: str) -> str | None:
            path = root / file
            return path.read_text() if path.is_file() else None

        paths = [p.relative_to(root).as_posix() for p in (root / "hpc_llm").rglob("*.py")]
        return cls(paths, read)

    @classmethod
    def commit(cls, repo: Path, rev: str, overlays: list[str]) -> Sources:
        listed = git(repo, "ls-tree", "-r", "--name-only", rev, "--", "hpc_llm").splitlines()
        extra = [f for f in overlays if f.startswith("hpc_llm/") and (repo / f).is_file()]
        paths = sorted({f for f in listed + extra if f.endswith(".py")})
        return cls(paths, lambda f: source_text(repo, rev, overlays, f))

    def index(self) -> dict[tuple[str, str], Site]:
        if self._index is None:
            self._index = {}
            for file in self.paths:
                module = file.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
                try:
                    found = functions_in(self.read(file) or "")
                except SyntaxError as e:
                    self.unparsable.append(f"{file}: {e}")
                    continue
                for name, start, end in found:
                    self._index[module, name] = Site(file, start, end)
        return self._index

    def locate(self, function: str) -> tuple[Site | None, str]:
        """(the one place `function` is defined, "") or (None, why not). `function` is a qualified name in its
        module ("name", "Class.name"), optionally after the trailing parts of the module's dotted name
        ("layers.name", "model.layers.name") where two modules define the same name."""

        def matches(module: str, name: str) -> bool:
            prefix = function.removesuffix(name)
            return function == name or (
                prefix.endswith(".") and f".{module}.".endswith(f".{prefix}")
            )

        found = [(key, site) for key, site in self.index().items() if matches(*key)]
        if len(found) == 1:
            return found[0][1], ""
        if not found:
            broken = f" (not parsed: {'; '.join(self.unparsable)})" if self.unparsable else ""
            return None, f"stale: no function {function} in hpc_llm/{broken}"
        where = ", ".join(
            f"{module}.{name} ({site.file}:{site.start})" for (module, name), site in found
        )
        return None, (
            f"stale: {function} is ambiguous, defined {len(found)} times: {where}; "
            f"name it with its module (module.{function})"
        )


def resolve(m: Mutant, sources: Sources) -> Resolution:
    """The mutant applied to its function's source lines (the snippet must occur there exactly once)."""
    site, why = sources.locate(m.function)
    if site is None:
        return Resolution("", None, why)
    lines = (sources.read(site.file) or "").splitlines(keepends=True)
    head, body = "".join(lines[: site.start - 1]), "".join(lines[site.start - 1 : site.end])
    n = body.count(m.original)
    if n != 1:
        return Resolution(
            site.file,
            None,
            f"stale: the snippet occurs {n} times in {m.function} ({site.file}:{site.start}-{site.end}); "
            f"it must occur exactly once",
        )
    mutated = body.replace(m.original, m.replacement, 1)
    return Resolution(site.file, head + mutated + "".join(lines[site.end :]))


def find_tests(tests: tuple[str, ...], root: Path) -> tuple[tuple[str, ...], list[str]]:
    """(selection, missing): each "test_x.py[::node]" as its path under root/tests, found by its basename anywhere
    below; missing: the ones found nowhere or more than once, with the reason."""
    by_name: dict[str, list[str]] = {}
    for path in sorted((root / "tests").rglob("*.py")):
        by_name.setdefault(path.name, []).append(path.relative_to(root).as_posix())
    present, missing = [], []
    for test in tests:
        name, sep, node = test.partition("::")
        found = by_name.get(name, [])
        if len(found) == 1:
            present.append(found[0] + sep + node)
        elif not found:
            missing.append(f"{test} (no {name} under tests/)")
        else:
            missing.append(f"{test} (ambiguous: {', '.join(found)})")
    return tuple(present), missing


# ---------------------------------------------------------------------------------------------------------------------
# Processes


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill what this campaign started for one run: the process group it created (start_new_session: the group id is
    the child's pid), and, by pid, any descendant that left the group (mpiexec's daemons may)."""
    descendants = []
    try:
        import psutil

        descendants = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing or the process already gone
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child in descendants:
        try:
            child.kill()
        except Exception:
            pass


STOP = threading.Event()  # set on Ctrl-C / SIGTERM: no new runs start, the running ones are killed
_RUNNING: set = set()
_RUNNING_LOCK = threading.Lock()


def run_command(
    cmd: list[str], cwd: Path | str, env: dict, timeout: float
) -> tuple[int, str, float, bool]:
    """(return code, stdout+stderr, seconds, timed out)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    with _RUNNING_LOCK:
        _RUNNING.add(proc)
    try:
        return _wait(proc, timeout, t0)
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)


def kill_running() -> None:
    with _RUNNING_LOCK:
        procs = list(_RUNNING)
    for proc in procs:
        _kill_tree(proc)


def run_all(fn, items, jobs: int) -> list:
    """[fn(item)] on `jobs` threads, in order; on Ctrl-C/SIGTERM: no new item starts, the running commands are
    killed, and KeyboardInterrupt propagates."""
    ex = ThreadPoolExecutor(jobs)
    try:
        futures = [ex.submit(fn, item) for item in items]
        return [f.result() for f in futures]
    except KeyboardInterrupt:
        STOP.set()
        ex.shutdown(wait=False, cancel_futures=True)
        kill_running()
        raise
    finally:
        ex.shutdown(wait=True)


def _wait(proc: subprocess.Popen, timeout: float, t0: float) -> tuple[int, str, float, bool]:
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # the command itself may have finished while a leftover grandchild keeps the pipe open
        timed_out = proc.poll() is None
        _kill_tree(proc)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out = b""
    else:
        if proc.returncode != 0:
            _kill_tree(proc)  # nothing of a failed run (an aborted mpiexec job) may linger
    return proc.returncode, out.decode("utf-8", "replace"), time.monotonic() - t0, timed_out


def test_env(venv: Path, copy: Path) -> dict:
    """scripts/test.sh's environment, with PYTHONPATH = the copy."""
    env = dict(os.environ)
    env.pop("PYTHONHOME", None)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        OPAL_PREFIX=str(venv),
        PMIX_PREFIX=str(venv),
        PYTHONDONTWRITEBYTECODE="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(
        [str(copy), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    )
    # a rank stuck in a collective (a mutant can cause one) fails its test in two minutes, not the conftest's 150 s
    # (tighter would fail healthy tests when the machine is shared: they take 2-3 s unloaded)
    env.setdefault("HPC_LLM_MPI_TIMEOUT", "120")
    env.setdefault("HPC_LLM_MPI_PARENT_TIMEOUT", "160")
    return env


# ---------------------------------------------------------------------------------------------------------------------
# The copy of the repository


def git(repo: Path, *args: str, text: bool = True):
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=text
    ).stdout


def make_copy(repo: Path, dest: Path, rev: str | None, overlays: list[str]) -> list[str]:
    """Copy the repository's files into dest; returns warnings."""
    warnings = []
    dest.mkdir(parents=True)
    if rev is None:
        names = git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split(
            "\0"
        )
        for name in filter(None, names):
            src = repo / name
            if not src.exists() and not src.is_symlink():  # tracked but deleted in the working tree
                warnings.append(
                    f"{name}: listed by git but missing from the working tree, not copied"
                )
                continue
            # a submodule or nested repository: its files are not listed
            if src.is_dir() and not src.is_symlink():
                warnings.append(f"{name}: a nested repository, not copied")
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target, follow_symlinks=False)
    else:
        archive = dest.parent / f"{dest.name}.tar"
        with open(archive, "wb") as f:
            subprocess.run(["git", "archive", "--format=tar", rev], cwd=repo, check=True, stdout=f)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="tar") if hasattr(
                tarfile, "tar_filter"
            ) else tar.extractall(dest)
        archive.unlink()
    for name in overlays:
        src = repo / name
        if not src.is_file():
            warnings.append(f"--overlay {name}: not a file in the working tree, not copied")
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)
    return warnings


def check_outside(path: Path, repo: Path) -> None:
    p, r = path.resolve(), repo.resolve()
    if p == r or r in p.parents:
        raise SystemExit(f"refusing to work inside the repository: {p}")


CANARY_TEST = r'''
"""Written by scripts/dev/mutation_campaign.py into its copy of the repository only: every way the tests run code (this
pytest process, `python -m hpc_llm` subprocesses, mpiexec ranks, mpi-pytest ranks) imports the copy's hpc_llm."""
import os
import shutil
import subprocess
import sys

import pytest

import hpc_llm

ROOT = os.path.realpath(os.environ["HPC_LLM_MUTATION_COPY"])
TOKEN = os.environ["HPC_LLM_MUTATION_TOKEN"]
PRINT = {**os.environ, "HPC_LLM_MUTATION_CANARY_PRINT": "1"}


def inside(path):
    return os.path.realpath(path).startswith(ROOT + os.sep)


def canary_lines(text):
    return [line.split(" ", 2) for line in text.splitlines() if line.startswith("MUTATION-CANARY ")]


def test_pytest_process_imports_the_copy():
    assert inside(hpc_llm.__file__), hpc_llm.__file__
    assert getattr(hpc_llm, "MUTATION_CANARY", None) == TOKEN


def test_python_m_hpc_llm_subprocess_imports_the_copy(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hpc_llm", "--help"], cwd=tmp_path, env=PRINT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = canary_lines(proc.stderr)
    assert len(lines) == 1 and lines[0][1] == TOKEN and inside(lines[0][2]), proc.stderr


def test_mpiexec_ranks_import_the_copy(tmp_path):
    mpiexec = shutil.which("mpiexec")
    assert mpiexec, "mpiexec not on PATH"
    proc = subprocess.run([mpiexec, "--oversubscribe", "-n", "2", sys.executable, "-m", "hpc_llm", "--help"],
                          cwd=tmp_path, env=PRINT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = canary_lines(proc.stderr + proc.stdout)
    assert len(lines) == 2 and all(l[1] == TOKEN and inside(l[2]) for l in lines), proc.stdout + proc.stderr


@pytest.mark.parallel(nprocs=2)
def test_mpi_pytest_ranks_import_the_copy():
    from mpi4py import MPI

    seen = MPI.COMM_WORLD.allgather((hpc_llm.__file__, getattr(hpc_llm, "MUTATION_CANARY", None)))
    assert len(seen) == 2 and all(inside(f) and t == TOKEN for f, t in seen), seen
'''

CANARY_INIT = """

# --- written by scripts/dev/mutation_campaign.py into its copy only (the import canary), removed after the check ---
MUTATION_CANARY = "{token}"
import os as _mc_os, sys as _mc_sys  # noqa: E401,E402
if _mc_os.environ.get("HPC_LLM_MUTATION_CANARY_PRINT"):
    print("MUTATION-CANARY", MUTATION_CANARY, __file__, file=_mc_sys.stderr, flush=True)
"""


def sanity_check(python: str, copy: Path, env: dict) -> None:
    """Abort unless the copy is what the tests import, in every kind of process they start."""
    rc, out, _, _ = run_command(
        [python, "-c", "import hpc_llm; print(hpc_llm.__file__)"], "/", env, 120
    )
    where = out.strip().splitlines()[-1] if out.strip() else ""
    log(f"sanity: `import hpc_llm` (cwd /, PYTHONPATH={copy}) -> {where}")
    if rc != 0 or not os.path.realpath(where).startswith(os.path.realpath(copy) + os.sep):
        raise SystemExit(f"ABORT: hpc_llm is not imported from the copy {copy}:\n{out}")
    init = copy / "hpc_llm" / "__init__.py"
    original = init.read_bytes()
    token = uuid.uuid4().hex
    canary = copy / "tests" / "test_zz_mutation_canary.py"
    try:
        init.write_bytes(original + CANARY_INIT.format(token=token).encode())
        canary.write_text(CANARY_TEST)
        cenv = {**env, "HPC_LLM_MUTATION_COPY": str(copy), "HPC_LLM_MUTATION_TOKEN": token}
        rc, out, secs, _ = run_command(
            [python, "-m", "pytest", *PYTEST_ARGS, str(canary.relative_to(copy))], copy, cenv, 300
        )
    finally:
        init.write_bytes(original)
        canary.unlink(missing_ok=True)
    if rc != 0 or not re.search(r"\b4 passed\b", out):
        raise SystemExit(
            f"ABORT: the import canary failed (the tests would not run the mutated copy):\n{out}"
        )
    log(
        f"sanity: canary seen by the pytest process, `python -m hpc_llm`, mpiexec ranks and mpi-pytest ranks "
        f"({secs:.1f} s)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Running a selection


def selection_args(tests: tuple[str, ...], k: str | None) -> list[str]:
    return [*tests, *(["-k", k] if k else [])]


def selection_label(tests: tuple[str, ...], k: str | None) -> str:
    return " ".join(tests) + (f" -k '{k}'" if k else "")


def parse_counts(out: str) -> dict:
    counts = {}
    for line in reversed(out.strip().splitlines()):
        found = re.findall(
            r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)\b", line
        )
        if found and re.search(r"\bin [\d.]+s\b", line):
            for n, what in found:
                counts["error" if what.startswith("error") else what] = int(n)
            break
    return counts


def first_failure(out: str) -> str:
    for line in out.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ")[0]
    return ""


def hung_at(out: str) -> str:
    """Where pytest-timeout's stack dump shows the hung code: its last frame in hpc_llm, if any."""
    dump = out[: out.rfind("+ Timeout +")] if "+ Timeout +" in out else ""
    # not the private helpers under the public call (Comm._timed)
    frames = [
        f
        for f in re.findall(r'File "[^"]*/(hpc_llm/[^"]+)", line (\d+), in (\w+)', dump)
        if not f[2].startswith("_")
    ]
    return f", hung in {frames[-1][2]} at {frames[-1][0]}:{frames[-1][1]}" if frames else ""


def classify(rc: int, out: str, timed_out: bool) -> tuple[str, str]:
    """(result, detail): killed / survived / timeout / error / no-tests."""
    counts = parse_counts(out)
    summary = ", ".join(f"{n} {w}" for w, n in counts.items())
    if timed_out:
        return "timeout", summary
    if rc == 0:
        return (
            ("survived", summary)
            if counts.get("passed", 0) > 0
            else ("no-tests", summary or "nothing ran")
        )
    if rc == 1:
        failed = first_failure(out)
        if "+ Timeout +" in out or re.search(
            r"Failed: Timeout \(>[\d.]+s\) from pytest-timeout", out
        ):
            # pytest-timeout fired, in this process or in an MPI rank (its stack dump): a test hung (a mutant can
            # deadlock the ranks) or the machine is overloaded; not a clean kill
            return "timeout", f"pytest-timeout in {failed or 'a test'}{hung_at(out)} ({summary})"
        return "killed", (f"{failed} ({summary})" if failed else summary)
    what = {
        2: "interrupted (collection error?)",
        3: "pytest internal error",
        4: "pytest usage error",
        5: "no tests collected",
    }.get(rc, f"exit status {rc}")
    errline = next((line for line in out.splitlines() if line.startswith(("ERROR", "E "))), "")
    return "error", f"{what}{': ' + errline.strip() if errline else ''}"


def tail(out: str, n: int = 40) -> str:
    return "\n".join(out.rstrip().splitlines()[-n:])


# ---------------------------------------------------------------------------------------------------------------------
# Reporting


def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary_line(results: list[dict]) -> str:
    def ids(kind):
        return [r["id"] for r in results if r["result"] == kind]

    n = len(results)
    killed, survived = ids("killed"), ids("survived")
    line = f"killed {len(killed)} / {n}, survived {len(survived)}: {', '.join(survived) or '-'}"
    for kind in ("timeout", "error", "stale", "invalid", "no-tests"):
        if ids(kind):
            line += f"; {kind} {len(ids(kind))}: {', '.join(ids(kind))}"
    return line


def render_markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Mutation campaign",
        "",
        f"Source: {meta['source']}; python {meta['python']}; started {meta['started']}; "
        f"total {meta.get('total_seconds', 0):.0f} s ({meta.get('baseline_seconds', 0):.0f} s baseline of "
        f"{meta.get('baseline_selections', 0)} selections).",
        "",
        f"**{summary_line(results)}**",
        "",
        "| id | function | description | tests run | result | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        tests = selection_label(tuple(r["tests"]), r["k"])
        if r["missing_tests"]:
            tests += f" (missing, skipped: {' '.join(r['missing_tests'])})"
        result = r["result"] + (f": {r['detail']}" if r["detail"] else "")
        lines.append(
            f"| {md_escape(r['id'])} | {md_escape(r['function'])} ({md_escape(r['file'] or '?')}) | "
            f"{md_escape(r['description'])} | "
            f"{md_escape(tests)} | {md_escape(result)} | {r['seconds']:.1f} |"
        )
    if meta.get("warnings"):
        lines += ["", "Warnings:", ""] + [f"- {md_escape(w)}" for w in meta["warnings"]]
    return "\n".join(lines) + "\n"


class Report:
    def __init__(self, md_path: Path, json_path: Path, meta: dict):
        self.md_path, self.json_path, self.meta = md_path, json_path, meta
        self.results: dict[str, dict] = {}
        self.order: list[str] = []
        self.lock = threading.Lock()

    def add(self, result: dict) -> None:
        with self.lock:
            self.results[result["id"]] = result
            self.write()

    def ordered(self) -> list[dict]:
        return [self.results[i] for i in self.order if i in self.results]

    def write(self) -> None:
        results = self.ordered()
        self.md_path.parent.mkdir(parents=True, exist_ok=True)
        self.md_path.write_text(render_markdown(results, self.meta))
        self.json_path.write_text(
            json.dumps(
                {**self.meta, "summary": summary_line(results), "mutants": results}, indent=2
            )
            + "\n"
        )


# ---------------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--list", action="store_true", help="list the mutants, checked against the source, and exit"
    )
    ap.add_argument("--only", default="", help="comma-separated mutant ids")
    ap.add_argument(
        "--python", default=DEFAULT_PYTHON, help=f"the venv's python (default {DEFAULT_PYTHON})"
    )
    ap.add_argument("--out", default="/tmp/mutation_results.md", help="Markdown results file")
    ap.add_argument("--json", default=None, help="JSON results file (default: --out with .json)")
    ap.add_argument(
        "--jobs", type=int, default=1, help="mutants run at once, each in its own copy (default 1)"
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="cap on a mutant's timeout in seconds (default 600; the timeout itself is "
        "max(4 x its selection's baseline + 60, the MPI tests' parent timeout + 60))",
    )
    ap.add_argument(
        "--rev",
        default=None,
        help="copy the tree of this commit (git archive) instead of the working tree",
    )
    ap.add_argument(
        "--overlay",
        action="append",
        default=[],
        help="with --rev: a working-tree file copied over the commit's tree (repeatable)",
    )
    ap.add_argument(
        "--tmpdir", default=None, help="where the copies go (default: the system's temp dir)"
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep the copies (for a look at a mutant's run)"
    )
    return ap.parse_args(argv)


def source_text(repo: Path, rev: str | None, overlays: list[str], file: str) -> str | None:
    try:
        if rev is None or file in overlays:
            return (repo / file).read_text()
        return git(repo, "show", f"{rev}:{file}")
    except (OSError, subprocess.CalledProcessError):
        return None


def list_mutants(repo: Path, mutants: list[Mutant], rev: str | None, overlays: list[str]) -> int:
    sources = Sources.commit(repo, rev, overlays) if rev else Sources.directory(repo)
    stale = 0
    print("| id | function | file | status | description | tests |")
    print("|---|---|---|---|---|---|")
    for m in mutants:
        found = resolve(m, sources)
        status = "ok" if found.text is not None else found.why
        tests, missing = find_tests(m.tests, repo)
        if missing:
            status += f"; tests missing: {', '.join(missing)}"
        stale += status != "ok"
        print(
            f"| {m.id} | {m.function} | {found.file} | {md_escape(status)} | {md_escape(m.description)} | "
            f"{md_escape(selection_label(tests, m.k))} |"
        )
    where = (
        f"commit {rev}" + (f" + {', '.join(overlays)}" if overlays else "")
        if rev
        else "the working tree"
    )
    print(f"\n{len(mutants)} mutants ({len(mutants) - stale} apply to {where}, {stale} stale)")
    return 1 if stale else 0


def select_mutants(only: str) -> list[Mutant]:
    ids = [m.id for m in MUTANTS]
    if len(set(ids)) != len(ids):
        raise SystemExit("mutants.py: duplicate mutant ids")
    if not only:
        return MUTANTS
    wanted = [i.strip() for i in only.split(",") if i.strip()]
    unknown = [i for i in wanted if i not in ids]
    if unknown:
        raise SystemExit(f"--only: unknown mutant ids {unknown} (see --list)")
    return [m for m in MUTANTS if m.id in wanted]


def describe_source(repo: Path, rev: str | None, overlays: list[str]) -> str:
    head = git(repo, "rev-parse", "--short", rev or "HEAD").strip()
    if rev:
        return f"commit {rev} ({head}) of {repo}" + (
            f" + working-tree {', '.join(overlays)}" if overlays else ""
        )
    dirty = bool(git(repo, "status", "--porcelain").strip())
    return f"working tree of {repo} at {head}" + (" with uncommitted changes" if dirty else "")


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)  # `kill PID` stops a background campaign as Ctrl-C does
    repo = Path(git(SCRIPT_DIR, "rev-parse", "--show-toplevel").strip())
    mutants = select_mutants(args.only)
    if args.overlay and not args.rev:
        raise SystemExit("--overlay needs --rev (without it the working tree is copied whole)")
    if args.list:
        return list_mutants(repo, mutants, args.rev, args.overlay)
    if args.jobs < 1:
        raise SystemExit("--jobs: expected a positive integer")
    python = str(Path(args.python).absolute())
    if not Path(python).exists():
        raise SystemExit(f"--python {python}: not found")
    source = describe_source(repo, args.rev, args.overlay)
    meta = {
        "source": source,
        "python": python,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "warnings": [],
    }
    root = Path(tempfile.mkdtemp(prefix="mutation_campaign-", dir=args.tmpdir))
    check_outside(root, repo)
    copies = [root / f"copy-{i}" for i in range(args.jobs)]
    log(f"copying {source} into {root} ({args.jobs} cop{'y' if args.jobs == 1 else 'ies'})")
    try:
        meta["warnings"] += make_copy(repo, copies[0], args.rev, args.overlay)
        for c in copies[1:]:
            shutil.copytree(copies[0], c, symlinks=True)
        for w in meta["warnings"]:
            log(f"WARNING: {w}")
        return Campaign(args, repo, python, copies, meta).run(mutants)
    except KeyboardInterrupt:
        kill_running()
        log("interrupted")
        return 130
    finally:
        if args.keep:
            log(f"copies kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# The campaign: baseline, then the mutants, in the copies


class Campaign:
    def __init__(self, args, repo: Path, python: str, copies: list[Path], meta: dict):
        self.args, self.repo, self.python, self.copies, self.meta = args, repo, python, copies, meta
        self.t_start = time.monotonic()
        # not resolved: the venv's python is a symlink to the system's
        self.envs = {c: test_env(Path(python).parent.parent, c) for c in copies}
        self.md_path = Path(args.out)
        self.json_path = Path(args.json) if args.json else self.md_path.with_suffix(".json")
        self.pool: queue.Queue = queue.Queue()
        for c in copies:
            self.pool.put(c)
        self.plan: dict[str, tuple[tuple[str, ...], list[str], Resolution]] = {}
        self.baseline: dict = {}
        self.done = 0
        self.done_lock = threading.Lock()

    def warn(self, text: str) -> None:
        self.meta["warnings"].append(text)
        log(f"WARNING: {text}")

    def run(self, mutants: list[Mutant]) -> int:
        for c in self.copies:
            sanity_check(self.python, c, self.envs[c])
        self.make_plan(mutants)
        selections = sorted({(self.plan[m.id][0], m.k) for m in mutants if self.plan[m.id][0]})
        if not self.run_baselines(selections):
            return 2
        return self.run_mutants(mutants)

    def make_plan(self, mutants: list[Mutant]) -> None:
        """Each mutant's selection (missing test files skipped, visibly) and its mutated file, from the first copy
        (every copy is the same)."""
        base = self.copies[0]
        sources = Sources.directory(base)
        for m in mutants:
            present, missing = find_tests(m.tests, base)
            for t in missing:
                self.warn(f"{m.id}: {t}, skipped from its selection")
            self.plan[m.id] = (present, missing, resolve(m, sources))

    def pytest_cmd(self, copy: Path, tests, k) -> list[str]:
        basetemp = f"--basetemp={copy.parent / (copy.name + '-tmp')}"
        return [self.python, "-m", "pytest", *PYTEST_ARGS, basetemp, *selection_args(tests, k)]

    def run_in_copy(self, tests, k, timeout: float) -> tuple[int, str, float, bool]:
        copy = self.pool.get()
        try:
            return run_command(self.pytest_cmd(copy, tests, k), copy, self.envs[copy], timeout)
        finally:
            self.pool.put(copy)

    def run_baseline(self, sel):
        """One selection on the unmutated copy; a red one once more (a test can time out on a shared machine)."""
        timeout = max(self.args.timeout, 600)
        rc, out, secs, timed_out = self.run_in_copy(*sel, timeout)
        result, detail = classify(rc, out, timed_out)
        log(f"  baseline {result:8s} {secs:6.1f} s  {selection_label(*sel)}  [{detail}]")
        if result != "survived":
            first = f"{result} ({detail})"
            rc, out, secs, timed_out = self.run_in_copy(*sel, timeout)
            result, detail = classify(rc, out, timed_out)
            log(
                f"  baseline {result:8s} {secs:6.1f} s  {selection_label(*sel)}  [{detail}] (rerun)"
            )
            if result == "survived":
                self.meta["warnings"].append(
                    f"baseline of `{selection_label(*sel)}` was {first} at first and green when run "
                    f"again: flaky on this machine"
                )
        return sel, result, detail, secs, out

    def run_baselines(self, selections) -> bool:
        """Every selection green on the unmutated copy, or False (a red baseline would make every mutant look
        killed)."""
        log(f"baseline: {len(selections)} selections")
        t_base = time.monotonic()
        for sel, result, detail, secs, out in run_all(
            self.run_baseline, selections, self.args.jobs
        ):
            self.baseline[sel] = (result, detail, secs, out)
        self.meta["baseline_seconds"] = time.monotonic() - t_base
        self.meta["baseline_selections"] = len(selections)
        self.meta["baseline"] = [
            {"tests": list(sel[0]), "k": sel[1], "result": v[0], "detail": v[1], "seconds": v[2]}
            for sel, v in self.baseline.items()
        ]
        red = [(sel, v) for sel, v in self.baseline.items() if v[0] != "survived"]
        for sel, (result, detail, _secs, out) in red:
            log(
                f"\nABORT: the unmutated baseline of `{selection_label(*sel)}` is {result} ({detail}); every "
                f"mutant would look killed. Its output:\n{tail(out, 60)}"
            )
        return not red

    def timeout_for(self, m: Mutant, present: tuple[str, ...]) -> float:
        """Long enough for conftest's MPI timeouts to fire first: a hung rank then fails its test with the ranks'
        stacks in the output (reported as a timeout) instead of being killed without a word."""
        base_secs = self.baseline[(present, m.k)][2]
        mpi_parent = float(self.envs[self.copies[0]].get("HPC_LLM_MPI_PARENT_TIMEOUT", "200"))
        return m.timeout or min(self.args.timeout, max(60.0, 4 * base_secs + 60, mpi_parent + 60))

    def mutate_and_run(self, m: Mutant, record: dict) -> None:
        """Write the mutated file into a copy, run the selection there, restore the file: the result into record."""
        present, _missing, found = self.plan[m.id]
        if found.text is None:
            record.update(result="stale", detail=found.why)
            return
        try:
            compile(found.text, found.file, "exec")
        except SyntaxError as e:
            record.update(result="invalid", detail=f"the mutated file does not compile: {e}")
            return
        if not present:
            record.update(result="no-tests", detail="none of its test files exist")
            return
        timeout = self.timeout_for(m, present)
        copy = self.pool.get()
        try:
            path = copy / found.file
            check_outside(path, self.repo)
            original = path.read_bytes()
            try:
                path.write_text(found.text)
                rc, out, secs, timed_out = run_command(
                    self.pytest_cmd(copy, present, m.k), copy, self.envs[copy], timeout
                )
            finally:
                path.write_bytes(original)
            if path.read_bytes() != original:
                raise SystemExit(f"ABORT: could not restore {path}")
        finally:
            self.pool.put(copy)
        if STOP.is_set():
            record.update(result="interrupted", seconds=round(secs, 2))
            return
        result, detail = classify(rc, out, timed_out)
        record.update(result=result, detail=detail, seconds=round(secs, 2), timeout_s=timeout)
        record.update(returncode=rc, output_tail="" if result == "survived" else tail(out))

    def run_mutant(self, m: Mutant, report: Report, total: int) -> dict:
        present, missing, found = self.plan[m.id]
        record = {
            "id": m.id,
            "function": m.function,
            "file": found.file,
            "description": m.description,
            "tests": list(present),
            "k": m.k,
            "missing_tests": missing,
            "result": "",
            "detail": "",
            "seconds": 0.0,
            "timeout_s": None,
            "returncode": None,
            "output_tail": "",
        }
        if STOP.is_set():
            return record
        self.mutate_and_run(m, record)
        if record["result"] not in ("", "interrupted"):  # not run, or killed by the stop: no result
            with self.done_lock:
                self.done += 1
                n = self.done
            log(
                f"[{n:2d}/{total}] {m.id:36s} {record['result']:8s} {record['seconds']:6.1f} s  "
                f"{record['detail']}"
            )
            report.add(record)
        return record

    def run_mutants(self, mutants: list[Mutant]) -> int:
        report = Report(self.md_path, self.json_path, self.meta)
        report.order = [m.id for m in mutants]
        log(f"mutants: {len(mutants)}")
        try:
            run_all(lambda m: self.run_mutant(m, report, len(mutants)), mutants, self.args.jobs)
        except KeyboardInterrupt:
            self.meta["total_seconds"] = time.monotonic() - self.t_start
            self.meta["warnings"].append("interrupted: the results are partial")
            report.write()
            log(f"interrupted; partial results in {self.md_path}, {self.json_path}")
            return 130
        self.meta["total_seconds"] = time.monotonic() - self.t_start
        report.write()
        results = report.ordered()
        sys.stdout.write(render_markdown(results, self.meta))
        print(f"\n{summary_line(results)}")
        log(f"results: {self.md_path}, {self.json_path} ({self.meta['total_seconds']:.0f} s)")
        bad = [r for r in results if r["result"] in ("stale", "invalid", "error")]
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
