"""The Trainer: per epoch, (1) training, (2) a cheap validation pass, (3) an expensive rollout.

Read `fit` and `train_one_epoch` from top to bottom: they are the whole loop. The parts
it is given each own their state and save it themselves: the stepper (precision,
accumulation, clipping, learning rate), the evaluator (the two evaluation phases), the
run's output (logs, figures, checkpoints, console); the Trainer adds the meter (running
sums), the monitor (best checkpoint, early stopping) and where training stands. The data
order is a pure function of (seed, epoch), so a position in the epoch is just a batch count.

What is logged, and when: README, "Run directory" and "Your own metrics".
"""

import contextlib
import hashlib
import time
from dataclasses import asdict, dataclass

import torch

from src.core import faults
from src.core.config.validation import Config
from src.core.distributed import DistContext, all_gather_object, share_from_rank_zero
from src.core.errors import warn
from src.core.record.checkpoint import FORMAT_VERSION, step_file_name
from src.core.seeding import restore_rng_state, rng_state
from src.core.training.build import Task, build_task
from src.core.training.data import Loaders
from src.core.training.evaluator import Evaluator
from src.core.training.measures import add_model_metrics, overrides
from src.core.training.meter import Meter
from src.core.training.output import NullOutput
from src.core.training.policies import CheckpointSchedule, Monitor, Preempted, PreemptionStop, PruningStop, Stops
from src.core.training.schedule import zero_lr_extension
from src.core.training.start import FRESH, Start
from src.core.training.stepper import Stepper, steps_per_epoch
from src.core.training.system import WaitClock, system_metrics

BUILT_IN_MONITORS = (None, "train/epoch_loss", "val/loss", "rollout/loss")


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


def check_monitor_before_training(config: Config, task: Task, context: DistContext) -> None:
    """Fail on a misspelled `checkpoint.monitor` before the run directory exists: rank 0 probes
    one batch when the name is not a built-in one (an exit-2 error then reaches every rank)."""
    if config.checkpoint.monitor in BUILT_IN_MONITORS:
        return
    alone = DistContext(device=context.device)  # rank 0 alone: no collective

    def probe() -> None:
        Evaluator(config, task, Loaders(config, task.datasets, alone), alone).check_monitor(config.checkpoint.monitor)

    share_from_rank_zero(context, "monitor-checked", probe)


def check_monitor_before_launch(config: Config, data_directory: str, mini: bool) -> None:
    """The same check in the process that starts torchrun, on the CPU, before any worker: a
    worker's exit 2 would be retried `distributed.max_restarts` times, each saying the same."""
    if config.checkpoint.monitor in BUILT_IN_MONITORS:
        return
    cpu = DistContext(device=torch.device("cpu"))
    check_monitor_before_training(config, build_task(config, data_directory, mini, cpu.device), cpu)


def build_trainer(
    config: Config, task: Task, context: DistContext, output: NullOutput | None = None, stops: Stops | None = None
) -> "Trainer":
    """The Trainer and the parts it is given, as run.py assembles them. `output`: the run's
    (None: nothing is logged); `stops`: a preemption event, a search trial's pruning."""
    output = output if output is not None else NullOutput()
    loaders = Loaders(config, task.datasets, context)
    steps = steps_per_epoch(loaders.batches_per_epoch(), config.gradient_accumulation_steps)
    stepper = Stepper(config, task.model, task.loss_function, context, steps)
    evaluator = Evaluator(config, task, loaders, context, output)
    return Trainer(config, loaders, stepper, evaluator, output, stops)


def rescaled_position(
    batch_in_epoch: int, saved_world_size: int, world_size: int, accumulation: int, batches: int
) -> int:
    """A position in the epoch saved with another number of processes, in this run's batches:
    as many samples seen, rounded down to a whole accumulation group (a few repeat, none is skipped)."""
    position = batch_in_epoch * saved_world_size // world_size
    return min(position - position % accumulation, batches)


