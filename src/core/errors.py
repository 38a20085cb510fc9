"""Errors that end a run with a message instead of a traceback.

Raise these for mistakes the user can fix (a bad config, a bad flag, a dirty
repository). `run.py` prints the message and exits with `exit_code`; anything
else is a bug or a training failure and keeps its traceback (exit code 1).
"""

import os
import sys


class UserError(Exception):
    """Bad command line, config or checkpoint: exit code 2, nothing written."""

    exit_code = 2


class Refusal(UserError):
    """The template refuses to run as asked (dirty tree, wrong commit): exit code 3."""

    exit_code = 3


def warn(message: str) -> None:
    """A warning for the user, on stderr (the run goes on)."""
    print(message, file=sys.stderr)


def report(error: UserError) -> int:
    """Print a user's mistake as one line (rank 0 alone under torchrun); return its exit code."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {error}", file=sys.stderr)
    return error.exit_code
