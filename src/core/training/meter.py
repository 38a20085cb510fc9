"""The meter: training's running sums between log lines and over an epoch.

Sums stay on the device and are reduced over the ranks only at logging steps and epoch
ends, where the ranks meet anyway. They are part of a checkpoint (per rank), so a run
resumed mid-interval logs the same means as one never stopped.
"""

import time

import torch

from src.core.distributed import DistContext, all_reduce_sum
from src.core.training.measures import SampleMeans


class Meter:
    def __init__(self, context: DistContext):
        self.context, self.device = context, context.device
        self.interval_sums: dict[str, torch.Tensor] = {}  # the loss and its terms, summed per batch
        self.interval_metrics = SampleMeans(self.device)  # your metrics (train_metrics), per sample
        self.interval_batches = 0
        self.epoch_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.epoch_batches = 0
        self.interval_started, self.interval_samples = time.monotonic(), 0  # throughput (wall clock)

    def add(self, losses: dict[str, torch.Tensor], samples: int) -> None:
        """One training batch's loss and loss terms."""
        for name, value in losses.items():
            total = self.interval_sums.get(name)
            if total is None:
                total = self.interval_sums[name] = torch.zeros((), dtype=torch.float64, device=self.device)
            total += value.detach()
        self.epoch_loss += losses["loss"].detach()
        self.interval_batches += 1
        self.epoch_batches += 1
        self.interval_samples += samples

    def interval(self) -> dict[str, float]:
        """The means since the last call (over every rank: a sync point), as `train/<name>`,
        with the throughput; then start a new interval."""
        names = sorted(self.interval_sums)
        sums = torch.stack([self.interval_sums[name] for name in names])
        means = self.mean_over_ranks(sums, self.interval_batches)
        values = {f"train/{name}": float(value) for name, value in zip(names, means, strict=True)}
        values |= {f"train/{name}": value for name, value in self.interval_metrics.reduce(self.context).items()}
        seconds = time.monotonic() - self.interval_started
        values["train/samples_per_second"] = self.interval_samples * self.context.world_size / max(seconds, 1e-9)
        for total in self.interval_sums.values():
            total.zero_()
        self.interval_metrics = SampleMeans(self.device)
        self.interval_batches = self.interval_samples = 0
        self.interval_started = time.monotonic()
        return values

    def epoch_mean(self, epoch_done: bool) -> float:
        """The training loss over the epoch so far (every rank); a finished epoch starts anew,
        a partial one (max_steps stopped it) goes on summing."""
        loss = float(self.mean_over_ranks(self.epoch_loss.reshape(1), self.epoch_batches)[0])
        if epoch_done:
            self.epoch_loss.zero_()
            self.epoch_batches = 0
        return loss

    def mean_over_ranks(self, sums: torch.Tensor, batches: int) -> torch.Tensor:
        """Per-batch sums as means over the batches of every rank."""
        count = torch.tensor([float(batches)], dtype=torch.float64, device=self.device)
        reduced = all_reduce_sum(torch.cat([sums.reshape(-1), count]), self.context)
        return (reduced[:-1] / reduced[-1]).cpu()

    def state_dict(self) -> dict:
        return {
            "interval_sums": dict(self.interval_sums),
            "interval_batches": self.interval_batches,
            "interval_metrics": dict(self.interval_metrics.sums),
            "epoch_loss": self.epoch_loss,
            "epoch_batches": self.epoch_batches,
        }

    def load_state_dict(self, state: dict) -> None:
        self.interval_sums = {name: value.to(self.device) for name, value in state["interval_sums"].items()}
        self.interval_metrics.sums = {name: value.to(self.device) for name, value in state["interval_metrics"].items()}
        self.epoch_loss = state["epoch_loss"].to(self.device)
        self.interval_batches, self.epoch_batches = state["interval_batches"], state["epoch_batches"]