class Trainer:
    def __init__(
        self,
        config: Config,
        loaders: Loaders,
        stepper: Stepper,
        evaluator: Evaluator,
        output: NullOutput,
        stops: Stops | None = None,
    ):
        """`output`: the run's (a NullOutput where nothing is logged). `stops`: a preemption event
        that, once set (SIGUSR1 under --requeue), makes the run checkpoint and stop, and a search
        trial's pruning (policies.Stops)."""
        self.config, self.loaders, self.output = config, loaders, output
        self.stepper, self.evaluator = stepper, evaluator
        self.model, self.context = stepper.model, stepper.context  # the stepper holds where training runs
        self.batches_per_epoch = loaders.batches_per_epoch()
        self.steps_per_epoch = steps_per_epoch(self.batches_per_epoch, config.gradient_accumulation_steps)
        self.progress = Progress()
        self.meter = Meter(self.context)
        stopping = config.early_stopping
        monitored = config.checkpoint.monitor or default_monitor(loaders.datasets)
        self.monitor = Monitor(monitored, config.checkpoint.mode, stopping.patience, stopping.min_delta)
        self.checkpoint_schedule = CheckpointSchedule(config, self.context)
        stops = stops or Stops()
        preemption = stops.preemption
        self.preemption = PreemptionStop(preemption, config.log_every_n_steps, self.context) if preemption else None
        self.pruning = PruningStop(stops.pruning, self.context) if stops.pruning else None
        self.train_metrics = config.train_metrics and overrides(self.model, "metrics")
        self.checkpointed_step = -1
        self.stop_reason: str | None = None
        self.data_wait_seconds = 0.0  # of the last training epoch: inside the data loader's __next__

    # ------------------------------------------------------------------------------
    # The loop

    def fit(self, start: Start = FRESH) -> dict:
        """Train from `start` until `epochs` (or `max_steps`); return the last epoch's metrics.
        The run's output is closed at the end, also when training fails."""
        try:
            start.restore(self)
            metrics = self._fit()
        except BaseException as error:
            with contextlib.suppress(Exception):  # the first error is the one to report
                self.output.close("killed" if isinstance(error, Preempted | KeyboardInterrupt) else "failed")
            raise
        self.output.close("finished")
        return metrics

    def _fit(self) -> dict:
        config, progress = self.config, self.progress
        metrics = {}
        if config.evaluate_before_training and progress == Progress():
            started = time.monotonic()
            baseline = self.evaluate_and_log(epoch=0)  # step 0, epoch 0
            self.print_summary(baseline, False, time.monotonic() - started)
        while not self.steps_done() and not self.monitor.stop_reason():
            started = time.monotonic()
            metrics = {"train/epoch_loss": self.train_one_epoch()}
            seconds = time.monotonic() - started
            machine = system_metrics(self.data_wait_seconds, seconds, self.context.device)  # system/...
            timing = {"train/epoch_seconds": seconds, **machine}
            self.output.log(progress.global_step, progress.epoch + 1, metrics | timing)
            metrics |= self.evaluate_and_log(epoch=progress.epoch + 1)
            if progress.batch_in_epoch == self.batches_per_epoch:  # else max_steps stopped it mid-epoch
                progress.epoch += 1
                progress.batch_in_epoch = 0
            improved = self.monitor.update(metrics, progress.global_step, progress.epoch)
            self.save_checkpoint(links=("last", "best") if improved else ("last",))
            self.print_summary(metrics, improved, time.monotonic() - started)
            if self.preemption and self.preemption.due(progress.global_step, at_epoch_end=True):
                self.stop_for_preemption()
            pruned = self.pruning and self.pruning.reason(
                metrics, progress.epoch, progress.global_step, self.monitor.metric
            )
            if pruned:  # a search's pruner: stop as early stopping does, after the epoch's checkpoint
                self.stop_reason = pruned
                break
        self.stop_reason = (
            self.stop_reason
            or self.monitor.stop_reason()
            or (f"reached max_steps {config.max_steps}" if config.max_steps else f"finished all {config.epochs} epochs")
        )
        self.output.record(stop_reason=self.stop_reason)
        if self.stop_reason.startswith(("early stopping", "pruned")):
            self.output.console.line(f"stopped after epoch {progress.epoch}: {self.stop_reason}")
        if self.context.enabled:
            self.check_replicas()
        return metrics

    def train_one_epoch(self) -> float:
        config, progress = self.config, self.progress
        accumulation = config.gradient_accumulation_steps
        start = progress.batch_in_epoch
        _, loader_batches = self.loaders.loader("train", epoch=progress.epoch, skip_batches=start)
        batches = WaitClock(loader_batches)  # system/data_wait_fraction: is the model starved?
        bar = self.output.console.bar(
            self.batches_per_epoch, start, f"epoch {progress.epoch + 1}/{config.epochs} train"
        )
        self.stepper.train_model.train()
        for batch_index, batch in enumerate(batches, start=start):
            group_start = batch_index - batch_index % accumulation
            group_size = min(accumulation, self.batches_per_epoch - group_start)
            steps_now = batch_index + 1 == group_start + group_size  # the group's last batch
            losses, prediction, target, inputs = self.stepper.forward(batch, sync=steps_now)
            self.stepper.backward(losses["loss"], group_size)
            self.meter.add(losses, len(target))
            if self.train_metrics:
                with torch.no_grad():
                    add_model_metrics(self.model, self.meter.interval_metrics, prediction, target, inputs)
            progress.batch_in_epoch = batch_index + 1
            if steps_now:
                self.stepper.step(progress.global_step)
                progress.global_step += 1
                faults.maybe_fail("train_step", settle=self.output.settle)
                self.output.check_writes()  # a background write failed (disk full): stop now, with its error
                if progress.global_step % config.log_every_n_steps == 0:
                    self.log_training(bar)
                if config.max_steps and progress.global_step >= config.max_steps:
                    bar.update()
                    break
                if progress.batch_in_epoch < self.batches_per_epoch:  # the epoch's end saves anyway
                    if self.preemption and self.preemption.due(progress.global_step):
                        self.stop_for_preemption()
                    if self.output.run_logs and self.checkpoint_schedule.due(progress.global_step):
                        self.save_checkpoint(links=("last",))
            bar.update()
        bar.close()
        self.data_wait_seconds = batches.waited
        return self.meter.epoch_mean(epoch_done=progress.batch_in_epoch == self.batches_per_epoch)

    def steps_done(self) -> bool:
        """`max_steps` (optimizer steps in all) when set, else `epochs`, ends the training."""
        if self.config.max_steps:
            return self.progress.global_step >= self.config.max_steps
        return self.progress.epoch >= self.config.epochs

    # ------------------------------------------------------------------------------
    # Evaluation, logging, checkpoints

    def evaluate_and_log(self, epoch: int) -> dict[str, float]:
        """Run and log the validation and (when due) rollout phases."""
        metrics = {}
        for phase in self.evaluator.phases:
            if phase == "val" or self.rollout_due(epoch):
                metrics |= self.evaluator.evaluate(phase, step=self.progress.global_step)[0]
        self.output.log(self.progress.global_step, epoch, metrics)
        return metrics

    def rollout_due(self, epoch: int) -> bool:
        """Every `rollout.every_n_epochs` epochs, before training, and at the end of training."""
        every = self.config.rollout.every_n_epochs
        return epoch == 0 or epoch % every == 0 or epoch == self.config.epochs or self.steps_done()

    def log_training(self, bar) -> None:
        """The means since the last log line (over every rank), the learning rate, the gradients'
        norm and the throughput."""
        values = self.meter.interval()
        values["train/lr"] = self.stepper.learning_rate
        if self.stepper.grad_norm is not None:
            values["train/grad_norm"] = self.stepper.grad_norm.item()
        self.output.log(self.progress.global_step, self.progress.epoch + 1, values)
        bar.set_postfix(loss=f"{values['train/loss']:.4g}", refresh=False)

    def save_checkpoint(self, links: tuple[str, ...]) -> None:
        if not self.output.run_logs:
            return
        best = self.monitor.best
        if "best" in links:
            best["checkpoint"] = "checkpoints/best.pt"
            best["step_file"] = f"checkpoints/{step_file_name(self.progress.global_step)}"
        state = self.state_dict()  # a collective under DDP: every rank gives its random state
        self.checkpoint_schedule.saved()
        self.checkpointed_step = self.progress.global_step
        metadata = {
            "epochs_done": self.progress.epoch,
            "global_step": self.progress.global_step,
            "schedule_steps": self.stepper.schedule_steps,
            "best": dict(best),
        }
        self.output.save_checkpoint(state, links, metadata)

    def stop_for_preemption(self) -> None:
        if self.progress.global_step != self.checkpointed_step:  # the epoch end may have saved
            self.save_checkpoint(links=("last",))
        self.output.wait()
        raise Preempted(f"stopped for preemption at step {self.progress.global_step}, after a checkpoint")

    def check_replicas(self) -> None:
        """Under DDP every rank must end with the same weights; record each rank's hash."""
        digest = hashlib.sha256()
        for parameter in self.model.parameters():
            digest.update(parameter.detach().cpu().numpy().tobytes())
        digests = all_gather_object(digest.hexdigest(), self.context)
        self.output.record(replica_parameters_sha256=digests)
        if len(set(digests)) != 1:
            raise RuntimeError(f"the ranks' parameters differ after training (SHA-256 per rank: {digests})")

    def print_summary(self, metrics: dict[str, float], improved: bool, seconds: float) -> None:
        values = "  ".join(f"{key} {value:.4g}" for key, value in metrics.items())
        mark = f"  * best {self.monitor.metric}" if improved else ""
        where = f"epoch {self.progress.epoch}/{self.config.epochs}  step {self.progress.global_step}"
        self.output.console.line(f"{where}  {values}  ({seconds:.3g} s){mark}")

    # ------------------------------------------------------------------------------
    # State: a checkpoint, assembled from the parts' own state

    def state_dict(self) -> dict:
        own = {"rng": rng_state(), "running": self.meter.state_dict()}
        return {
            "format": FORMAT_VERSION,
            "model": self.model.state_dict(),
            **self.stepper.state_dict(),  # optimizer, scaler, schedule_steps
            "progress": asdict(self.progress),
            "best": dict(self.monitor.best),
            "monitor": self.monitor.state_dict(),
            "per_rank": all_gather_object(own, self.context),  # every rank's, for an exact DDP resume
            "world_size": self.context.world_size,
            **self.output.state_dict(),  # metrics.jsonl's length, the commit, the config's hash
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue a run from its own checkpoint, exactly."""
        self.model.load_state_dict(state["model"])
        self.stepper.load_state_dict(state)
        self.monitor.load_state_dict(state.get("monitor") or {"best": state["best"]})
        self.restore_position(state)
        planned = self.config.max_steps or self.steps_per_epoch * self.config.epochs
        stalled = zero_lr_extension(self.config.scheduler, self.stepper.schedule_steps, planned)
        if stalled and self.context.is_main:
            warn(stalled)
        self.restore_rank_state(state)

    def load_branch(self, state: dict) -> None:
        """Start this new run from another run's checkpoint (see start.Branch)."""
        self.model.load_state_dict(state["model"])
        self.stepper.load_moments(state)
        self.restore_position(state)
        self.restore_rank_state(state)

    def restore_position(self, state: dict) -> None:
        self.progress = Progress(**state["progress"])
        if state["world_size"] != self.context.world_size:  # not exact: continue at the same share of the epoch
            self.progress.batch_in_epoch = rescaled_position(
                self.progress.batch_in_epoch,
                state["world_size"],
                self.context.world_size,
                self.config.gradient_accumulation_steps,
                self.batches_per_epoch,
            )
        self.stepper.set_learning_rate(self.progress.global_step)

    def restore_rank_state(self, state: dict) -> None:
        """This rank's running sums and random streams: last, since nothing may draw after this."""
        own = state["per_rank"][self.context.rank % len(state["per_rank"])]
        self.meter.load_state_dict(own["running"])
        restore_rng_state(own["rng"])
