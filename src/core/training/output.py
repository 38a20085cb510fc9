"""The run's output: what a logged run writes (metrics.jsonl, TensorBoard and trackers, figures,
checkpoints, metadata.yaml) and what it prints.

Rank 0 of a logged run writes through a `RunOutput`; the other ranks, and runs that log
nothing, get a `NullOutput`, whose writes do nothing, so the Trainer never asks which it
has. `run_logs` is the same on every rank of a run: checkpoints need every rank (each
gives its random state), although rank 0 alone writes them.
"""

from pathlib import Path

from src.core.config.validation import Config
from src.core.errors import warn
from src.core.record.checkpoint import CheckpointWriter, Retention
from src.core.record.rundir import update_metadata
from src.core.tracking.metrics import MetricLogger
from src.core.tracking.trackers import TRACKERS, Trackers
from src.core.training.console import QUIET, Console
from src.core.training.figures import FigureWriter
from src.core.training.measures import prepare_figure

# How long a checkpoint waits for the figures logged before it (a user's figure that takes longer,
# or a stuck helper, must not cost a preempted run its checkpoint).
FIGURE_WAIT_SECONDS = 60.0


class NullOutput:
    """Writes nothing; prints through `console` (disabled on ranks other than 0)."""

    keeps_figures = False

    def __init__(self, console: Console = QUIET, run_logs: bool = False):
        self.console, self.run_logs = console, run_logs

    def log(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def log_figures(self, step: int, phase: str, figures: dict) -> None:
        pass

    def save_checkpoint(self, state: dict, links: tuple[str, ...], metadata: dict) -> None:
        pass

    def record(self, **metadata) -> None:
        """Values for metadata.yaml (rank 0 of a logged run)."""

    def check_writes(self) -> None:
        """Raise the error of a background write that failed (a full disk), now rather than later."""

    def wait(self) -> None:
        """Until the checkpoint write in flight is on disk."""

    def settle(self) -> None:
        """Before a crash test's fault acts: the checkpoint in flight (and its upload) is done."""

    def close(self, status: str = "finished") -> None:
        pass

    def state_dict(self) -> dict:
        """What a checkpoint records of the run's output (rank 0's is the one written)."""
        return {"logging": {"metrics_bytes": 0}, "commit": None, "config_hash": None}


class RunOutput(NullOutput):
    """Rank 0 of a logged run: every value to metrics.jsonl, TensorBoard and the trackers,
    figures as PNG, checkpoints written in the background (and told to the archive's mirror)."""

    keeps_figures = True

    def __init__(
        self,
        directory: Path,
        logger: MetricLogger,
        trackers: Trackers | None,
        checkpoints: CheckpointWriter,
        console: Console,
        identity: dict,
    ):
        """`identity`: the run's commit and config hash, stamped into every checkpoint."""
        super().__init__(console, run_logs=True)
        self.directory, self.logger, self.trackers = directory, logger, trackers
        self.checkpoints, self.identity = checkpoints, identity
        self.figures = FigureWriter(self._write_figure)

    @classmethod
    def open(
        cls, directory: Path, config: Config, log_position: tuple[int, int], identity: dict, tracking: dict, mirror=None
    ) -> "RunOutput":
        """Open the run's writers. `log_position`: (bytes of metrics.jsonl, last step) a resumed run
        continues from ((0, -1): from the start). `tracking`: what the trackers receive of the run
        (config, provenance, the ids of their runs to continue). `mirror`: the archive's, or None."""
        metrics_bytes, step = log_position  # metrics.jsonl is cut back first: the trackers replay what it holds
        logger = MetricLogger(directory, metrics_bytes, step, "tensorboard" in config.loggers)
        trackers = None
        if any(name in TRACKERS for name in config.loggers):  # W&B, MLflow: the same run on a resume
            trackers = Trackers.open(
                config.loggers, directory, tracking["config"], tracking["provenance"], tracking.get("ids")
            )
            update_metadata(directory, trackers=trackers.ids())
        keep = config.checkpoint
        retention = Retention(keep.keep_recent, keep.keep_every_n_steps, keep.keep_every_n_epochs)
        checkpoints = CheckpointWriter(directory / "checkpoints", retention, archive=mirror)
        return cls(directory, logger, trackers, checkpoints, Console(progress_bar=config.progress_bar), identity)

    def log(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """`metrics` by `<phase>/<name>`."""
        by_phase: dict[str, dict[str, float]] = {}
        for key, value in metrics.items():
            phase, _, name = key.partition("/")
            by_phase.setdefault(phase, {})[name] = value
        for phase, values in by_phase.items():
            self.logger.log(step, epoch, phase, values)
        if self.trackers is not None:
            self.trackers.log_metrics(step, metrics)

    def log_figures(self, step: int, phase: str, figures: dict) -> None:
        """Checked here; encoded as PNG and written on the figure writer's thread."""
        for name, figure in figures.items():
            self.figures.put(step, phase, name, prepare_figure(name, figure))

    def _write_figure(self, step: int, phase: str, name: str, png: bytes) -> None:  # on the figures' thread
        self.logger.log_image(step, phase, name, png)
        if self.trackers is not None:
            self.trackers.log_image(step, f"{phase}/{name}", png)

    def save_checkpoint(self, state: dict, links: tuple[str, ...], metadata: dict) -> None:
        """Write `state` in the background; `metadata` goes into metadata.yaml once it is on disk."""

        figures_written = self.figures.barrier()
        step = state["progress"]["global_step"]

        def covered() -> None:  # on the writer's thread: what a resume from this checkpoint will not write again
            if not figures_written(timeout=FIGURE_WAIT_SECONDS):  # their images are in TensorBoard's queue once written
                warn(
                    f"the figures logged before the checkpoint of step {step} were not written within "
                    f"{FIGURE_WAIT_SECONDS:g} s; the checkpoint is kept without them (a resume from it would lack them)"
                )
            self.logger.make_durable()

        def written(path: Path) -> None:  # on the writer's thread
            update_metadata(self.directory, last_checkpoint=f"checkpoints/{path.name}", **metadata)

        self.checkpoints.save(state, links, on_written=written, covered=covered)

    def record(self, **metadata) -> None:
        update_metadata(self.directory, **metadata)

    def check_writes(self) -> None:
        if self.checkpoints.failed:
            self.checkpoints.wait()  # raises the write's error
        self.figures.raise_error()

    def wait(self) -> None:
        self.checkpoints.wait()

    def settle(self) -> None:
        self.wait()
        self.figures.wait()
        mirror = self.checkpoints.archive
        if mirror is not None and not mirror.wait_until_idle(timeout=120):
            warn("fault: the archive did not catch up within 120 s; acting anyway")

    def close(self, status: str = "finished") -> None:
        """Finish the checkpoint write and the figures in flight, then close the logs."""
        try:
            try:
                self.wait()
            finally:
                self.figures.wait()
            self.logger.close()
        finally:
            if self.trackers is not None:
                self.trackers.close(status)

    def state_dict(self) -> dict:
        # metrics.jsonl's length, fsynced before the checkpoint shows (see MetricLogger.flush)
        return {"logging": {"metrics_bytes": self.logger.flush()}, **self.identity}
