"""7. What an experiment tracker adds to each logged step, against TensorBoard + metrics.jsonl only.

In one process, alternating rounds: a round is N steps that each log `train/loss` and
`train/lr` the way a run does (MetricLogger; on side A also `Trackers.log_metrics`), then
a flush of both, as at a checkpoint, so that whatever the background thread has not
handed to the tracker yet is waited for and counted. Every step logs here, the worst case
(a run logs every `log_every_n_steps`, 50 by default). W&B runs offline (its service is a
separate process, whose work is not counted), MLflow into a local file store: no network.
"""

import contextlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, Comparison, alternate

sys.path.insert(0, str(REPO))
from src.core.tracking.metrics import MetricLogger
from src.core.tracking.trackers import Trackers

STEPS = 1000


def logging_round(scratch: Path, name: str, trackers: list[str]):
    """A function that logs STEPS steps and flushes; it returns microseconds per step, and
    appends to `calls` the microseconds per step of the logging calls alone (before the flush)."""
    run_directory = scratch / name
    run_directory.mkdir()
    logger = MetricLogger(run_directory)
    config = {
        "description": "tracker benchmark",
        "model_type": "PendulumModel",
        "run_name": name,
        "wandb": {"mode": "offline"},
        "mlflow": {"tracking_uri": (scratch / "mlruns").as_uri()},
    }
    fan_out = Trackers.open(trackers, run_directory, config, {"git": {"commit": "0" * 40}})
    step, calls = 0, []

    def one_round() -> float:
        nonlocal step
        started = time.perf_counter()
        for _ in range(STEPS):
            step += 1
            values = {"loss": 1.0 / step, "lr": 1e-3}
            logger.log(step, 1, "train", values)
            fan_out.log_metrics(step, {f"train/{key}": value for key, value in values.items()})
        calls.append((time.perf_counter() - started) / STEPS * 1e6)
        logger.flush()
        fan_out.flush()
        return (time.perf_counter() - started) / STEPS * 1e6

    return one_round, fan_out, calls


def run(repetitions: int, scratch: Path) -> list[Comparison]:
    """One comparison per installed tracker (none when neither is installed)."""
    comparisons, opened = [], []
    os.environ.update(WANDB_DIR=str(scratch), WANDB_SILENT="true")
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        baseline, _, baseline_calls = logging_round(scratch, "tensorboard", [])
        for tracker in ("wandb", "mlflow"):
            if importlib.util.find_spec(tracker) is None:
                continue
            with_tracker, fan_out, calls = logging_round(scratch, tracker, [tracker])
            opened.append(fan_out)
            baseline_calls.clear()
            name = f"{tracker} (offline) + TensorBoard / TensorBoard only, per logged step, until handed over"
            comparisons.append(alternate(name, with_tracker, baseline, repetitions, unit="µs"))
            name = f"{tracker} (offline) + TensorBoard / TensorBoard only, per logged step, the logging call"
            comparisons.append(Comparison(name, calls[1:], baseline_calls[1:], unit="µs"))
        for fan_out in opened:
            fan_out.close()
    return comparisons


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="bench-trackers-") as scratch:
        for comparison in run(7, Path(scratch)):
            print(comparison.row())
