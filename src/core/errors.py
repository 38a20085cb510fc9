"""Errors that end a run with a message instead of a traceback.

Raise these for mistakes the user can fix (a bad config, a bad flag, a dirty
repository). `run.py` prints the message and exits with `exit_code`; anything
else is a bug or a training failure and keeps its traceback (exit code 1).
"""


class UserError(Exception):
    """Bad command line, config or checkpoint: exit code 2, nothing written."""

    exit_code = 2


class Refusal(UserError):
    """The template refuses to run as asked (dirty tree, wrong commit): exit code 3."""

    exit_code = 3
