"""TensorBoard's event files, written by a thread of their own.

The training thread only queues plain values; the thread writes them as TensorBoard's
`Event` protobufs. The file format (TFRecord framing, below) is written here rather than by
TensorBoard's EventFileWriter: importing that writer pulls in TensorBoard's file-system layer
(fsspec, botocore, urllib3), 0.13 s of CPU a run, where the protobufs alone cost 0.015 s.
TensorBoard's own reader reads these files in the tests.
"""

import itertools
import json
import os
import queue
import socket
import struct
import threading
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # CRC-32C (Castagnoli), reflected
        table.append(crc)
    return table


CRC32C_TABLE = _crc32c_table()
FILE_NUMBERS = itertools.count()  # two event files of one process in one second get distinct names


def masked_crc32c(data: bytes) -> int:
    """The checksum TFRecord stores: CRC-32C, rotated and offset (a "masked" CRC)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class EventFile:
    """One event file: `events.out.tfevents.<time>.<host>.<pid>.<n><suffix>` in `directory`,
    opening with the version record TensorBoard expects. Each record is TFRecord's: the
    length (uint64, little-endian), its masked CRC, the serialized Event, its masked CRC."""

    def __init__(self, directory: str, suffix: str = ""):
        from tensorboard.compat.proto.event_pb2 import Event

        os.makedirs(directory, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self.stream = open(os.path.join(directory, f"{name}.{next(FILE_NUMBERS)}{suffix}"), "wb")  # noqa: SIM115
        self.write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def write(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self.stream.write(header + struct.pack("<I", masked_crc32c(header)) + data)
        self.stream.write(struct.pack("<I", masked_crc32c(data)))

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()


def png_shape(png: bytes) -> tuple[int, int, int]:
    """(height, width, channels) from a PNG's header chunk (IHDR), without decoding the image.
    Channels as TensorBoard counts them: 1 grey, 2 grey and alpha, 3 RGB (or a palette), 4 RGBA."""
    width, height = struct.unpack(">II", png[16:24])
    return height, width, {0: 1, 4: 2, 2: 3, 3: 3, 6: 4}[png[25]]


class TensorBoardWriter:
    """Scalars and images into `directory`'s event files. `purge_from`: a resumed run hides
    the values earlier event files hold for this step and later ones (None: a new run)."""

    def __init__(self, directory: Path, purge_from: int | None = None):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None  # raised once, on the training thread
        self.stopped_by: BaseException | None = None  # kept: what ended the thread
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

    def sync(self) -> None:
        """Return once the events queued so far are in the event file and on disk: a checkpoint
        waits for it (on its writer's thread), so that TensorBoard holds every value logged before
        the checkpoint (a resume from it does not log them again)."""
        written = threading.Event()
        self.queue.put(("sync", written))
        while not written.wait(timeout=1.0):
            if not self.thread.is_alive():  # a full disk: the checkpoint reports it as its own failure
                message = "TensorBoard's event writer stopped before the values the checkpoint covers were written"
                raise RuntimeError(message) from self.stopped_by

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
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog
            from tensorboard.compat.proto.summary_pb2 import Summary

            events = EventFile(directory)
            if purge_from is not None:
                # What SummaryWriter(purge_step=...) writes: TensorBoard then hides the values that
                # earlier event files hold for this step and later ones.
                start = SessionLog(status=SessionLog.START)
                events.write(Event(wall_time=time.time(), step=purge_from, session_log=start))
            while (item := self.queue.get()) is not None:
                if item[0] == "sync":
                    events.flush()
                    os.fsync(events.stream.fileno())
                    item[1].set()
                    continue
                kind, wall_time, step, phase, values = item
                summary = Summary()
                for name, value in values.items():
                    if kind == "scalars":
                        summary.value.add(tag=f"{phase}/{name}", simple_value=value)
                    else:
                        height, width, channels = png_shape(value)
                        picture = Summary.Image(
                            height=height, width=width, colorspace=channels, encoded_image_string=value
                        )
                        summary.value.add(tag=f"{phase}/{name}", image=picture)
                events.write(Event(wall_time=wall_time, step=step, summary=summary))
                if self.queue.empty():  # caught up: what is written shows in TensorBoard now
                    events.flush()
            events.close()
        except BaseException as error:  # handed to the training thread, which reports it
            self.error = self.stopped_by = error


def write_hparams(run_directory: Path, parameters: dict, metrics: dict[str, float]) -> None:
    """A run's hyperparameters (a sweep member's swept values) and final metrics for TensorBoard's
    HParams tab, in an event file of its own in the run directory (so the values are this run's)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from torch.utils.tensorboard.summary import hparams

    shown = {
        key: value if isinstance(value, bool | int | float | str) else json.dumps(value)
        for key, value in parameters.items()
    }
    events = EventFile(str(run_directory), suffix=".hparams")
    for summary in hparams(shown, metrics):  # the experiment, the session's start and its end
        events.write(Event(wall_time=time.time(), summary=summary))
    events.close()
