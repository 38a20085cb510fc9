"""What the machine did during an epoch, logged as `system/...` beside the model's metrics: the
process's peak memory and the share of the training epoch spent waiting for the next batch
(docs/system-metrics.md says how to read them). They measure the machine, not the model, so
comparisons of runs leave them out (phases.WALL_CLOCK_METRICS)."""

import resource
import sys
import time
from collections.abc import Iterable, Iterator

import torch


class WaitClock:
    """Iterates `batches`, adding up the time spent inside the data loader's `__next__`."""

    def __init__(self, batches: Iterable):
        self.batches: Iterator = iter(batches)
        self.waited = 0.0  # seconds

    def __iter__(self) -> "WaitClock":
        return self

    def __next__(self):
        started = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.waited += time.perf_counter() - started


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (ru_maxrss: kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def system_metrics(waited_seconds: float, epoch_seconds: float, device: torch.device) -> dict[str, float]:
    """The `system/...` values of an epoch whose training took `epoch_seconds`, `waited_seconds`
    of them waiting for batches."""
    values = {
        "system/peak_rss_mb": peak_rss_mb(),
        "system/data_wait_fraction": min(1.0, waited_seconds / max(epoch_seconds, 1e-9)),
    }
    if device.type == "cuda":
        values["system/peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / (1024 * 1024)
    return values
