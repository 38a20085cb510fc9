"""metrics.jsonl and TensorBoard: what a resumed run keeps of them."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.core.errors import UserError
from src.core.tracking.metrics import MetricLogger, read_metrics


def test_a_resume_cuts_back_to_the_checkpoint_and_purges_later_tensorboard_steps(tmp_path):
    logger = MetricLogger(tmp_path)
    logger.log(1, 1, "train", {"loss": 1.0})
    covered = logger.flush()  # what a checkpoint at step 1 records
    logger.log(2, 1, "train", {"loss": 2.0})  # logged by the process that is then killed
    logger.close()

    resumed = MetricLogger(tmp_path, resume_from_byte=covered, resume_step=1)
    resumed.log(2, 1, "train", {"loss": 3.0})
    resumed.close()
    assert [(r["step"], r["value"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 3.0)]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 3.0)]


def test_a_metrics_file_shorter_than_the_checkpoint_says_is_refused_not_padded(tmp_path):
    logger = MetricLogger(tmp_path)
    logger.log(1, 1, "train", {"loss": 1.0})
    covered = logger.flush()
    logger.close()
    (tmp_path / "metrics.jsonl").write_text("")  # lost writes
    with pytest.raises(UserError, match="logged values were lost"):
        MetricLogger(tmp_path, resume_from_byte=covered, resume_step=1)
    assert (tmp_path / "metrics.jsonl").read_bytes() == b""


def test_event_files_are_what_tensorboards_own_reader_and_checksums_expect(tmp_path):
    """The event file format is written here (not by TensorBoard's writer): its checksum, the
    images' shapes read from their PNG headers, and every record read back by TensorBoard."""
    import io
    import os

    from PIL import Image
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tensorboards_crc

    from src.core.tracking.tensorboard import TensorBoardWriter, masked_crc32c, png_shape

    for size in (0, 1, 9, 4096):
        data = os.urandom(size)
        assert masked_crc32c(data) == tensorboards_crc(data)
    pngs = {}
    for mode, channels in (("L", 1), ("LA", 2), ("RGB", 3), ("RGBA", 4), ("P", 3)):
        buffer = io.BytesIO()
        Image.new(mode, (7, 5)).save(buffer, format="PNG")
        pngs[mode] = buffer.getvalue()
        assert png_shape(pngs[mode]) == (5, 7, channels)

    writer = TensorBoardWriter(tmp_path, purge_from=3)
    writer.scalars(100.0, 3, "train", {"loss": 0.5, "lr": 0.25})
    writer.image(101.0, 4, "rollout", "picture", pngs["RGBA"])
    writer.close()
    (events_file,) = tmp_path.glob("events.out.tfevents.*")
    events = [Event.FromString(record) for record in RawEventFileLoader(str(events_file)).Load()]  # CRCs checked
    assert events[0].file_version == "brain.Event:2"
    assert events[1].step == 3 and events[1].session_log.status == events[1].session_log.START
    assert {value.tag: value.simple_value for value in events[2].summary.value} == {"train/loss": 0.5, "train/lr": 0.25}
    (image,) = events[3].summary.value
    assert (image.tag, events[3].step, events[3].wall_time) == ("rollout/picture", 4, 101.0)
    assert (image.image.height, image.image.width, image.image.colorspace) == (5, 7, 4)
    assert image.image.encoded_image_string == pngs["RGBA"]
