"""Figures are written on a thread of their own, and matplotlib's are encoded as PNG in a
helper process, so that the training thread only draws them (the model's `figures` hook)
and goes on.

Why a process: savefig is Python code holding the interpreter's lock for about 40 ms a
figure, and PyTorch hands that lock over at every operation; encoding on a thread beside
training therefore stalls training for longer than encoding on the training thread itself
(measured in benchmarks/README.md, "Fixed costs"). The helper is forked from this process at
the first figure (matplotlib is imported already, nothing is started again) and receives
each figure pickled (2 ms against savefig's 40). Anything it cannot do (no fork on this
system, a figure that does not pickle, an error while drawing, the helper gone) is done on
the writer's thread instead, where an error is raised as before.
"""

import contextlib
import gc
import io
import os
import pickle
import queue
import select
import signal
import struct
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future

RESPONSE = struct.Struct("<BQ")  # status (0: the PNG follows, 1: savefig failed there), length


def figure_to_png(figure) -> bytes:
    """A matplotlib figure as PNG bytes, as every figure of a run is encoded."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


class FigureEncoder:
    """PNG encoding of matplotlib figures in a forked helper process (see the module's docstring).
    Used from one thread, the figure writer's."""

    def __init__(self):
        self.pid: int | None = None
        self.requests = self.responses = None
        self.broken = not hasattr(os, "fork")
        self.settings: dict | None = None  # matplotlib's rcParams as the helper has them

    def encode(self, figure) -> bytes:
        if not self.broken:
            import matplotlib

            settings = dict(matplotlib.rcParams)  # the model may change them between figures
            try:
                sent = None if settings == self.settings else settings
                payload = pickle.dumps((sent, figure), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # a figure holding something that does not pickle: encoded here
                payload = None
            if payload is not None:
                png = self._encode_in_helper(payload)
                self.settings = settings  # the helper has them now (or is gone)
                if png is not None:
                    return png
        return figure_to_png(figure)  # raises here what savefig raised in the helper

    def close(self) -> None:
        """End the helper and wait for it: told to (its requests' end of file is not enough, as
        processes forked later, the data loader's workers, hold that end too), or killed if broken."""
        if self.pid is not None:
            with contextlib.suppress(OSError):
                if self.broken:
                    os.kill(self.pid, signal.SIGKILL)
                else:
                    self.requests.write(struct.pack("<Q", 0))  # an empty request: the end
                    self.requests.flush()
            for stream in (self.requests, self.responses):
                with contextlib.suppress(OSError):  # a broken pipe: the helper is gone already
                    stream.close()
            os.waitpid(self.pid, 0)
            self.pid = None

    def _encode_in_helper(self, payload: bytes) -> bytes | None:
        """The PNG, or None when the helper could not make it (the figure is then encoded here)."""
        try:
            if self.pid is None:
                self._start()
            self.requests.write(struct.pack("<Q", len(payload)) + payload)
            self.requests.flush()
            status, size = RESPONSE.unpack(self._read(RESPONSE.size))
            png = self._read(size)
        except (OSError, EOFError, struct.error):  # the helper is gone: every later figure is encoded here
            self.broken = True
            self.close()
            return None
        return png if status == 0 else None

    def _read(self, size: int) -> bytes:
        data = self.responses.read(size)
        if len(data) != size:
            raise EOFError("the figure encoder ended")
        return data

    def _start(self) -> None:
        requests_read, requests_write = os.pipe()
        responses_read, responses_write = os.pipe()
        gc.freeze()  # the helper's garbage collections then leave the run's objects, and their pages, shared
        try:
            with warnings.catch_warnings():  # Python 3.12+ warns of forking beside threads; the helper needs none
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # the helper: never returns
                os.close(requests_write)
                os.close(responses_read)
                _serve(requests_read, responses_write)
        finally:
            gc.unfreeze()  # in the run (the helper ends in _serve)
        os.close(requests_read)
        os.close(responses_write)
        self.pid = pid
        self.requests = open(requests_write, "wb")  # noqa: SIM115 (closed by close())
        self.responses = open(responses_read, "rb")  # noqa: SIM115


def _serve(requests_fd: int, responses_fd: int) -> None:
    """The helper's loop: a pickled (rcParams or None, figure) in, (status, PNG) out, until an
    empty request, or until the run is gone. It holds none of the run's other files (sockets,
    pipes, logs), ends with os._exit, running none of the run's exit handlers, and leaves
    signals (Ctrl-C, Slurm's) to the run."""
    status = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _close_inherited_files(keep={requests_fd, responses_fd})
        _fresh_error_stream()
        import matplotlib

        run = os.getppid()
        with open(responses_fd, "wb") as responses:
            while size := _read_request_size(requests_fd, run):
                settings, figure = pickle.loads(_read_exactly(requests_fd, size))
                if settings is not None:
                    dict.update(matplotlib.rcParams, settings)  # validated already, in the run
                try:
                    png, code = figure_to_png(figure), 0
                except Exception:  # encoded again in the run, which raises it with its traceback
                    png, code = b"", 1
                responses.write(RESPONSE.pack(code, len(png)) + png)
                responses.flush()
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def _read_request_size(fd: int, run: int) -> int:
    """The next request's length (0: the end), watching that the run is still there (a run
    killed with SIGKILL sends nothing, and its data loader's workers may keep the pipe open)."""
    while not select.select([fd], [], [], 1.0)[0]:
        if os.getppid() != run:
            return 0
    header = _read_exactly(fd, 8, end_ok=True)
    return struct.unpack("<Q", header)[0] if header else 0


def _read_exactly(fd: int, size: int, end_ok: bool = False) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            if end_ok and left == size:
                return b""
            raise EOFError("the run's end of the figure pipe closed mid-request")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _close_inherited_files(keep: set[int]) -> None:
    """Close the descriptors the fork copied (but stdin, stdout, stderr and `keep`), so that the
    helper keeps no socket, pipe or file of the run open after the run has closed it."""
    try:
        descriptors = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # not Linux
        descriptors = range(3, 256)
    for fd in descriptors:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _fresh_error_stream() -> None:
    """The helper's warnings and logging to a new stream on the run's stderr: a thread of the run
    may have held the old streams' locks at the fork, and nothing in the helper would release them."""
    import logging

    old = (sys.stdout, sys.stderr)
    sys.stdout = sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 (for the helper's life)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in old:
            handler.setStream(sys.stderr)


class FigureWriter:
    """Encodes and writes figures in the order they are given; `write(step, phase, name, png)`
    runs on the writer's thread, and `encode(encoder)` (see measures.prepare_figure) there too.
    An error there (a full disk) is raised on the training thread at its next call, as
    TensorBoard's thread's errors are."""

    def __init__(self, write: Callable[[int, str, str, bytes], None]):
        self.write = write
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None  # started at the first figure

    def put(self, step: int, phase: str, name: str, encode: Callable[[FigureEncoder], bytes]) -> None:
        self.raise_error()
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="figures", daemon=True)
            self.thread.start()
        self.queue.put((step, phase, name, encode))

    def wait(self) -> None:
        """Until every figure given so far is written; raise what the thread met."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None
        self.raise_error()

    def barrier(self) -> Callable[[float], bool]:
        """A function `written(timeout)` for a checkpoint's writer (on its own thread): True once
        every figure given so far is written, False if that took over `timeout` seconds; it raises
        if one of them was not written (a full disk) or the writer's thread is gone."""
        thread = self.thread
        if thread is None:
            return lambda timeout: True
        reached: Future = Future()
        self.queue.put(reached)

        def written(timeout: float) -> bool:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    return reached.result(timeout=min(1.0, timeout))
                except TimeoutError:
                    if not thread.is_alive():
                        message = "the figure writer stopped before the checkpoint's figures were written"
                        raise RuntimeError(message) from None
            return False

        return written

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _work(self) -> None:
        encoder, lost = FigureEncoder(), None
        try:
            while (item := self.queue.get()) is not None:
                if isinstance(item, Future):  # a barrier: every figure before it is written, or not
                    if lost is None:
                        item.set_result(True)
                    else:  # a full disk, say: the checkpoint fails as its own write would
                        failure = RuntimeError(f"a figure the checkpoint covers was not written: {lost}")
                        failure.__cause__ = lost
                        item.set_exception(failure)
                    continue
                if lost is not None:  # the first error is the one reported; drop the rest
                    continue
                step, phase, name, encode = item
                try:
                    self.write(step, phase, name, encode(encoder))
                except BaseException as error:  # handed to the training thread, which reports it
                    self.error = lost = error
        finally:
            encoder.close()
