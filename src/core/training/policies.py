"""The Trainer's decisions, each a small object it is given: which checkpoint is the best
(and whether to stop early), when to save between epoch ends, and when to stop for a
preemption. Under DDP rank 0 decides what depends on time or signals, for every rank."""

import math
import signal
import threading
import time

from src.core.config.validation import Config
from src.core.distributed import DistContext, broadcast_object


class Preempted(Exception):
    """A preemption warning arrived (--requeue): the run saved a checkpoint and stops here."""


def listen_for_preemption() -> threading.Event:
    """--requeue: an event set by Slurm's warning before the time limit (SIGUSR1)."""
    requested = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: requested.set())
    return requested


class Monitor:
    """Tracks the monitored metric (`checkpoint.monitor`, `checkpoint.mode`): its best value,
    for best.pt, and evaluations without improvement, for `early_stopping`. Its state is
    part of a checkpoint, so a resumed run decides exactly as an uninterrupted one."""

    def __init__(self, metric: str, mode: str, patience: int | None = None, min_delta: float = 0.0):
        self.metric, self.mode = metric, mode
        self.patience, self.min_delta = patience, min_delta
        self.best: dict = {"metric": metric, "mode": mode, "value": None, "step": None}
        self.evaluations_without_improvement = 0

    def update(self, metrics: dict[str, float], step: int, epoch: int) -> bool:
        """Whether `metrics` holds a new best value of the monitored metric."""
        value = metrics.get(self.metric)
        if value is None:
            return False  # not evaluated this epoch (rollout.every_n_epochs): no verdict either way
        best = self.best["value"]
        improved = math.isfinite(value) and (
            best is None or (value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta)
        )
        if improved:
            self.best.update(value=value, step=step, epoch=epoch)
            self.evaluations_without_improvement = 0
        else:
            self.evaluations_without_improvement += 1
        return improved

    def stop_reason(self) -> str | None:
        """Why to stop early (`early_stopping.patience` evaluations without improvement), or None."""
        if self.patience is None or self.evaluations_without_improvement < self.patience:
            return None
        return (
            f"early stopping: {self.metric} did not improve by more than {self.min_delta:g} "
            f"in {self.evaluations_without_improvement} evaluation(s) (patience {self.patience})"
        )

    def state_dict(self) -> dict:
        return {"best": dict(self.best), "evaluations_without_improvement": self.evaluations_without_improvement}

    def load_state_dict(self, state: dict) -> None:
        self.best = dict(state["best"])
        self.evaluations_without_improvement = state.get("evaluations_without_improvement", 0)


class CheckpointSchedule:
    """Mid-epoch checkpoints: every `checkpoint.every_n_steps` steps, or every
    `checkpoint_interval` seconds (checked at logging steps, where ranks meet anyway)."""

    def __init__(self, config: Config, context: DistContext):
        self.every_n_steps = config.checkpoint.every_n_steps
        self.interval = config.checkpoint_interval
        self.log_every = config.log_every_n_steps
        self.context = context
        self.last_save = time.monotonic()

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every_n_steps and step % self.every_n_steps == 0:
            return True
        if not self.interval or step % self.log_every:
            return False
        return broadcast_object(time.monotonic() - self.last_save >= self.interval, self.context)


class PreemptionStop:
    """Stop at the next step after `requested` is set (SIGUSR1 under --requeue); under DDP
    rank 0 decides, at logging steps and epoch ends."""

    def __init__(self, requested: threading.Event, log_every: int, context: DistContext):
        self.requested, self.log_every, self.context = requested, log_every, context

    def due(self, step: int, at_epoch_end: bool = False) -> bool:
        if not self.context.enabled:
            return self.requested.is_set()
        if not at_epoch_end and step % self.log_every:
            return False
        return broadcast_object(self.requested.is_set(), self.context)


class Stops:
    """What may stop a run before its end besides early stopping, as handed to the Trainer:
    `preemption`, an event set by Slurm's warning (SIGUSR1 under --requeue); `pruning`, a search
    trial's check `(metrics, epoch, step, monitored metric) -> stop reason or None`, asked
    after each evaluation (commands/search.py)."""

    def __init__(self, preemption: threading.Event | None = None, pruning=None):
        self.preemption, self.pruning = preemption, pruning


class PruningStop:
    """A search trial's pruning: after each epoch's evaluation the trial reports its objective and
    asks whether to stop, as early stopping does. Under DDP rank 0 asks and every rank follows."""

    def __init__(self, check, context: DistContext):
        self.check, self.context = check, context

    def reason(self, metrics: dict[str, float], epoch: int, step: int, monitored: str) -> str | None:
        answer = self.check(metrics, epoch, step, monitored) if self.context.is_main else None
        return broadcast_object(answer, self.context)
