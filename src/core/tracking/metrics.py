"""Every logged value goes to `metrics.jsonl` and to TensorBoard (and, through the run's
output, src/core/training/output.py, to the configured trackers).

A line of metrics.jsonl:
    {"step": 120, "epoch": 2, "phase": "val", "name": "loss", "value": 0.0123, "time": 1732262400.1}

Lines are buffered and written at checkpoints, epoch ends and every few seconds.
A checkpoint records how many bytes of metrics.jsonl it covers; a resumed run cuts
the file back to that length and tells TensorBoard to purge later steps, so
neither holds values from the killed process's lost work.
"""

import json
import os
import time
from pathlib import Path

from src.core.errors import UserError
from src.core.record.rundir import write_bytes_atomic
from src.core.tracking.tensorboard import TensorBoardWriter

METRICS_FILE = "metrics.jsonl"
FIGURES_DIRECTORY = "figures"
FLUSH_SECONDS = 10.0


class MetricLogger:
    """`resume_from_byte`/`resume_step`: the run directory is being reused by a resume. Its
    metrics.jsonl is cut back to that many bytes (created if missing: a run killed before
    its first line), and TensorBoard hides the values its earlier event files hold for
    steps after `resume_step` (-1: all of them, a restart from step 0)."""

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
        self.tensorboard: TensorBoardWriter | None = None
        if tensorboard:
            purge_from = resume_step + 1 if resume_step is not None and earlier_events else None
            self.tensorboard = TensorBoardWriter(Path(run_directory), purge_from)

    def log(self, step: int, epoch: int, phase: str, values: dict[str, float]) -> None:
        wall_time = time.time()
        values = {name: float(value) for name, value in values.items()}
        for name, value in values.items():
            record = {"step": step, "epoch": epoch, "phase": phase, "name": name, "value": value, "time": wall_time}
            self.buffer.append(json.dumps(record))
        if self.tensorboard is not None:
            self.tensorboard.scalars(wall_time, step, phase, values)
        if time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def log_image(self, step: int, phase: str, name: str, png: bytes) -> Path:
        """A figure: to TensorBoard's Images tab as `<phase>/<name>`, and to
        figures/<phase>/<step>-<name>.png (written whole or not at all)."""
        if self.tensorboard is not None:
            self.tensorboard.image(time.time(), step, phase, name, png)
        path = self.path.parent / FIGURES_DIRECTORY / phase / figure_file_name(step, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, png)
        return path

    def flush(self) -> int:
        """Write buffered lines; return the file's length (what a checkpoint records). The
        checkpoint writer fsyncs the file (`make_durable`) before its checkpoint becomes visible, so
        a checkpoint never covers bytes a power cut could lose, and training never waits for it.
        TensorBoard's thread writes its events (see make_durable)."""
        if self.buffer:
            self.file.write("\n".join(self.buffer) + "\n")
            self.buffer.clear()
        self.file.flush()
        self.last_flush = time.monotonic()
        return self.file.tell()

    def make_durable(self) -> None:
        """On disk: metrics.jsonl as far as the last flush, and TensorBoard's events queued so far
        (waiting for its thread). A checkpoint's writer calls it before the checkpoint shows."""
        os.fsync(self.file.fileno())
        if self.tensorboard is not None:
            self.tensorboard.sync()

    def close(self) -> None:
        """Flush and close metrics.jsonl (fsynced) and TensorBoard's event file."""
        self.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


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
