"""How a job fails: the phase each rank is in, the watchdog that ends a job stuck in communication, and the
fault-injection switch the tests use to make every failure deterministic (docs/reliability.md).

- `phase(name, step)` records what this rank is doing; a failure message names it ("rank 1 failed in save at step 4").
- `WATCHDOG`: every MPI wait in comm.py is bracketed by `enter(op)` / `leave()`; a background thread aborts the job
  (MPI_Abort on the world) when one wait lasts longer than its timeout, after printing which operation, in which
  group, at which step. A peer that died, hangs, or livelocks then costs minutes, not the allocation. The CLI arms it
  before any verb runs (`--comm-timeout-s`, default DEFAULT_COMM_TIMEOUT_S); `train` re-arms it with
  `parallel.comm_timeout_s` once the config is read.
- `HPC_LLM_FAULT` (tests only): comma-separated `KIND:POINT:RANK[:STEP]`, e.g. `raise:step:1:3` (rank 1 raises at the
  start of step 3), `enospc:save:0:4`, `hang:step:1:3`, `kill:eval:0`, `nan:grad:1:2`, `usr1:startup:1`. KIND is raise,
  enospc, eio, hang, kill, stop (SIGSTOP to itself: every thread stops), nan, usr1 (the rank sends itself SIGUSR1, a
  stop request), usr1late (another process sends
  this rank SIGUSR1 one second later, wherever it then is: from `exit`, inside MPI_Finalize) or delay (the rank sleeps
  3 s: a slow peer); POINT is startup (train, before MPI), config (train, reading the config after MPI started,
  inside its agreement), data, resume, step, grad, eval (train's evals, and the `eval` verb before its batches), save,
  exit (`train` after its run, just before the process exits), generate (the `generate` verb before decoding),
  encode (the `prepare` verb, inside its encode agreement) or prepare (`prepare`, once the part files and the
  temporary outputs exist); STEP omitted: the first time. Code calls `inject(POINT, step)` where such a fault can
  happen; nothing happens unless the variable names this rank. Several faults may name one point: usr1, usr1late and
  delay let the next one fire too.
"""

from __future__ import annotations

import errno
import faulthandler
import os
import signal
import subprocess
import sys
import threading
import time
import traceback

from hpc_llm.runtime.records import RankRecord

# -- which rank, doing what ------------------------------------------------------------------------------------------


def launcher_rank() -> int:
    """This process's world rank, from the launcher's environment (readable before MPI is initialised)."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def launcher_size() -> int:
    """How many ranks the launcher started (1 when none did), readable before MPI is initialised."""
    # SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: the batch shell of a many-task job has the latter, and a process it
    # runs alone is no rank of a launched job
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


class _Phase:
    name = "start-up"
    step: int | None = None

    def describe(self) -> str:
        if self.step is None:
            return self.name
        return f"step {self.step}" if self.name == "step" else f"{self.name} at step {self.step}"


PHASE = _Phase()


class phase:
    """`with phase("save", step):` this rank is saving; the previous phase comes back afterwards."""

    def __init__(self, name: str, step: int | None = None):
        self.name, self.step = name, step

    def __enter__(self):
        self.saved = PHASE.name, PHASE.step
        PHASE.name, PHASE.step = self.name, self.step
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:  # an exception keeps the phase it happened in, for the failure message
            PHASE.name, PHASE.step = self.saved


# what the disk says (full, over quota, read-only, refused): the user's to fix, so the failure line says it all and a
# traceback would only hide it
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def traceback_of(exc: BaseException) -> str:
    """What a failing rank prints before its failure line: the traceback, but none for a disk's own error."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return ""
    return "".join(traceback.format_exception(exc))


def failure_line(exc: BaseException, rank: int | None = None) -> str:
    """The one line that says which rank failed, where, and with what."""
    rank = launcher_rank() if rank is None else rank
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"rank {rank} failed in {PHASE.describe()}: {type(exc).__name__}" + (
        f": {text}" if text else ""
    )


# -- the watchdog ----------------------------------------------------------------------------------------------------

# the watchdog's timeout when nothing else is said: `--comm-timeout-s`'s default and `parallel.comm_timeout_s`'s
DEFAULT_COMM_TIMEOUT_S = 600.0


class Watchdog:
    """Aborts the job when this rank waits in one MPI operation for longer than `timeout_s` (0: off)."""

    def __init__(self):
        self.timeout_s = 0.0
        self.source = "parallel.comm_timeout_s"  # what set the timeout, for the abort message
        self._op: str | None = None
        self._since = 0.0
        self._thread: threading.Thread | None = None
        # what this rank is doing, written as a heartbeat where a run directory is known (runtime/records.py)
        self.record = RankRecord()

    def configure(self, timeout_s: float, source: str = "parallel.comm_timeout_s") -> None:
        """Arm (or re-arm) with `timeout_s` seconds per wait, 0: off; `source` names the setting in the message."""
        self.timeout_s, self.source = float(timeout_s), source
        if self.timeout_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hpc-llm-watchdog", daemon=True)
            self._thread.start()

    def enter(self, op: str) -> None:
        # before _op: the thread never sees an op with an old start time
        self._since = time.monotonic()
        self._op = op
        self.record.entered(op)

    def leave(self) -> None:
        self._op = None
        self.record.left()

    def interval(self) -> float:
        return min(1.0, self.timeout_s / 4) if self.timeout_s > 0 else 1.0

    def _run(self) -> None:
        while True:
            time.sleep(self.interval())
            self.record.write(PHASE.describe())
            op, since = self._op, self._since
            if op is None or self.timeout_s <= 0:
                continue
            waited = time.monotonic() - since
            if waited > self.timeout_s and self._op is op:
                behind = self.record.behind(self.interval())
                sys.stderr.write(
                    f"hpc-llm: rank {launcher_rank()}: no progress for {waited:.0f} s in {op} "
                    f"({PHASE.describe()}; {self.source}={self.timeout_s:g}): a peer has "
                    "stopped, died or is stuck; aborting the job\n"
                    + (f"hpc-llm: rank {launcher_rank()}: {behind}\n" if behind else "")
                )
                sys.stderr.flush()
                abort_job(1)


