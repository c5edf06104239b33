"""hpc-llm: prepare, train, generate, eval, inspect, import-gpt2, merge-lora, plan, bench (comm, calibrate).

Also `python -m hpc_llm`. The package: ``parser`` (the argparse tables, one function per verb), ``commands`` (what
each verb does), and ``main`` here (parse, run, turn an exception into its exit status and one line).

Exit status: 0 done; 2 a user error (UserError: one line, `hpc-llm: error: ...`, on every rank); 75 `train` stopped
by SIGUSR1 or SIGTERM after writing a checkpoint (resume with `--resume auto`); 1 a fault: one line naming the rank,
its phase and the error (`hpc-llm: rank R failed in PHASE: ...`), after the traceback of the rank it happened on; a
fault only one rank knows of ends the whole job through MPI_Abort (docs/reliability.md).
"""

from __future__ import annotations

import logging
import sys
import traceback

from hpc_llm.cli.parser import build_parser
from hpc_llm.errors import JobError, UserError
from hpc_llm.runtime.faults import abort_job, failure_line, launcher_rank, launcher_size

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        sys.stderr.write(traceback.format_exc() + f"hpc-llm: {failure_line(e)}\n")
        sys.stderr.flush()
        if "mpi4py.MPI" in sys.modules or launcher_size() > 1:
            abort_job(1)
        return 1
