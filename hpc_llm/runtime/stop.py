"""Stop signals: SIGUSR1/SIGTERM mean "checkpoint and exit 75" (Slurm's --signal=B:USR1@T forwarded by the batch
script, scancel, a time limit, preemption). A light module: the CLI installs the handlers before it imports NumPy or
reads the config, so a signal at any instant of start-up is remembered, and acted on at the first step boundary."""

from __future__ import annotations

import signal
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGUSR1/SIGTERM after writing a verified checkpoint; resume to go on
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Remembers a stop signal while training runs. The handler only sets a flag; the ranks act on it together at a
    step boundary (``Trainer.should_stop``), since a signal may reach them at different moments."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        # Python delivers signals to the main thread only
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
