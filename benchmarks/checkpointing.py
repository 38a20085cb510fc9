"""4. Checkpointing: how long the training loop is blocked per checkpoint, against a bare
`torch.save` of the same state, for a model of about 100M parameters (with its AdamW
state: 1.2 GB); the cost of verifying a checkpoint on load; and what a checkpoint adds
per save for the example model.
"""

import os
import statistics
import sys
import time
from pathlib import Path

import torch
from common import REPO, Comparison, in_process_trainer

sys.path.insert(0, str(REPO))
from src.core.record.checkpoint import read_checkpoint
from src.core.training.trainer import Trainer


def make_trainer(data: Path, run_directory: Path, hidden_size: int) -> Trainer:
    config = f"""
        description: checkpoint benchmark
        data_directory: {data}
        model_type: PendulumModel
        model_parameters: {{hidden_size: {hidden_size}, num_layers: 4}}
        loss_function: F.mse_loss
        train_data_loader_type: PendulumSteps
        epochs: 1
        batch_size: 8
        """
    run_directory.mkdir(parents=True)
    trainer = in_process_trainer(config, run_directory, mini=True)
    _, batches = trainer.loaders.loader("train")
    losses = trainer.stepper.forward(next(batches))[0]  # one step, so AdamW has its state
    trainer.stepper.backward(losses["loss"], group_size=1)
    trainer.stepper.step(0)
    return trainer


def parameters(trainer: Trainer) -> int:
    return sum(p.numel() for p in trainer.model.parameters())


def blocking_and_total(trainer: Trainer) -> tuple[float, float]:
    started = time.perf_counter()
    trainer.save_checkpoint(links=("last",))
    blocked = time.perf_counter() - started
    trainer.output.wait()
    trainer.progress.global_step += 1  # the next one gets a file of its own
    return blocked, time.perf_counter() - started


def run(data: Path, repetitions: int, scratch: Path) -> tuple[list[Comparison], list[str]]:
    large = make_trainer(data, scratch / "large", hidden_size=5770)
    blocked, totals, bare, durable = [], [], [], []
    for repetition in range(repetitions + 1):
        block, total = blocking_and_total(large)
        started = time.perf_counter()
        with open(scratch / "bare.pt", "wb") as stream:
            torch.save(large.state_dict(), stream)
            saved = time.perf_counter()
            stream.flush()
            os.fsync(stream.fileno())
        if repetition:
            blocked.append(block)
            totals.append(total)
            bare.append(saved - started)
            durable.append(time.perf_counter() - started)
    size = (scratch / "bare.pt").stat().st_size / 1e9
    name = f"{parameters(large) / 1e6:.0f}M parameters ({size:.1f} GB)"
    comparisons = [
        Comparison(f"{name}: training blocked per checkpoint / bare torch.save", blocked, bare),
        Comparison(f"{name}: until on disk with its SHA-256 manifest / bare torch.save + fsync", totals, durable),
    ]
    newest = sorted((scratch / "large" / "checkpoints").glob("step-*.pt"))[-1]
    verified, plain = [], []
    for _ in range(repetitions):
        started = time.perf_counter()
        read_checkpoint(newest)
        verified.append(time.perf_counter() - started)
        started = time.perf_counter()
        torch.load(newest, map_location="cpu", weights_only=True)
        plain.append(time.perf_counter() - started)
    comparisons.append(Comparison(f"{name}: verified load / torch.load", verified, plain))
    del large

    example = make_trainer(data, scratch / "example", hidden_size=64)
    timings = [blocking_and_total(example) for _ in range(20)]
    notes = [
        f"Example model ({parameters(example):,} parameters): a checkpoint blocks training for "
        f"{statistics.median(t[0] for t in timings) * 1000:.1f} ms (median of 20) and is on disk, "
        f"fsynced and hashed, {statistics.median(t[1] for t in timings) * 1000:.1f} ms after it was asked for."
    ]
    return comparisons, notes
