"""Test-only fault injection: stop or fail the process at an exact point.

The crash tests set `TEMPLATE_FAULT=<point>:<n>[:<action>][@<rank>]` to reach the n-th
occurrence of a named point (`run_directory` once it is made, `train_step`, `val` and
`rollout` batches, `checkpoint_write`) and then `kill` (SIGKILL, the default: nothing is cleaned up, as
with a node failure), `enospc` (raise a disk-full error) or `exit` (end the process at
once with status 0: the start-up benchmark's stopwatch). `@<rank>` limits it to one
rank of a distributed run. It acts in torchrun's first attempt only, so a restarted
group runs clean. run.py arms it at start; unarmed, every call is a no-op costing one comparison.
"""

import errno
import os
import signal

_point, _count, _action = "", 1, ""
_seen: dict[str, int] = {}


def arm(spec: str | None = None) -> None:
    """Read the fault to inject from `spec` (default: $TEMPLATE_FAULT); an empty one disarms."""
    global _point, _count, _action
    spec, _, rank = (os.environ.get("TEMPLATE_FAULT", "") if spec is None else spec).partition("@")
    point, _, rest = spec.partition(":")
    count, _, action = rest.partition(":")
    if (rank and os.environ.get("RANK", "0") != rank) or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        point = ""
    _point, _count, _action = point, int(count or 1), action
    _seen.clear()


def maybe_fail(point: str, settle=None) -> None:
    """Count an occurrence of `point`; act when it is the one TEMPLATE_FAULT names.
    `settle` (waiting for checkpoint writes in flight, and for the archive's upload of them)
    runs first, so that a test knows which checkpoint is the newest at the kill
    (`checkpoint_write` kills inside a write)."""
    if point != _point:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] != _count:
        return
    if settle is not None:
        settle()
    if _action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if _action == "exit":
        os._exit(0)
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_fail_within_write(size_before: int, size_after: int, settle) -> None:
    """`checkpoint_write`: counted once per checkpoint, when its first 4 KiB are written, so that
    a kill leaves part of the file on disk."""
    if size_before < 4096 <= size_after:
        maybe_fail("checkpoint_write", settle=settle)
