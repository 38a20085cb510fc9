"""The three phases of an epoch, and every name each goes by, in one place.

Logs, metrics and the Trainer say `train`, `val`, `rollout`. The config keeps the
original template's names for the datasets (`test_data_loader_type`,
`data_loader_parameters.test`), and a dataset is told its config name as `split`.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    name: str  # in logs and metric names: train/loss, val/accuracy, rollout/loss
    split: str  # in the config (data_loader_parameters.<split>) and the dataset's `split` argument
    loader_key: str  # the config key naming its dataset class


TRAIN = Phase("train", "train", "train_data_loader_type")
VAL = Phase("val", "test", "test_data_loader_type")  # the cheap validation pass
ROLLOUT = Phase("rollout", "eval", "eval_data_loader_type")  # the expensive third phase
PHASES = (TRAIN, VAL, ROLLOUT)
EVALUATION_PHASES = (VAL, ROLLOUT)
BY_NAME = {phase.name: phase for phase in PHASES}
EVALUATION_PHASE_NAMES = tuple(phase.name for phase in EVALUATION_PHASES)

# What the Trainer logs of its own in training, whatever the model (README, "Run directory").
BUILT_IN_METRICS = (
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/epoch_loss",
    "train/samples_per_second",
    "train/epoch_seconds",
    "system/peak_rss_mb",  # at epoch ends; system/peak_cuda_mb too on a GPU (training/system.py)
    "system/data_wait_fraction",
)

# Logged values that measure the machine, not the model: they differ from run to run,
# so comparisons of runs (resume, --reproduce) leave them out.
WALL_CLOCK_METRICS = frozenset(
    {
        "train/samples_per_second",
        "train/epoch_seconds",
        "system/peak_rss_mb",
        "system/peak_cuda_mb",
        "system/data_wait_fraction",
    }
)
