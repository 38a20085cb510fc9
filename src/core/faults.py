"""Test-only fault injection: stop or fail the process at an exact point.

The crash tests set `TEMPLATE_FAULT=<point>:<n>[:<action>]` to reach the n-th
occurrence of a named point (`train_step`, `val` and `rollout` batches,
`checkpoint_write`) and then `kill` (SIGKILL, the default: nothing is cleaned
up, as with a node failure) or `enospc` (raise a disk-full error). Without the
variable every call is a no-op costing one comparison.
"""

import errno
import os
import signal

_SPEC = os.environ.get("TEMPLATE_FAULT", "")
_POINT, _, _REST = _SPEC.partition(":")
_COUNT, _, _ACTION = _REST.partition(":")
_seen: dict[str, int] = {}


def maybe_fail(point: str) -> None:
    """Count an occurrence of `point`; act when it is the one TEMPLATE_FAULT names."""
    if point != _POINT:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] != int(_COUNT or 1):
        return
    if _ACTION == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), signal.SIGKILL)
