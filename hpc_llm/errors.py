"""The one exception type for user errors (bad config, bad file, bad layout).

The CLI prints it as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: the message names the field or file and what was expected."""
