"""The evaluator: the validation ("val") and rollout phases, as training, `--evaluate` and the
monitor's check all run them.

Each phase gives the loss, its terms and the model's own metrics as sample-weighted means
over every sample and every rank, plus the model's whole-split metrics, gathered exactly
under DDP. It runs on random streams of its own (seeding.isolated_rng), so evaluating (or
not) never changes training, and `--evaluate` gets training's numbers. The rollout's
first batch is drawn (the model's `figures`) into the run's output.
"""

import contextlib
import math
from collections.abc import Callable

import torch

from src.core import faults
from src.core.config.validation import Config
from src.core.distributed import DistContext, broadcast_object
from src.core.errors import UserError, nearest
from src.core.phases import EVALUATION_PHASE_NAMES
from src.core.seeding import derive_seed, isolated_rng
from src.core.training.build import Task
from src.core.training.data import Loaders
from src.core.training.measures import SampleMeans, SplitSamples, add_model_metrics, forward, overrides
from src.core.training.output import NullOutput
from src.core.training.stepper import autocast


class Evaluator:
    def __init__(self, config: Config, task: Task, loaders: Loaders, context: DistContext, output=None):
        """`output`: where figures go and what a fault settles first (None: nowhere)."""
        self.config, self.model, self.loss_function = config, task.model, task.loss_function
        self.loaders, self.context = loaders, context
        self.output = output if output is not None else NullOutput()
        self.phases = [phase for phase in EVALUATION_PHASE_NAMES if phase in task.datasets]
        self.user_metrics = overrides(self.model, "metrics")
        self.user_split_metrics = overrides(self.model, "split_metrics")
        self.draws = overrides(self.model, "figures") and self.output.keeps_figures and config.rollout.figures

    @torch.no_grad()
    def evaluate(
        self, phase: str, step: int = 0, probe: bool = False, on_batch: Callable | None = None
    ) -> tuple[dict[str, float], list[dict]]:
        """One phase: its metrics by `<phase>/<name>`, and each batch's samples and loss. `step`
        names the figures drawn. `probe`: one batch only, to learn the names logged (nothing
        drawn, no fault point). `on_batch(prediction, target, inputs)`: each batch
        (--evaluate --save-outputs)."""
        limit = self.config.rollout.max_samples if phase == "rollout" else None
        if probe:
            limit = min(limit or math.inf, self.loaders.batch_size(phase))
        loader, batches = self.loaders.loader(phase, limit=limit)
        mode = self.model.rollout() if phase == "rollout" else contextlib.nullcontext()
        means = SampleMeans(self.context.device)
        split = SplitSamples() if self.user_split_metrics else None
        draws = phase == "rollout" and self.draws and not probe
        batch_results = []
        self.model.eval()
        seed = derive_seed(self.config.seed, phase, self.context.rank)
        with isolated_rng(seed), mode, autocast(self.config, self.context.device):
            for batch in self.output.console.bar(len(loader), 0, phase, batches):
                losses, prediction, target, inputs = forward(self.model, batch, self.loss_function, self.context.device)
                samples = len(target)
                for name, value in losses.items():
                    means.add(name, value.detach().double() * samples, samples)
                if self.user_metrics:
                    add_model_metrics(self.model, means, prediction, target, inputs, keep=split)
                if draws:
                    self.output.log_figures(step, phase, self.model.figures(prediction, target, inputs))
                    draws = False
                if on_batch is not None:
                    on_batch(prediction, target, inputs)
                batch_results.append({"samples": samples, "loss": losses["loss"].detach()})
                if not probe:
                    faults.maybe_fail(phase, settle=self.output.settle)
        self.model.train()
        metrics = {f"{phase}/{name}": value for name, value in means.reduce(self.context).items()}
        if split is not None:
            metrics |= {f"{phase}/{name}": float(value) for name, value in self.split_metrics(split).items()}
        details = [{"samples": item["samples"], "loss": item["loss"].item()} for item in batch_results]
        return metrics, details

    def split_metrics(self, split: SplitSamples) -> dict[str, float]:
        """The model's whole-split metrics, computed on rank 0 from every rank's samples."""
        samples = split.gather(self.context)
        values = self.model.split_metrics(samples) if self.context.is_main else None
        return broadcast_object(values, self.context)

    def check_monitor(self, monitor: str) -> None:
        """`checkpoint.monitor` must name a value of an evaluation (val/..., rollout/...) or
        train/epoch_loss: what is known at each epoch's end. Names the model's hooks and loss add
        are known only once they ran: then one batch of the monitored phase tells them."""
        known = {"train/epoch_loss"} | {f"{phase}/loss" for phase in self.phases}
        phase = monitor.partition("/")[0]
        if monitor not in known and phase in self.phases:
            known |= set(self.evaluate(phase, probe=True)[0])
        if monitor not in known:  # say everything it can monitor: the other phase's own names too
            for other in self.phases:
                if other != phase:
                    known |= set(self.evaluate(other, probe=True)[0])
            during_training = " (other training values are logged between evaluations)" if phase == "train" else ""
            raise UserError(
                f"config key 'checkpoint.monitor': {monitor!r} is not a metric of this run's evaluations"
                + during_training
                + nearest(monitor, known)
                + f" (it can monitor: {', '.join(sorted(known))})"
            )
