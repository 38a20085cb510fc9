"""Every logged value goes to `metrics.jsonl` and to TensorBoard, and to nothing else.

A line of metrics.jsonl:
    {"step": 120, "epoch": 2, "phase": "val", "name": "loss", "value": 0.0123, "time": 1732262400.1}

Lines are buffered and written at checkpoints, epoch ends and every few seconds.
A checkpoint records how many bytes of metrics.jsonl it covers; a resumed run cuts
the file back to that length and tells TensorBoard to purge later steps, so
neither holds values from the killed process's lost work.
"""

import io
import json
import os
import queue
import threading
import time
from pathlib import Path

from src.core.errors import UserError
from src.core.rundir import write_bytes_atomic

METRICS_FILE = "metrics.jsonl"
FIGURES_DIRECTORY = "figures"
FLUSH_SECONDS = 10.0


class MetricLogger:
    """`resume_from_byte`/`resume_step`: the run directory is being reused by a resume. Its
    metrics.jsonl is cut back to that many bytes (created if missing: a run killed before
    its first line), and TensorBoard hides the values its earlier event files hold for
    steps after `resume_step` (-1: all of them, a restart from step 0).

    TensorBoard's events are made and written by a thread of their own (its import alone
    costs a small run a few percent), so the training thread only queues plain values."""

    def __init__(
        self,
        run_directory: Path,
        resume_from_byte: int | None = None,
        resume_step: int | None = None,
        tensorboard: bool = True,
    ):
        self.path = Path(run_directory) / METRICS_FILE
        if resume_from_byte is not None:
            with open(self.path, "a+b") as stream:
                size = os.fstat(stream.fileno()).st_size
                if size < resume_from_byte:  # truncate() would pad with NUL bytes
                    raise UserError(
                        f"{self.path} holds {size} bytes, but the checkpoint resumed from covers "
                        f"{resume_from_byte}: logged values were lost (the file was edited or the disk "
                        "lost writes). Restore the file, or start a new run."
                    )
                stream.truncate(resume_from_byte)
        earlier_events = any(Path(run_directory).glob("events.out.tfevents.*"))
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.buffer: list[str] = []
        self.last_flush = time.monotonic()
        self.trackers = None  # W&B, MLflow (src/core/trackers.py): given every value and figure too
        self.tensorboard: queue.SimpleQueue | None = None
        self.tensorboard_error: BaseException | None = None
        if tensorboard:
            self.tensorboard = queue.SimpleQueue()
            purge_from = resume_step + 1 if resume_step is not None and earlier_events else None
            self.tensorboard_thread = threading.Thread(
                target=self._write_events, args=(str(run_directory), purge_from), name="tensorboard", daemon=True
            )
            self.tensorboard_thread.start()

    def log(self, step: int, epoch: int, phase: str, values: dict[str, float]) -> None:
        wall_time = time.time()
        values = {name: float(value) for name, value in values.items()}
        for name, value in values.items():
            record = {"step": step, "epoch": epoch, "phase": phase, "name": name, "value": value, "time": wall_time}
            self.buffer.append(json.dumps(record))
        if self.tensorboard is not None:
            self._raise_tensorboard_error()
            self.tensorboard.put(("scalars", wall_time, step, phase, values))
        if self.trackers is not None:
            self.trackers.log_metrics(step, {f"{phase}/{name}": value for name, value in values.items()})
        if time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def log_image(self, step: int, phase: str, name: str, png: bytes) -> Path:
        """A figure: to TensorBoard's Images tab as `<phase>/<name>`, and to
        figures/<phase>/<step>-<name>.png (written whole or not at all)."""
        if self.tensorboard is not None:
            self._raise_tensorboard_error()
            self.tensorboard.put(("image", time.time(), step, phase, {name: png}))
        if self.trackers is not None:
            self.trackers.log_image(step, f"{phase}/{name}", png)
        path = self.path.parent / FIGURES_DIRECTORY / phase / figure_file_name(step, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, png)
        return path

    def flush(self) -> int:
        """Write buffered lines; return the file's length (what a checkpoint records). The
        checkpoint writer fsyncs the file (`fileno`) before its checkpoint becomes visible, so
        a checkpoint never covers bytes a power cut could lose, and training never waits for it.
        TensorBoard's thread writes its events; they are flushed at close."""
        if self.buffer:
            self.file.write("\n".join(self.buffer) + "\n")
            self.buffer.clear()
        self.file.flush()
        self.last_flush = time.monotonic()
        return self.file.tell()

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self, status: str = "finished") -> None:
        """Flush and close every destination; trackers end their run with `status`."""
        try:
            self.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            if self.tensorboard is not None:
                self.tensorboard.put(None)
                self.tensorboard_thread.join()
                self._raise_tensorboard_error()
        finally:
            if self.trackers is not None:
                self.trackers.close(status)

    def _raise_tensorboard_error(self) -> None:
        if self.tensorboard_error is not None:
            error, self.tensorboard_error = self.tensorboard_error, None
            raise error

    def _write_events(self, directory: str, purge_from: int | None) -> None:
        """The TensorBoard thread: TensorBoard's own event writer (torch's SummaryWriter wraps it,
        at twice the cost per value), fed from the queue until close."""
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
            while (item := self.tensorboard.get()) is not None:
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
            self.tensorboard_error = error


def figure_file_name(step: int, name: str) -> str:
    """figures/<phase>/<step>-<name>.png, the step zero-padded so that files sort by step."""
    return f"{step:09d}-{name}.png"


def read_metrics(run_directory: Path) -> list[dict]:
    """All records of a run's metrics.jsonl, in order."""
    path = Path(run_directory) / METRICS_FILE
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


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
