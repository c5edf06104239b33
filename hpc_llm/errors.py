"""The one exception type for user errors (bad config, bad file, bad layout).

The CLI prints it as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: the message names the field or file and what was expected."""


class JobError(Exception):
    """A fault that every rank knows of (agreed: a failed save, a run that diverged, an error on one rank inside an
    agreed step): the CLI prints its one line and exits 1 on every rank together, with no MPI_Abort needed."""
