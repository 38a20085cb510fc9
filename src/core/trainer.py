"""The Trainer: per epoch, (1) training, (2) a cheap validation pass, (3) an expensive rollout.

Read `_fit` from top to bottom: it is the whole loop. Everything a checkpoint must
hold to continue *exactly* (weights, optimizer, schedule, position in the epoch,
every random stream, the logging counters) is gathered in `state_dict` and put
back by `load_state_dict`; the data order is a pure function of (seed, epoch),
so a position in the epoch is just a batch count.

What is logged, and when: README, "Run directory" and "Your own metrics".
"""

import contextlib
import hashlib
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from src.core import faults
from src.core.base import BaseModel
from src.core.checkpoint import FORMAT_VERSION, CheckpointWriter, Retention, step_file_name
from src.core.config import Config, nearest, split_provenance
from src.core.data import EpochSampler, make_loader
from src.core.distributed import (
    DistContext,
    all_gather_object,
    all_reduce_sum,
    broadcast_object,
    share_from_rank_zero,
)
from src.core.errors import UserError, warn
from src.core.measures import SampleMeans, SplitSamples, figure_png, per_sample, split_loss
from src.core.metrics import MetricLogger
from src.core.phases import BY_NAME, EVALUATION_PHASE_NAMES
from src.core.policies import CheckpointSchedule, Monitor, Preempted, PreemptionStop
from src.core.rundir import read_run_files, update_metadata
from src.core.schedule import lr_factor, zero_lr_extension
from src.core.seeding import derive_seed, isolated_rng, restore_rng_state, rng_state
from src.core.trackers import TRACKERS, Trackers

SINGLE_PROCESS = DistContext()


@dataclass
class Progress:
    """Where training stands: what a resumed run continues from."""

    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # batches of the current epoch already trained on
    global_step: int = 0  # optimizer steps so far


def default_monitor(datasets: dict) -> str:
    """The metric that picks the best checkpoint: rollout, else validation, else training loss."""
    if "rollout" in datasets:
        return "rollout/loss"
    return "val/loss" if "val" in datasets else "train/epoch_loss"


def check_monitor_before_training(config: Config, model, loss_function, datasets, device, context) -> None:
    """Fail on a misspelled `checkpoint.monitor` before the run directory exists: rank 0 probes
    one batch with a throwaway Trainer when the name is not a built-in one (an exit-2 error
    then reaches every rank)."""
    if config.checkpoint.monitor in (None, "train/epoch_loss", "val/loss", "rollout/loss"):
        return

    def probe() -> None:
        Trainer(config, model, loss_function, datasets, device=device).check_monitor()

    share_from_rank_zero(context, "monitor-checked", probe)


def rescaled_position(
    batch_in_epoch: int, saved_world_size: int, world_size: int, accumulation: int, batches: int
) -> int:
    """A position in the epoch saved with another number of processes, in this run's batches:
    as many samples seen, rounded down to a whole accumulation group (a few repeat, none is skipped)."""
    position = batch_in_epoch * saved_world_size // world_size
    return min(position - position % accumulation, batches)


def retention(config: Config) -> Retention:
    keep = config.checkpoint
    return Retention(keep.keep_recent, keep.keep_every_n_steps, keep.keep_every_n_epochs)


