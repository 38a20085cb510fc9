"""A logged run from its start to its end: the run directory created (or reopened for a
resume) and locked by rank 0, where training starts (commands/resume.py), the run's output,
and the final status in metadata.yaml (finished, failed, interrupted, preempted)."""

import contextlib
import shlex
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from src.core import faults
from src.core.archive.mirror import Mirror
from src.core.archive.store import archive_uri
from src.core.commands.cli import CommandLine, recorded_flags
from src.core.commands.planning import Plan, run_parent
from src.core.commands.resume import branch_provenance, choose_start
from src.core.commands.sweep import sweep_snapshot, update_sweep_table
from src.core.config.loader import split_provenance
from src.core.config.schema import project_schema
from src.core.config.validation import Config, config_hash
from src.core.distributed import DistContext, broadcast_object
from src.core.errors import UserError, storage_error, warn
from src.core.record.checkpoint import CheckpointWriteError
from src.core.record.environment import Gathering, environment_provenance
from src.core.record.git import PROJECT_ROOT
from src.core.record.rundir import (
    METADATA_FILE,
    lock_run_directory,
    now,
    read_run_files,
    record_status,
    start_run,
    update_metadata,
)
from src.core.record.snapshot import pin_run_snapshot
from src.core.tracking.trackers import TRACKERS
from src.core.training.console import Console
from src.core.training.output import NullOutput, RunOutput
from src.core.training.policies import Preempted
from src.core.training.start import Start


@dataclass
class Run:
    """Where a run logs (None: nothing is logged), where its training starts, and its archive."""

    directory: Path | None
    start: Start
    config: Config
    identity: dict  # the commit and the config's hash, stamped into every checkpoint
    context: DistContext
    mirror: Mirror | None = None  # rank 0's copy to the archive, when the config names one
    archive_timeout: float = 600.0

    @property
    def records(self) -> bool:
        return self.directory is not None and self.context.is_main

    def open_output(self) -> NullOutput:
        """Rank 0 of a logged run writes; every other rank, and a run that logs nothing, gets a
        NullOutput (still taking part in checkpoints, on every rank of a logged run)."""
        if not self.records:
            console = Console(enabled=self.context.is_main, progress_bar=self.config.progress_bar)
            return NullOutput(console, run_logs=self.directory is not None)
        tracking = tracker_context(self.directory, self.config)
        return RunOutput.open(
            self.directory, self.config, self.start.log_position, self.identity, tracking, self.mirror
        )

    def fit(self, train: Callable[[NullOutput, Start], object], on_preempted: Callable[[], str]) -> int:
        """`train(output, start)`, with the run's output opened first; record how it ended in
        metadata.yaml (rank 0) and return the exit code. A run of a sweep then updates the
        sweep's table."""
        try:
            return self._record(lambda: train(self.open_output(), self.start), on_preempted)
        finally:
            if self.records:
                update_sweep_table(self.directory)
            if self.mirror is not None and not self.mirror.close(self.archive_timeout):
                warn(f"warning: the archive is behind; complete it with: python run.py --archive {self.directory}")

    def _record(self, fit: Callable[[], object], on_preempted: Callable[[], str]) -> int:
        try:
            fit()
        except Preempted as preempted:
            if self.records:
                update_metadata(self.directory, status="preempted", error=None)
                print(preempted, flush=True)  # before the requeue, which has Slurm stop this job at once
                print(on_preempted(), flush=True)
            return 0
        except BaseException as error:
            disk = storage_error(error)
            recorded = True
            if self.records:
                status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
                recorded = record_status(self.directory, status=status, error=repr(disk or error))
            if isinstance(error, UserError | KeyboardInterrupt):
                raise
            if isinstance(error, CheckpointWriteError) or disk is not None:  # the disk, not the code
                print(f"error: {disk_message(error, disk, self.directory, recorded)}", file=sys.stderr)
            else:
                traceback.print_exc()
            return 1
        if self.records:
            metadata = update_metadata(self.directory, status="finished", finished=now())
            print(f"finished: {self.directory}\n{next_steps(self.directory, metadata)}")
        return 0


def next_steps(directory: Path, metadata: dict) -> str:
    """What to do with a finished run: its curves, its best weights, an evaluation, the table of runs."""
    python = Path(sys.executable)
    if python.is_relative_to(PROJECT_ROOT):  # the project's own .venv: no activation needed
        python = python.relative_to(PROJECT_ROOT)
    best = metadata.get("best") or {}
    value = f"  ({best['metric']} {best['value']:.4g} at step {best['step']})" if best.get("value") is not None else ""
    return "\n".join(
        [
            f"  curves:    {python} -m tensorboard.main --logdir {directory.parent}",
            f"  best:      {directory / 'checkpoints' / 'best.pt'}{value}",
            f"  evaluate:  {python} run.py --evaluate {directory}",
            f"  all runs:  {python} run.py --runs",
        ]
    )


