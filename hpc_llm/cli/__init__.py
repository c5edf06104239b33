"""hpc-llm: prepare, train, generate, eval, inspect, import-gpt2, export-hf, merge-lora, plan, bench (comm, calibrate).

Also `python -m hpc_llm`. The package: ``parser`` (the argparse tables, one function per verb), ``commands`` (what
each verb does; `plan`'s in ``plan_command``), and ``main`` here (parse, run, turn an exception into its exit status
and one line).

Exit status: 0 done; 2 a user error (UserError: one line, `hpc-llm: error: ...`, on every rank); 75 `train` stopped
by SIGUSR1 or SIGTERM after writing a checkpoint (resume with `--resume auto`); 1 a fault: one line naming the rank,
its phase and the error (`hpc-llm: rank R failed in PHASE: ...`), after the traceback of the rank it happened on; a
fault only one rank knows of ends the whole job through MPI_Abort (docs/reliability.md).

The watchdog (runtime/faults.py) is armed here, once the arguments are parsed and before any verb runs, for every
verb: a rank that waits in one MPI operation longer than `--comm-timeout-s` (default 600 s, as
`parallel.comm_timeout_s`) aborts the job naming the operation, so no verb's start-up, agreement or collective can
hang a job for good. Here rather than in each verb: a verb added later is watched without doing anything; the
verbs that talk to other ranks offer the flag (parser._add_comm_timeout), the others keep the default, which never
fires in a process that makes no MPI wait.
"""

from __future__ import annotations

import logging
import sys

from hpc_llm.cli.parser import build_parser
from hpc_llm.errors import JobError, UserError
from hpc_llm.runtime.faults import (
    DEFAULT_COMM_TIMEOUT_S,
    WATCHDOG,
    abort_job,
    failure_line,
    launcher_rank,
    launcher_size,
    traceback_of,
)

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # before the verb's first line: its first MPI wait (train's config agreement included) is watched; train re-arms
    # it with parallel.comm_timeout_s once the config is read
    flag = hasattr(args, "comm_timeout_s")
    WATCHDOG.configure(
        args.comm_timeout_s if flag else DEFAULT_COMM_TIMEOUT_S,
        source="--comm-timeout-s" if flag else "the default comm timeout",
    )
    logging.basicConfig(
        level=logging.INFO if launcher_rank() == 0 else logging.WARNING,
        format="%(message)s",
        stream=sys.stdout,
    )
    try:
        return args.func(args) or 0
    except UserError as e:
        # one write: MPI launchers interleave ranks' partial lines
        sys.stderr.write(f"hpc-llm: error: {e}\n")
        sys.stderr.flush()
        return 2
    except JobError as e:  # every rank knows (agreed): each exits 1 by itself, rank 0 says why
        if launcher_rank() == 0:
            sys.stderr.write(f"hpc-llm: {e}\n")
            sys.stderr.flush()
        return 1
    except Exception as e:
        # a bug or a fault on this rank only: its peers may be waiting for it in a collective or a receive, and
        # MPI_Finalize at exit would wait for them in turn; abort the job instead of leaving it hung
        sys.stderr.write(traceback_of(e) + f"hpc-llm: {failure_line(e)}\n")
        sys.stderr.flush()
        if "mpi4py.MPI" in sys.modules or launcher_size() > 1:
            abort_job(1)
        return 1