@dataclass
class RunFiles:
    """Where a logged run writes: given to the Trainer on every rank, or None (no logging).
    Only rank 0 holds the writers; elsewhere they are None and writing is a no-op."""

    directory: Path
    logger: MetricLogger | None = None
    checkpoints: CheckpointWriter | None = None

    @classmethod
    def open(
        cls, directory: Path, context: DistContext, resume_state: dict | None, config: Config, archive=None
    ) -> "RunFiles":
        if not context.is_main:
            return cls(directory)
        # A resumed run cuts metrics.jsonl back to what its checkpoint covers (to nothing when
        # it restarts from step 0) and hides later TensorBoard values.
        logger = MetricLogger(
            directory,
            resume_from_byte=resume_state["logging"]["metrics_bytes"] if resume_state else 0,
            resume_step=resume_state["progress"]["global_step"] if resume_state else -1,
            tensorboard="tensorboard" in config.loggers,
        )
        if any(name in TRACKERS for name in config.loggers):  # W&B, MLflow: the same run on a resume
            saved, metadata = read_run_files(directory, "--resume")
            provenance = split_provenance(saved)[1]
            logger.trackers = Trackers.open(
                config.loggers, directory, config.to_dict(), provenance, metadata.get("trackers")
            )
            update_metadata(directory, trackers=logger.trackers.ids())
        checkpoints = CheckpointWriter(directory / "checkpoints", retention(config), archive=archive)
        return cls(directory, logger, checkpoints)

    def wait(self) -> None:
        """Until the checkpoint write in flight is on disk (rank 0; a no-op elsewhere)."""
        if self.checkpoints is not None:
            self.checkpoints.wait()

    def settle(self) -> None:
        """Before a crash test's fault acts: the checkpoint in flight is on disk and, with an
        archive, in the archive too, so that the test knows which checkpoint survives."""
        self.wait()
        mirror = self.checkpoints.archive if self.checkpoints is not None else None
        if mirror is not None and not mirror.wait_until_idle(timeout=120):
            warn("fault: the archive did not catch up within 120 s; acting anyway")

    def close(self, status: str = "finished") -> None:
        """Release what was opened; a pending checkpoint write is finished first."""
        try:
            self.wait()
        finally:
            if self.logger is not None:
                self.logger.close(status)