def disk_message(error: BaseException, disk: OSError | None, directory: Path | None, recorded: bool) -> str:
    """One line for a run stopped by its disk: what failed, and how to go on. The same words
    whichever file met the full disk first (a checkpoint, metrics, metadata)."""
    if disk is None:  # a checkpoint that could not be written for another reason (permissions...)
        return str(error)
    where = f" ({disk.filename})" if disk.filename else ""
    if isinstance(error, CheckpointWriteError):
        where = f" (writing checkpoint {error.path.name})"
    status = "" if recorded else f"; {METADATA_FILE} could not record it, and --runs shows the run as crashed"
    resume = f"python run.py --resume {directory}" if directory else "run it again"
    return (
        f"the run stopped: {disk.strerror}{where}{status}. Its last checkpoint is intact: free space "
        f"(or fix the disk) and continue with: {resume}"
    )


def gather_provenance(plan: Plan, context: DistContext) -> Gathering | None:
    """A new logged run's package list and data fingerprint, started on a thread (rank 0) so that
    they are gathered while the model and the data are built; None when no run directory is created."""
    if context.is_main and plan.git is not None and plan.resume_from is None:
        return Gathering(plan.data_directory)
    return None


@contextlib.contextmanager
def open_run(
    plan: Plan, command: CommandLine, context: DistContext, gathering: Gathering | None = None
) -> Iterator[Run]:
    """Rank 0 creates the run directory (or reopens a resumed one) and holds its lock for as
    long as the block runs; every rank learns its path and where its training starts.
    `gathering`: the provenance started by `gather_provenance` (None: gathered here)."""
    directory = lock = None
    if context.is_main and plan.git is not None:
        directory = plan.resume_from or create_run_directory(plan, command, context.world_size, gathering)
        lock = lock_run_directory(directory)
        context.remember("run_directory", str(directory))  # a torchrun restart resumes it
    try:
        directory = broadcast_object(directory, context)
        identity = {
            "commit": plan.git["commit"] if plan.git else None,
            "config_hash": config_hash(plan.config, project_schema()),
        }
        start = choose_start(plan.resume_from, plan.branch, directory, context, identity)
        uri = archive_uri(plan.config.to_dict()) if context.is_main and directory is not None else None
        interval = plan.config.archive.sync_interval_seconds
        mirror = Mirror(directory, uri, interval=interval) if uri else None  # after the resume chose its checkpoint
        timeout = plan.config.archive.final_sync_timeout_seconds
        if context.enabled:  # the other ranks wait at the final barrier meanwhile: stay well inside its timeout
            timeout = min(timeout, plan.config.distributed.timeout_seconds / 2)
        yield Run(directory, start, plan.config, identity, context, mirror, timeout)
    finally:
        if lock is not None:
            lock.close()


def create_run_directory(plan: Plan, command: CommandLine, world_size: int, gathering: Gathering | None) -> Path:
    """The new run's directory, with its config and provenance stamped in (rank 0). A branch
    goes next to its parent, unless --run-parent says (a branch's reproduction)."""
    parent = branch_provenance(plan.branch) if plan.branch else None
    packages, fingerprint = (gathering or Gathering(plan.data_directory)).result()
    directory = start_run(
        Path(plan.branch["run"]).parent if plan.branch and not command.run_parent else run_parent(command, plan.config),
        plan.config.run_name,
        plan.config.to_dict(),
        lambda directory: {
            "git": sweep_snapshot(pin_run_snapshot(plan.git, directory), directory),
            "flags": recorded_flags(command),
            "command_line": shlex.join(["python", "run.py", *command.argv]),
            "environment": {**environment_provenance(), "world_size": world_size},
            "data_fingerprint": fingerprint,
            **({"parent": parent} if parent else {}),
            **({"bootstrap": plan.bootstrap} if plan.bootstrap else {}),
        },
        packages,
    )
    if parent:
        update_metadata(directory, parent=parent)
        print(f"branching from {parent['run']} at step {parent['step']}")
    print(f"logging to {directory}")
    faults.maybe_fail("run_directory")
    return directory


def tracker_context(directory: Path, config: Config) -> dict:
    """What W&B and MLflow receive of the run: its config and provenance as saved, and the ids of
    their runs to continue (metadata.yaml `trackers`). Read only when a tracker is configured."""
    if not any(name in TRACKERS for name in config.loggers):
        return {}
    saved, metadata = read_run_files(directory, "--resume")
    return {"config": config.to_dict(), "provenance": split_provenance(saved)[1], "ids": metadata.get("trackers")}
