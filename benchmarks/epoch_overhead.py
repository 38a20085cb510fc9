"""1b. Per-step overhead, measured finely: training epochs of the Trainer and of a plain loop,
alternating in one process.

The whole-process comparison (training_overhead.py) is what a user waits for, but each of
its samples is a separate process of several seconds, and this machine's speed drifts by
more than the 5% being measured between one process and the next. Here both sides run in
the same process, on the same data, with the same model and optimizer, one epoch (625
steps) each, alternating A B A B ..., so each pair of samples sees the same machine. The
Trainer runs as in a logged run: metrics.jsonl and TensorBoard every `log_every_n_steps`,
tqdm bar on (to /dev/null), its per-step checks; epoch-end work (validation, checkpoints)
is in the whole-process figure.
"""

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, Comparison, in_process_trainer, measure, python
from plain_loop import train_epoch
from torch.utils.data import DataLoader

sys.path.insert(0, str(REPO))
from src.core.seeding import configure_determinism
from src.data_loader import PendulumSteps
from src.model import PendulumModel


def trainer_epoch(data: Path, run_directory: Path, hidden_size: int, num_layers: int):
    config = f"""
        description: epoch overhead benchmark
        data_directory: {data}
        model_type: PendulumModel
        model_parameters: {{hidden_size: {hidden_size}, num_layers: {num_layers}}}
        loss_function: F.mse_loss
        train_data_loader_type: PendulumSteps
        epochs: 1000
        batch_size: 32
        progress_bar: true
        """
    trainer = in_process_trainer(config, run_directory, mini=False, show_progress=True)

    def epoch() -> float:
        trainer.progress.batch_in_epoch = 0  # what fit() does between epochs
        started = time.perf_counter()
        trainer.train_one_epoch()
        return time.perf_counter() - started

    return epoch


def plain_epoch(data: Path, hidden_size: int, num_layers: int):
    torch.manual_seed(0)
    model = PendulumModel(hidden_size, num_layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    loader = DataLoader(
        PendulumSteps(str(data), "train"), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )

    def epoch() -> float:
        started = time.perf_counter()
        train_epoch(model, optimizer, loader).item()
        return time.perf_counter() - started

    return epoch


def measure_pairs(data: Path, hidden_size: int, num_layers: int, pairs: int) -> tuple[list[float], list[float]]:
    """Seconds per epoch of the Trainer and of the plain loop, alternating, after a warm-up pair."""
    configure_determinism(True, torch.device("cpu"))  # both sides, as in a run on the CPU
    with (
        tempfile.TemporaryDirectory() as run_directory,
        open(os.devnull, "w") as devnull,
        contextlib.redirect_stderr(devnull),  # the Trainer's progress bar
    ):
        trainer_side = trainer_epoch(data, Path(run_directory), hidden_size, num_layers)
        plain_side = plain_epoch(data, hidden_size, num_layers)
        trainer_side(), plain_side()
        a, b = [], []
        for _ in range(pairs):
            a.append(trainer_side())
            b.append(plain_side())
    return a, b


def run(data: Path, tasks: dict[str, dict], pairs: int) -> list[Comparison]:
    """Each task in a fresh process with the shared allocator settings (common.py explains why)."""
    comparisons = []
    for name, parameters in tasks.items():
        arguments = [str(data), str(parameters["hidden_size"]), str(parameters["num_layers"]), str(pairs)]
        output = measure([python(), __file__, *arguments], REPO).stdout
        a, b = json.loads(output.splitlines()[-1])
        comparisons.append(Comparison(f"{name}: trainer epoch / plain epoch, in one process", a, b))
    return comparisons


if __name__ == "__main__":  # epoch_overhead.py DATA HIDDEN_SIZE NUM_LAYERS PAIRS
    data, hidden_size, num_layers, pairs = sys.argv[1:]
    print(json.dumps(measure_pairs(Path(data), int(hidden_size), int(num_layers), int(pairs))))
