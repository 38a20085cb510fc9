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
