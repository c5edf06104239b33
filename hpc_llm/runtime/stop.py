"""Stop signals: SIGUSR1/SIGTERM mean "checkpoint and exit 75" (Slurm's --signal=B:USR1@T forwarded by the batch
script, scancel, a time limit, preemption). A light module: the CLI installs the handlers before it reads the config,
so a signal during start-up is remembered, and acted on at the first step boundary.

Once a stop has begun, further stop signals change nothing: the handler only records, and when the ``with`` block
ends after a stop (or in the CLI, always: ``hold=True``) the stop signals are left ignored (SIG_IGN) until the process
exits, never restored to the default action. Slurm's batch scripts forward both the warning (``--signal=B:USR1@T``)
and the later SIGTERM as SIGUSR1, so a second signal commonly lands after the checkpoint, while a rank prints its
summary or waits in MPI_Finalize for its peers; with the default action restored it would kill that rank (status 138)
and the job would not be requeued. SIG_IGN, unlike a Python handler, also survives the interpreter's finalization,
which resets Python-level handlers to SIG_DFL before mpi4py's MPI_Finalize (a ``Py_AtExit`` function) runs."""

from __future__ import annotations

import signal
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGUSR1/SIGTERM after writing a verified checkpoint; resume to go on
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def ignore_stop_signals() -> None:
    """From now on SIGUSR1/SIGTERM do nothing to this process, up to and including MPI_Finalize at exit."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


class StopRequest:
    """Remembers a stop signal while training runs. The handler only sets a flag (the first signal wins; later ones
    change nothing); the ranks act on it together at a step boundary (``Trainer.should_stop``), since a signal may
    reach them at different moments.

    hold: at the end of the block, leave the stop signals ignored instead of restoring the previous handlers (the CLI:
    the process ends right after the run, and a signal then must not kill a rank whose run is complete). Without it,
    the previous handlers come back only when no stop was received."""

    def __init__(self, hold: bool = False):
        self.signum = 0
        self.hold = hold
        self._previous = {}

    def __enter__(self):
        # Python delivers signals to the main thread only
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame):
        if not self.signum:
            self.signum = signum

    def __exit__(self, *exc):
        if self._previous and (self.hold or self.signum):
            ignore_stop_signals()
        else:
            for s, handler in self._previous.items():
                signal.signal(s, handler)
        self._previous.clear()
