"""Errors that end a run with a message instead of a traceback.

Raise these for mistakes the user can fix (a bad config, a bad flag, a dirty
repository). `run.py` prints the message and exits with `exit_code`; anything
else is a bug or a training failure and keeps its traceback (exit code 1).
"""

import difflib
import errno
import os
import sys
import threading


class UserError(Exception):
    """Bad command line, config or checkpoint: exit code 2, nothing written."""

    exit_code = 2


class Refusal(UserError):
    """The template refuses to run as asked (dirty tree, wrong commit): exit code 3."""

    exit_code = 3


STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def storage_error(error: BaseException | None) -> OSError | None:
    """The disk's error behind `error` (full, over quota, read-only, failing), wherever it was
    raised or wrapped (torch.save wraps a failed write in a RuntimeError); else None."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in STORAGE_ERRORS:
            return error
        error = error.__cause__ or error.__context__
    return None


def quiet_storage_errors_in_threads() -> None:
    """A writer thread (TensorBoard's, say) that hits a full disk must not print its own traceback:
    the training thread meets the same error and reports it once."""
    default = threading.excepthook

    def hook(arguments) -> None:
        if storage_error(arguments.exc_value) is None:
            default(arguments)

    threading.excepthook = hook


def warn(message: str) -> None:
    """A warning for the user, on stderr (the run goes on)."""
    print(message, file=sys.stderr, flush=True)


def report(error: UserError) -> int:
    """Print a user's mistake as one line (rank 0 alone under torchrun); return its exit code."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {error}", file=sys.stderr)
    return error.exit_code


def nearest(word: str, candidates) -> str:
    """' Did you mean ...?' for the closest candidate, or '' when nothing is close."""
    matches = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean {matches[0]!r}?" if matches else ""
