"""Figures encoded as PNG and written on a thread of their own, so that the training thread only
draws them (the model's `figures` hook) and goes on: matplotlib's savefig costs a small model
about as much as an epoch's steps."""

import queue
import threading
from collections.abc import Callable


class FigureWriter:
    """Encodes and writes figures in the order they are given; `write(step, phase, name, png)`
    runs on the writer's thread. An error there (a full disk) is raised on the training
    thread at its next call, as TensorBoard's thread's errors are."""

    def __init__(self, write: Callable[[int, str, str, bytes], None]):
        self.write = write
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None  # started at the first figure

    def put(self, step: int, phase: str, name: str, encode: Callable[[], bytes]) -> None:
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

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:  # the first error is the one reported; drop the rest
                continue
            step, phase, name, encode = item
            try:
                self.write(step, phase, name, encode())
            except BaseException as error:  # handed to the training thread, which reports it
                self.error = error