WATCHDOG = Watchdog()


def init_mpi() -> None:
    """MPI_Init (mpi4py's import) watched: a peer that never reaches it (stuck or stopped before MPI) leaves this
    rank in the launcher's start-up exchange, holding the GIL, where the watchdog's thread cannot run. Python's
    faulthandler can (a C thread): past the watchdog's timeout it prints "Timeout (0:00:S)!" and this rank's stack
    (ending in init_mpi) and exits 1; the launcher then ends the others."""
    if "mpi4py.MPI" in sys.modules:
        return
    if WATCHDOG.timeout_s > 0 and launcher_size() > 1:
        faulthandler.dump_traceback_later(WATCHDOG.timeout_s, exit=True, file=sys.stderr)
    try:
        import mpi4py.MPI  # noqa: F401
    finally:
        faulthandler.cancel_dump_traceback_later()


# how long a rank that failed before MPI started waits in MPI_Init for its peers before it exits alone
JOIN_TO_ABORT_S = 30.0


def abort_job(code: int) -> None:
    """End every rank now: MPI_Abort on the world when MPI is running, else this process (os._exit: no cleanup that
    could itself wait for a peer).

    A rank that fails before MPI started, under a launcher of several ranks, first joins MPI to abort through it: a
    rank exiting before MPI_Init leaves its peers to the launcher, and Open MPI 5's launcher was seen to hang on one
    of them stuck in MPI_Init (PMIX_ERR_UNREACH). If the peers never reach MPI_Init it exits alone after
    JOIN_TO_ABORT_S."""
    if "mpi4py.MPI" not in sys.modules and launcher_size() > 1:
        threading.Timer(JOIN_TO_ABORT_S, os._exit, (code,)).start()
        import mpi4py.MPI  # noqa: F401  (MPI_Init: waits for the peers, then the Abort below reaches them)
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(code)
    os._exit(code)


# -- fault injection (tests) -----------------------------------------------------------------------------------------

KINDS = ("raise", "enospc", "eio", "hang", "kill", "stop", "nan", "usr1", "usr1late", "delay")
POINTS = (
    "startup",
    "config",
    "data",
    "resume",
    "step",
    "grad",
    "eval",
    "save",
    "exit",
    "generate",
    "encode",
    "prepare",
)
DELAY_S = 3.0  # `delay`
LATE_S = 1.0  # `usr1late`


class InjectedFault(RuntimeError):
    """What `raise` injects: an unexpected error, as a bug would raise."""


def _faults() -> list[tuple[str, str, int, int | None]]:
    spec = os.environ.get("HPC_LLM_FAULT", "").strip()
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4) or parts[0] not in KINDS or parts[1] not in POINTS:
            raise ValueError(
                f"HPC_LLM_FAULT item {item!r}: expected KIND:POINT:RANK[:STEP] with KIND in {KINDS} and "
                f"POINT in {POINTS}"
            )
        out.append((parts[0], parts[1], int(parts[2]), int(parts[3]) if len(parts) == 4 else None))
    return out


_fired: set = set()


def inject(point: str, step: int | None = None) -> bool:
    """Trigger the fault HPC_LLM_FAULT names for this point, rank and step (each once). Returns True for `nan` (the
    caller poisons its value); raises, hangs or kills for the others; False when nothing is injected here."""
    if "HPC_LLM_FAULT" not in os.environ:
        return False
    rank = launcher_rank()
    for fault in _faults():
        kind, where, r, at = fault
        if where != point or r != rank or (at is not None and at != step) or fault in _fired:
            continue
        _fired.add(fault)
        sys.stderr.write(
            f"hpc-llm: rank {rank}: injecting {kind} at {point}"
            + ("" if step is None else f" (step {step})")
            + "\n"
        )
        sys.stderr.flush()
        if kind == "raise":
            raise InjectedFault(f"injected at {point}")
        if kind == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        if kind == "eio":
            raise OSError(errno.EIO, "Input/output error (injected)")
        if kind == "hang":
            while True:  # stuck outside MPI: its peers' watchdogs must end the job
                time.sleep(1)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if (
            kind == "stop"
        ):  # the whole process stopped (SIGSTOP), as a frozen node's: its threads too
            os.kill(os.getpid(), signal.SIGSTOP)
        if kind == "usr1":
            os.kill(os.getpid(), signal.SIGUSR1)
            continue
        if (
            kind == "usr1late"
        ):  # a process of its own: no thread of this one runs once Python is finalizing
            subprocess.Popen(
                ["/bin/sh", "-c", f"sleep {LATE_S}; kill -USR1 {os.getpid()} 2>/dev/null"]
            )
            continue
        if kind == "delay":
            time.sleep(DELAY_S)
            continue
        return True
    return False
