"""TensorBoard's event files, written by a thread of their own.

Importing TensorBoard alone costs a small run a few percent, so the training thread
only queues plain values; the thread imports TensorBoard's own event writer (torch's
SummaryWriter wraps it, at twice the cost per value) and writes what is queued.
"""

import io
import json
import queue
import threading
import time
from pathlib import Path


class TensorBoardWriter:
    """Scalars and images into `directory`'s event files. `purge_from`: a resumed run hides
    the values earlier event files hold for this step and later ones (None: a new run)."""

    def __init__(self, directory: Path, purge_from: int | None = None):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._write, args=(str(directory), purge_from), name="tensorboard", daemon=True
        )
        self.thread.start()

    def scalars(self, wall_time: float, step: int, phase: str, values: dict[str, float]) -> None:
        self._raise_error()
        self.queue.put(("scalars", wall_time, step, phase, values))

    def image(self, wall_time: float, step: int, phase: str, name: str, png: bytes) -> None:
        self._raise_error()
        self.queue.put(("image", wall_time, step, phase, {name: png}))

    def close(self) -> None:
        """Write what is queued, close the event file, and raise what the thread met."""
        self.queue.put(None)
        self.thread.join()
        self._raise_error()

    def _raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _write(self, directory: str, purge_from: int | None) -> None:
        try:
            from PIL import Image
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            writer = EventFileWriter(directory)
            if purge_from is not None:
                # What SummaryWriter(purge_step=...) writes: TensorBoard then hides the values that
                # earlier event files hold for this step and later ones.
                start = SessionLog(status=SessionLog.START)
                writer.add_event(Event(wall_time=time.time(), step=purge_from, session_log=start))
            while (item := self.queue.get()) is not None:
                kind, wall_time, step, phase, values = item
                summary = Summary()
                for name, value in values.items():
                    if kind == "scalars":
                        summary.value.add(tag=f"{phase}/{name}", simple_value=value)
                    else:
                        with Image.open(io.BytesIO(value)) as image:
                            width, height = image.size
                            channels = len(image.getbands())
                        picture = Summary.Image(
                            height=height, width=width, colorspace=channels, encoded_image_string=value
                        )
                        summary.value.add(tag=f"{phase}/{name}", image=picture)
                writer.add_event(Event(wall_time=wall_time, step=step, summary=summary))
            writer.close()
        except BaseException as error:  # handed to the training thread, which reports it
            self.error = error


def write_hparams(run_directory: Path, parameters: dict, metrics: dict[str, float]) -> None:
    """A run's hyperparameters (a sweep member's swept values) and final metrics for TensorBoard's
    HParams tab, in an event file of its own in the run directory (so the values are this run's)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    from torch.utils.tensorboard.summary import hparams

    shown = {
        key: value if isinstance(value, bool | int | float | str) else json.dumps(value)
        for key, value in parameters.items()
    }
    writer = EventFileWriter(str(run_directory), filename_suffix=".hparams")
    for summary in hparams(shown, metrics):  # the experiment, the session's start and its end
        writer.add_event(Event(wall_time=time.time(), summary=summary))
    writer.close()
