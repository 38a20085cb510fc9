"""The live mirror: a run copied to its archive while it trains, on a thread of its own."""

import math
import sys
import threading
import time
from pathlib import Path

from src.core.archive.store import refused, require_backend
from src.core.archive.upload import RunUploader
from src.core.errors import UserError

RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)  # seconds between attempts while the store fails


class Mirror:
    """Mirrors a training run to its archive on a background thread, never blocking training.

    `checkpoint_durable`, `checkpoints_pruned` and `sync_run_files` only note what changed
    and wake the worker, which makes one `RunUploader.sync` pass for everything pending.
    Passes start at most once per `interval` seconds (`archive.sync_interval_seconds`):
    what changes meanwhile goes up together, so a run with many short epochs does not send
    (and then prune) every checkpoint, nor its growing metrics.jsonl and TensorBoard files
    again after every epoch. close() does not wait for the interval. When the store fails, the worker
    warns once, records `status: behind` (`failed` when the store refuses: permissions,
    credentials) and retries after RETRY_DELAYS; training never waits for it.
    """

    def __init__(
        self, run_directory: Path, uri: str, retry_delays: tuple[float, ...] = RETRY_DELAYS, interval: float = 0.0
    ):
        self.run_directory = Path(run_directory)
        require_backend(uri)  # UserError now, not on the worker thread (which imports it: ~0.3 s of CPU)
        self.uploader = RunUploader(self.run_directory, uri)
        self.location = self.uploader.location
        self.retry_delays = retry_delays
        self.interval = min(interval, threading.TIMEOUT_MAX / 2)
        self._lock = threading.Lock()
        self._wake = threading.Event()  # work is pending
        self._idle = threading.Event()  # a pass finished with nothing pending
        self._closing = threading.Event()  # close() was called: retry at once, not after the backoff
        self._pruned: set[str] = set()
        self._abandoned = False
        self._warned = False
        self._status = "synced"
        self.passes = 0  # upload passes finished (the interval's test counts them)
        self._thread = threading.Thread(target=self._work, name="archive-mirror", daemon=True)
        self._thread.start()
        self.sync_run_files()

    def checkpoint_durable(self, path: Path) -> None:
        """A checkpoint and its manifest are on disk: upload it, then its manifest."""
        self._request()

    def checkpoints_pruned(self, names) -> None:
        """These step files were pruned locally: the archive drops them too."""
        with self._lock:
            self._pruned.update(names)
        self._request()

    def sync_run_files(self) -> None:
        """Upload config.yaml, metrics.jsonl, metadata.yaml, TensorBoard files, figures/ when changed."""
        self._request()

    def wait_until_idle(self, timeout: float) -> bool:
        """Until everything requested so far is in the archive (the crash tests' settle point)."""
        return self._idle.wait(timeout)

    def close(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a final sync; False (with a message) if it did not finish."""
        self._request()
        self._closing.set()
        deadline = time.monotonic() + timeout
        finished = False
        while not finished and self._thread.is_alive() and (left := deadline - time.monotonic()) > 0:
            finished = self._idle.wait(min(left, 1.0))  # a worker that has stopped cannot finish
        with self._lock:
            self._abandoned = True  # the worker stops at its next turn (a transfer in flight may finish)
        self._wake.set()
        if finished:
            return True
        why = f"did not finish within {timeout:g} s" if self._thread.is_alive() else "did not run (see above)"
        print(
            f"warning: archive: the final sync to {self.location} {why}; the archive is behind. "
            f"Complete it later with: python run.py --archive {self.run_directory}",
            file=sys.stderr,
        )
        self.uploader.record_status("failed" if self._status == "failed" else "behind")
        return False

    def _request(self) -> None:
        with self._lock:
            self._idle.clear()
            self._wake.set()

    def _work(self) -> None:
        failures, last_pass = 0, -math.inf
        while True:
            self._wake.wait()
            self._closing.wait(last_pass + self.interval - time.monotonic())  # close() cuts the wait short
            self._wake.clear()
            with self._lock:
                if self._abandoned:
                    return
                pruned, self._pruned = self._pruned, set()
            last_pass = time.monotonic()
            try:
                self.uploader.sync(pruned)
            except UserError as error:  # the back end cannot be imported: retrying cannot help
                self._failed(error, permanent=True)
                return
            except Exception as error:
                with self._lock:
                    self._pruned |= pruned
                    if self._abandoned:
                        return
                failures += 1
                self._failed(error)
                if self._closing.is_set() and refused(error):  # the run has ended and the store refuses it:
                    return  # waiting out final_sync_timeout_seconds cannot change that
                delay = self.retry_delays[min(failures, len(self.retry_delays)) - 1]
                self._closing.wait(delay)  # after close(), retry every second until it gives up
                if self._closing.is_set():
                    time.sleep(min(delay, 1.0))
                self._wake.set()
                continue
            if failures:
                print(f"archive: {self.location} reachable again; the archive caught up", file=sys.stderr)
            failures = 0
            self.passes += 1
            self._status = "synced"
            with self._lock:
                if not self._wake.is_set():
                    self._idle.set()

    def _failed(self, error: Exception, permanent: bool = False) -> None:
        self._status = "failed" if permanent or refused(error) else "behind"
        if not self._warned:
            self._warned = True
            then = "training goes on without it" if permanent else "training goes on, and the mirror retries"
            print(
                f"warning: archive: cannot write to {self.location} ({type(error).__name__}: {error}); "
                f"{then} (metadata.yaml archive.status: {self._status})",
                file=sys.stderr,
            )
        self.uploader.record_status(self._status)