class Trainer:
    def __init__(
        self,
        config: Config,
        model: torch.nn.Module,
        loss_function: Callable,
        datasets: dict[str, tuple[type, torch.utils.data.Dataset]],
        *,
        device: torch.device,
        context: DistContext = SINGLE_PROCESS,
        run_directory: Path | None = None,
        resume_state: dict | None = None,
        commit: str | None = None,
        config_hash: str | None = None,
        preemption: threading.Event | None = None,
        archive=None,
        show_progress: bool = False,
        branched: bool = False,
    ):
        """`run_directory`: where to log (None: nothing is written). `resume_state`: the
        checkpoint to continue from (None: start at step 0). `preemption`: an event that,
        once set (SIGUSR1 under --requeue), makes the run checkpoint and stop. `branched`:
        `resume_state` is another run's (--from-step): this new run takes its weights,
        optimizer state, position and random streams, but its own config's optimizer
        settings and schedule, a fresh best and early-stopping count, and logs from there. `archive`: rank 0's
        archive.Mirror, told of every durable checkpoint (None: no archive)."""
        self.config = config
        self.device = device
        self.context = context
        self.datasets = datasets
        self.loss_function = loss_function
        self.commit, self.config_hash = commit, config_hash
        self.show_progress = show_progress and context.is_main
        os.environ.setdefault("MPLBACKEND", "Agg")  # figures are drawn without a display

        self.model = model.to(device)
        self.train_model = (  # what training calls: the DDP wrapper when distributed
            DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            if context.enabled
            else model
        )
        self.optimizer = model.configure_optimizer(config.optimizer)
        self.batches_per_epoch = math.ceil(self._sampler("train").per_rank / config.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.gradient_accumulation_steps)
        # The schedule's length: kept from the first attempt when a resume extends `epochs` or `max_steps`.
        self.schedule_steps = config.scheduler.total_steps or config.max_steps or self.steps_per_epoch * config.epochs
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])  # the schedule scales this
        self.set_learning_rate(0)
        use_amp = device.type == "cuda" and config.mixed_precision != "off"
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
        # float16 gradients need loss scaling against underflow; bfloat16 and float32 do not.
        self.scaler = torch.amp.GradScaler("cuda") if use_amp and config.mixed_precision == "fp16" else None
        self.use_amp = use_amp
        if config.mixed_precision != "off" and not use_amp:
            print(f"note: mixed_precision={config.mixed_precision} applies on CUDA only; training in float32")

        self.progress = Progress()
        stopping = config.early_stopping
        self.monitor = Monitor(
            config.checkpoint.monitor or default_monitor(datasets),
            config.checkpoint.mode,
            stopping.patience,
            stopping.min_delta,
        )
        self.checkpoint_schedule = CheckpointSchedule(config, context)
        self.preemption = PreemptionStop(preemption, config.log_every_n_steps, context) if preemption else None
        # Running training sums since the last log line: the loss and its terms (per batch) and,
        # with `train_metrics`, your metrics (per sample); the loss since the epoch began.
        self.interval_sums: dict[str, torch.Tensor] = {}
        self.interval_metrics = SampleMeans(device)
        self.epoch_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.interval_batches = self.epoch_batches = 0
        self.interval_started, self.interval_samples = time.monotonic(), 0  # throughput (wall clock)
        self.grad_norm: torch.Tensor | None = None  # before clipping, at logging steps
        self.user_metrics = type(model).metrics is not BaseModel.metrics
        self.user_split_metrics = type(model).split_metrics is not BaseModel.split_metrics
        self.user_figures = type(model).figures is not BaseModel.figures
        self.checkpointed_step = -1
        self.stop_reason: str | None = None
        # The one switch for logging: the same on every rank (rank 0 alone holds the writers).
        # Opened before the random streams are restored: no library it starts may draw from them.
        continued = None if branched else resume_state  # a branch's log starts empty, at step N+1
        self.files = RunFiles.open(run_directory, context, continued, config, archive) if run_directory else None
        if resume_state is not None:
            self.load_state_dict(resume_state, branched)

    # ------------------------------------------------------------------------------
    # The loop

    def fit(self) -> dict:
        """Train until `epochs`; return the last epoch's metrics. The run's files are closed
        at the end, also when training fails."""
        try:
            metrics = self._fit()
        except BaseException as error:
            with contextlib.suppress(Exception):  # the first error is the one to report
                self.close("killed" if isinstance(error, Preempted | KeyboardInterrupt) else "failed")
            raise
        self.close("finished")
        return metrics

    def _fit(self) -> dict:
        config, progress = self.config, self.progress
        metrics = {}
        if config.evaluate_before_training and progress == Progress():
            started = time.monotonic()
            baseline = self.log_evaluation(epoch=0)  # step 0, epoch 0
            self.print_summary(baseline, False, time.monotonic() - started)
        while not self.steps_done() and not self.monitor.stop_reason():
            started = time.monotonic()
            metrics = {"train/epoch_loss": self.train_one_epoch()}
            self.log(progress.epoch + 1, metrics | {"train/epoch_seconds": time.monotonic() - started})
            metrics |= self.log_evaluation(epoch=progress.epoch + 1)
            if progress.batch_in_epoch == self.batches_per_epoch:  # else max_steps stopped it mid-epoch
                progress.epoch += 1
                progress.batch_in_epoch = 0
            improved = self.monitor.update(metrics, progress.global_step, progress.epoch)
            self.save_checkpoint(links=("last", "best") if improved else ("last",))
            self.print_summary(metrics, improved, time.monotonic() - started)
            if self.preemption and self.preemption.due(progress.global_step, at_epoch_end=True):
                self.stop_for_preemption()
        self.stop_reason = self.monitor.stop_reason() or (
            f"reached max_steps {config.max_steps}" if config.max_steps else f"finished all {config.epochs} epochs"
        )
        if self.context.is_main:
            if self.files is not None:
                update_metadata(self.files.directory, stop_reason=self.stop_reason)
            if self.stop_reason.startswith("early stopping"):
                tqdm.write(f"stopped after epoch {progress.epoch}: {self.stop_reason}")
        if self.context.enabled:
            self.check_replicas()
        return metrics

    def steps_done(self) -> bool:
        """`max_steps` (optimizer steps in all) when set, else `epochs`, ends the training."""
        if self.config.max_steps:
            return self.progress.global_step >= self.config.max_steps
        return self.progress.epoch >= self.config.epochs

    def check_monitor(self) -> None:
        """`checkpoint.monitor` must name a value of an evaluation (val/..., rollout/...) or
        train/epoch_loss: what is known at each epoch's end. Names your model's hooks and loss add
        are known only once they ran: then one batch of the monitored phase tells them."""
        monitor = self.monitor.metric
        known = {"train/epoch_loss"} | {f"{phase}/loss" for phase in self.datasets if phase != "train"}
        phase = monitor.partition("/")[0]
        if monitor not in known and phase in EVALUATION_PHASE_NAMES and phase in self.datasets:
            known |= set(self.evaluate(phase, probe=True)[0])
        if monitor not in known:
            during_training = " (other training values are logged between evaluations)" if phase == "train" else ""
            raise UserError(
                f"config key 'checkpoint.monitor': {monitor!r} is not a metric of this run's evaluations"
                + during_training
                + nearest(monitor, known)
                + f" (it can monitor: {', '.join(sorted(known))})"
            )

    def close(self, status: str = "finished") -> None:
        """Finish the checkpoint write in flight and close the logs (rank 0)."""
        if self.files is not None:
            self.files.close(status)

    def check_replicas(self) -> None:
        """Under DDP every rank must end with the same weights; record each rank's hash."""
        digest = hashlib.sha256()
        for parameter in self.model.parameters():
            digest.update(parameter.detach().cpu().numpy().tobytes())
        digests = all_gather_object(digest.hexdigest(), self.context)
        if self.files is not None and self.context.is_main:
            update_metadata(self.files.directory, replica_parameters_sha256=digests)
        if len(set(digests)) != 1:
            raise RuntimeError(f"the ranks' parameters differ after training (SHA-256 per rank: {digests})")

    def train_one_epoch(self) -> float:
        config, progress = self.config, self.progress
        accumulation = config.gradient_accumulation_steps
        start = progress.batch_in_epoch
        _, batches = self.loader("train", epoch=progress.epoch, skip_batches=start)
        bar = self.bar(self.batches_per_epoch, start, f"epoch {progress.epoch + 1}/{config.epochs} train")
        self.train_model.train()
        for batch_index, batch in enumerate(batches, start=start):
            group_start = batch_index - batch_index % accumulation
            group_size = min(accumulation, self.batches_per_epoch - group_start)
            steps_now = batch_index + 1 == group_start + group_size  # the group's last batch
            with self.no_sync(not steps_now), self.autocast():
                losses, prediction, target, inputs = self.forward(self.train_model, batch)
            loss = losses["loss"]
            self.backward(loss / group_size if group_size > 1 else loss)
            for name, value in losses.items():  # the loss and its terms, summed per batch
                total = self.interval_sums.get(name)
                if total is None:
                    total = self.interval_sums[name] = torch.zeros((), dtype=torch.float64, device=self.device)
                total += value.detach()
            self.epoch_loss += loss.detach()
            self.interval_batches += 1
            self.epoch_batches += 1
            self.interval_samples += len(target)
            if self.config.train_metrics and self.user_metrics:
                with torch.no_grad():
                    self.add_metrics(self.interval_metrics, prediction, target, inputs)
            progress.batch_in_epoch = batch_index + 1
            if steps_now:
                self.optimizer_step()
                faults.maybe_fail("train_step", settle=self.settle_before_fault)
                if self.files is not None and self.files.checkpoints is not None and self.files.checkpoints.failed:
                    self.files.wait()  # a background write failed (disk full): stop now, with its error
                if progress.global_step % config.log_every_n_steps == 0:
                    self.log_training(bar)
                if config.max_steps and progress.global_step >= config.max_steps:
                    bar.update()
                    break
                if progress.batch_in_epoch < self.batches_per_epoch:  # the epoch's end saves anyway
                    if self.preemption and self.preemption.due(progress.global_step):
                        self.stop_for_preemption()
                    if self.files is not None and self.checkpoint_schedule.due(progress.global_step):
                        self.save_checkpoint(links=("last",))
            bar.update()
        bar.close()
        loss = float(self.reduce_mean(self.epoch_loss.reshape(1), self.epoch_batches)[0])
        if progress.batch_in_epoch == self.batches_per_epoch:  # a resumed partial epoch goes on summing
            self.epoch_loss.zero_()
            self.epoch_batches = 0
        return loss

    def forward(
        self, model: torch.nn.Module, batch: dict
    ) -> tuple[dict[str, torch.Tensor], object, torch.Tensor, dict]:
        """The batch's `supervision` is the target; its other entries go to `forward` by name.
        Returns the loss (and its terms), the prediction, the target and the inputs."""
        batch = {name: value.to(self.device, non_blocking=True) for name, value in batch.items()}
        supervision = batch.pop("supervision")
        prediction = model(**batch)
        target = self.model.transform(supervision)
        return split_loss(self.loss_function(prediction, target)), prediction, target, batch

    def compute_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The loss that is minimised, for one batch."""
        return self.forward(model, batch)[0]["loss"]

    def add_metrics(self, means: SampleMeans, prediction, target: torch.Tensor, inputs: dict, keep=None) -> None:
        """Your model's per-sample metrics of a batch, into sample-weighted sums (and `keep`)."""
        samples = len(target)
        values = {
            name: per_sample(name, value, samples)
            for name, value in self.model.metrics(prediction, target, inputs).items()
        }
        for name, value in values.items():
            if not name.startswith("_"):
                means.add(name, value.sum(), samples)
        if keep is not None:
            keep.add(values)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def optimizer_step(self) -> None:
        """One optimizer step (clipping first, when configured); then the next step's learning rate.
        At logging steps the gradients' norm before clipping is kept for `train/grad_norm`."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        logs_now = (self.progress.global_step + 1) % self.config.log_every_n_steps == 0
        if self.config.gradient_clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.gradient_clip_norm)
            self.grad_norm = norm.detach() if logs_now else None
        elif logs_now:
            gradients = [p.grad for p in self.model.parameters() if p.grad is not None]
            self.grad_norm = torch.nn.utils.get_total_norm(gradients) if gradients else None
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.global_step += 1
        self.set_learning_rate(self.progress.global_step)

    def set_learning_rate(self, step: int) -> None:
        factor = lr_factor(step, self.config.scheduler, self.schedule_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    @torch.no_grad()
    def evaluate(
        self, phase: str, probe: bool = False, on_batch: Callable | None = None
    ) -> tuple[dict[str, float], list[dict]]:
        """Validation ("val") or rollout ("rollout"): the loss, its terms and your metrics, as
        sample-weighted means over all ranks (plus your whole-split metrics), and each batch's
        loss. Runs on its own random streams (see seeding.py). `probe`: one batch only, to
        learn the names logged (nothing drawn, no fault point). `on_batch(prediction, target,
        inputs)`: called with each batch (--evaluate --save-outputs)."""
        limit = self.config.rollout.max_samples if phase == "rollout" else None
        if probe:
            limit = min(limit or math.inf, self.config.eval_batch_size or self.config.batch_size)
        loader, batches = self.loader(phase, limit=limit)
        mode = self.model.rollout() if phase == "rollout" else contextlib.nullcontext()
        means = SampleMeans(self.device)
        split = SplitSamples() if self.user_split_metrics else None
        draws = phase == "rollout" and self.user_figures and self.context.is_main and self.files and not probe
        batch_results = []
        self.model.eval()
        with isolated_rng(derive_seed(self.config.seed, phase, self.context.rank)), mode, self.autocast():
            for batch in self.bar(len(loader), 0, phase, batches):
                losses, prediction, target, inputs = self.forward(self.model, batch)
                samples = len(target)
                for name, value in losses.items():
                    means.add(name, value.detach().double() * samples, samples)
                if self.user_metrics:
                    self.add_metrics(means, prediction, target, inputs, keep=split)
                if draws:
                    self.draw_figures(phase, prediction, target, inputs)
                    draws = False
                if on_batch is not None:
                    on_batch(prediction, target, inputs)
                batch_results.append({"samples": samples, "loss": losses["loss"].detach()})
                if not probe:
                    faults.maybe_fail(phase, settle=self.settle_before_fault)
        self.model.train()
        metrics = {f"{phase}/{name}": value for name, value in means.reduce(self.context).items()}
        if split is not None:
            metrics |= {f"{phase}/{name}": float(value) for name, value in self.split_metrics(split).items()}
        details = [{"samples": item["samples"], "loss": item["loss"].item()} for item in batch_results]
        return metrics, details

    def split_metrics(self, split: SplitSamples) -> dict[str, float]:
        """Your whole-split metrics, computed on rank 0 from every rank's samples."""
        samples = split.gather(self.context)
        values = self.model.split_metrics(samples) if self.context.is_main else None
        return broadcast_object(values, self.context)

    def draw_figures(self, phase: str, prediction, target: torch.Tensor, inputs: dict) -> None:
        """Your model's figures of this batch, to TensorBoard and RUN_DIR/figures/<phase>/ (rank 0)."""
        for name, figure in self.model.figures(prediction, target, inputs).items():
            png = figure_png(name, figure)
            self.files.logger.log_image(self.progress.global_step, phase, name, png)

    # ------------------------------------------------------------------------------
    # Logging, best tracking, checkpoints

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.files is None or self.files.logger is None:
            return
        by_phase: dict[str, dict[str, float]] = {}
        for key, value in metrics.items():
            phase, _, name = key.partition("/")
            by_phase.setdefault(phase, {})[name] = value
        for phase, values in by_phase.items():
            self.files.logger.log(self.progress.global_step, epoch, phase, values)

    def log_training(self, bar) -> None:
        """The means since the last log line (over every rank), the learning rate, the gradients'
        norm and the throughput."""
        names = sorted(self.interval_sums)
        sums = torch.stack([self.interval_sums[name] for name in names])
        means = self.reduce_mean(sums, self.interval_batches)
        values = {f"train/{name}": float(value) for name, value in zip(names, means, strict=True)}
        values |= {f"train/{name}": value for name, value in self.interval_metrics.reduce(self.context).items()}
        values["train/lr"] = self.optimizer.param_groups[0]["lr"]
        if self.grad_norm is not None:
            values["train/grad_norm"] = self.grad_norm.item()
        seconds = time.monotonic() - self.interval_started
        values["train/samples_per_second"] = self.interval_samples * self.context.world_size / max(seconds, 1e-9)
        for total in self.interval_sums.values():
            total.zero_()
        self.interval_metrics = SampleMeans(self.device)
        self.interval_batches = self.interval_samples = 0
        self.interval_started = time.monotonic()
        self.log(self.progress.epoch + 1, values)
        bar.set_postfix(loss=f"{values['train/loss']:.4g}", refresh=False)

    def log_evaluation(self, epoch: int) -> dict[str, float]:
        """Run and log the validation and (when due) rollout phases."""
        metrics = {}
        if "val" in self.datasets:
            metrics |= self.evaluate("val")[0]
        if "rollout" in self.datasets and self.rollout_due(epoch):
            metrics |= self.evaluate("rollout")[0]
        self.log(epoch, metrics)
        return metrics

    def rollout_due(self, epoch: int) -> bool:
        """Every `rollout.every_n_epochs` epochs, before training, and at the end of training."""
        every = self.config.rollout.every_n_epochs
        return epoch == 0 or epoch % every == 0 or epoch == self.config.epochs or self.steps_done()

    def stop_for_preemption(self) -> None:
        if (
            self.files is not None and self.progress.global_step != self.checkpointed_step
        ):  # the epoch end may have saved
            self.save_checkpoint(links=("last",))
        self.wait_for_checkpoints()
        raise Preempted(f"stopped for preemption at step {self.progress.global_step}, after a checkpoint")

    def settle_before_fault(self) -> None:
        """A crash test's fault acts once the checkpoint in flight (and its upload) is done."""
        if self.files is not None:
            self.files.settle()

    def wait_for_checkpoints(self) -> None:
        """Until the checkpoint write in flight is on disk (rank 0; a no-op elsewhere)."""
        if self.files is not None:
            self.files.wait()

    def save_checkpoint(self, links: tuple[str, ...]) -> None:
        if self.files is None:
            return
        best = self.monitor.best
        if "best" in links:
            best["checkpoint"] = "checkpoints/best.pt"
            best["step_file"] = f"checkpoints/{step_file_name(self.progress.global_step)}"
        state = self.state_dict()  # a collective under DDP: every rank gives its random state
        self.checkpoint_schedule.saved()
        self.checkpointed_step = self.progress.global_step
        if not self.context.is_main:
            return
        metadata = {
            "epochs_done": self.progress.epoch,
            "global_step": self.progress.global_step,
            "schedule_steps": self.schedule_steps,
            "best": dict(best),
        }

        def written(path: Path) -> None:  # on the writer's thread, once the file is on disk
            update_metadata(path.parent.parent, last_checkpoint=f"checkpoints/{path.name}", **metadata)

        self.files.checkpoints.save(state, links, on_written=written, sync_first=(self.files.logger.fileno(),))

    # ------------------------------------------------------------------------------
    # State: everything a checkpoint holds

    def state_dict(self) -> dict:
        own = {
            "rng": rng_state(),
            "running": {
                "interval_sums": dict(self.interval_sums),
                "interval_batches": self.interval_batches,
                "interval_metrics": dict(self.interval_metrics.sums),
                "epoch_loss": self.epoch_loss,
                "epoch_batches": self.epoch_batches,
            },
        }
        per_rank = all_gather_object(own, self.context)  # every rank's random state, for an exact DDP resume
        logger = self.files.logger if self.files is not None else None
        return {
            "format": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "progress": asdict(self.progress),
            "schedule_steps": self.schedule_steps,
            "best": dict(self.monitor.best),
            "monitor": self.monitor.state_dict(),
            "per_rank": per_rank,
            "logging": {"metrics_bytes": logger.flush() if logger else 0},  # fsynced before the checkpoint shows
            "world_size": self.context.world_size,
            "commit": self.commit,
            "config_hash": self.config_hash,
        }

    def load_state_dict(self, state: dict, branched: bool = False) -> None:
        self.model.load_state_dict(state["model"])
        configured = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        if branched:  # the branch's own optimizer settings (a lower lr...), not the parent's
            for group, settings in zip(self.optimizer.param_groups, configured, strict=True):
                group.update(settings)
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        if state["world_size"] != self.context.world_size:  # not exact: continue at the same share of the epoch
            self.progress.batch_in_epoch = rescaled_position(
                self.progress.batch_in_epoch,
                state["world_size"],
                self.context.world_size,
                self.config.gradient_accumulation_steps,
                self.batches_per_epoch,
            )
        if not branched:  # a branch's schedule follows its own config, from step 0
            self.schedule_steps = state["schedule_steps"]
            self.monitor.load_state_dict(state.get("monitor") or {"best": state["best"]})
        self.set_learning_rate(self.progress.global_step)
        planned = self.config.max_steps or self.steps_per_epoch * self.config.epochs
        stalled = zero_lr_extension(self.config.scheduler, self.schedule_steps, planned)
        if stalled and self.context.is_main and not branched:
            warn(stalled)
        own = state["per_rank"][self.context.rank % len(state["per_rank"])]
        running = own["running"]
        self.interval_sums = {name: value.to(self.device) for name, value in running["interval_sums"].items()}
        self.interval_metrics.sums = {
            name: value.to(self.device) for name, value in running["interval_metrics"].items()
        }
        self.epoch_loss = running["epoch_loss"].to(self.device)
        self.interval_batches, self.epoch_batches = running["interval_batches"], running["epoch_batches"]
        restore_rng_state(own["rng"])  # last: nothing may draw random numbers after this

    # ------------------------------------------------------------------------------
    # Small helpers

    def _sampler(self, phase: str, **kwargs) -> EpochSampler:
        return EpochSampler(
            len(self.datasets[phase][1]),
            shuffle=phase == "train",
            seed=self.config.seed,
            rank=self.context.rank,
            world_size=self.context.world_size,
            **kwargs,
        )

    def loader(self, phase: str, epoch: int = 0, skip_batches: int = 0, limit: int | None = None):
        dataset_class, dataset = self.datasets[phase]
        batch_size = self.config.batch_size
        if phase != "train" and self.config.eval_batch_size:
            batch_size = self.config.eval_batch_size
        return make_loader(
            dataset_class,
            dataset,
            batch_size=batch_size,
            shuffle=phase == "train",
            seed=self.config.seed,
            phase=BY_NAME[phase].split,  # the workers' seeds, as named before the phases had one name
            epoch=epoch,
            rank=self.context.rank,
            world_size=self.context.world_size,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            limit=limit,
            skip_batches=skip_batches,
        )

    def reduce_mean(self, sums: torch.Tensor, batches: int) -> torch.Tensor:
        """Per-batch sums as means over the batches of every rank (a sync point: called at
        logging steps and epoch ends only)."""
        count = torch.tensor([float(batches)], dtype=torch.float64, device=self.device)
        reduced = all_reduce_sum(torch.cat([sums.reshape(-1), count]), self.context)
        return (reduced[:-1] / reduced[-1]).cpu()

    def autocast(self):
        if not self.use_amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def no_sync(self, skip_gradient_sync: bool):
        """Under DDP, accumulate gradients locally until the group's last batch."""
        if skip_gradient_sync and self.context.enabled:
            return self.train_model.no_sync()
        return contextlib.nullcontext()

    def bar(self, total: int, initial: int, description: str, iterable=None):
        return tqdm(
            iterable,
            total=total,
            initial=initial,
            desc=description,
            disable=not self.show_progress,
            leave=False,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def print_summary(self, metrics: dict[str, float], improved: bool, seconds: float) -> None:
        if not self.context.is_main:
            return
        values = "  ".join(f"{key} {value:.4g}" for key, value in metrics.items())
        mark = f"  * best {self.monitor.metric}" if improved else ""
        where = f"epoch {self.progress.epoch}/{self.config.epochs}  step {self.progress.global_step}"
        tqdm.write(f"{where}  {values}  ({seconds:.3g} s){mark}")
