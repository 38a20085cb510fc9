"""A logged run from its start to its end: the run directory created (or reopened for a
resume) and locked by rank 0, the checkpoint a resume continues from, and the final
status in metadata.yaml (finished, failed, interrupted, preempted)."""

import contextlib
import json
import shlex
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from src.core import faults, provenance
from src.core.archive import Mirror, archive_uri
from src.core.checkpoint import (
    CheckpointWriteError,
    DamagedCheckpoint,
    manifest_path,
    newest_valid_checkpoint,
    read_checkpoint,
    set_aside_newer_than,
)
from src.core.cli import recorded_flags
from src.core.config import config_hash
from src.core.distributed import DistContext, broadcast_object, share_from_rank_zero
from src.core.errors import UserError, storage_error, warn
from src.core.planning import Plan, check_same_commit, run_parent
from src.core.policies import Preempted
from src.core.rundir import (
    CONFIG_FILE,
    METADATA_FILE,
    lock_run_directory,
    now,
    read_yaml,
    record_status,
    remove_temporary_files,
    start_run,
    update_metadata,
)
from src.core.sweep import update_sweep_table
from src.core.template_schema import project_schema


@dataclass
class Run:
    """What the Trainer is given: where to log (None: nothing is logged) and what to resume."""

    directory: Path | None
    checkpoint: dict | None  # the state to continue from; None: start at step 0
    commit: str | None
    config_hash: str
    context: DistContext
    mirror: Mirror | None = None  # rank 0's copy to the archive, when the config names one
    archive_timeout: float = 600.0
    branched: bool = False  # a new run from another run's checkpoint (--from-step)

    def fit(self, fit: Callable[[], object], on_preempted: Callable[[], str]) -> int:
        """Run `fit`, and record how it ended in metadata.yaml (rank 0); return the exit code.
        A run of a sweep then updates the sweep's table."""
        try:
            return self._record(fit, on_preempted)
        finally:
            if self.records:
                update_sweep_table(self.directory)
            if self.mirror is not None and not self.mirror.close(self.archive_timeout):
                warn(f"warning: the archive is behind; complete it with: python run.py --archive {self.directory}")

    @property
    def records(self) -> bool:
        return self.directory is not None and self.context.is_main

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
            update_metadata(self.directory, status="finished", finished=now())
            print(f"finished: {self.directory}")
        return 0


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


@contextlib.contextmanager
def open_run(plan: Plan, args, context: DistContext) -> Iterator[Run]:
    """Rank 0 creates the run directory (or reopens a resumed one) and holds its lock for as
    long as the block runs; every rank learns its path and the checkpoint to resume from."""
    directory = lock = None
    if context.is_main and plan.git is not None:
        directory = plan.resume_from or create_run_directory(plan, args, context.world_size)
        lock = lock_run_directory(directory)
        context.remember("run_directory", str(directory))  # a torchrun restart resumes it
    try:
        directory = broadcast_object(directory, context)
        hash_of_config = config_hash(plan.config, project_schema())
        commit = plan.git["commit"] if plan.git else None
        checkpoint = None
        if plan.resume_from is not None:
            found = {}  # rank 0 keeps the state it verified: no second load of the checkpoint

            def choose() -> Path | None:
                found["path"], found["state"] = start_resume(directory, context, hash_of_config, commit)
                return found["path"]

            path = share_from_rank_zero(context, "checkpoint", choose)  # the other ranks read it themselves
            checkpoint = found["state"] if context.is_main else (read_checkpoint(path) if path else None)
        if plan.branch is not None:
            checkpoint = read_branch_checkpoint(Path(plan.branch["checkpoint"]))
        uri = archive_uri(plan.config.to_dict()) if context.is_main and directory is not None else None
        interval = plan.config.archive.sync_interval_seconds
        mirror = Mirror(directory, uri, interval=interval) if uri else None  # after the resume chose its checkpoint
        timeout = plan.config.archive.final_sync_timeout_seconds
        if context.enabled:  # the other ranks wait at the final barrier meanwhile: stay well inside its timeout
            timeout = min(timeout, plan.config.distributed.timeout_seconds / 2)
        yield Run(directory, checkpoint, commit, hash_of_config, context, mirror, timeout, plan.branch is not None)
    finally:
        if lock is not None:
            lock.close()


def read_branch_checkpoint(path: Path) -> dict:
    try:
        return read_checkpoint(path)
    except DamagedCheckpoint as error:
        raise UserError(f"--from-step: cannot branch from {error}") from None


def branch_provenance(branch: dict) -> dict:
    """What a branch records of its parent: the run, the step, and the checkpoint's SHA-256."""
    checkpoint = Path(branch["checkpoint"])
    sha256 = json.loads(manifest_path(checkpoint).read_text())["sha256"]
    return {"run": branch["run"], "step": branch["step"], "checkpoint": checkpoint.name, "checkpoint_sha256": sha256}


def create_run_directory(plan: Plan, args, world_size: int) -> Path:
    """The new run's directory, with its config and provenance stamped in (rank 0). A branch
    goes next to its parent."""
    parent = branch_provenance(plan.branch) if plan.branch else None
    directory = start_run(
        Path(plan.branch["run"]).parent if plan.branch else run_parent(args, plan.config),
        plan.config.run_name,
        plan.config.to_dict(),
        {
            "git": plan.git,
            "flags": recorded_flags(args),
            "command_line": shlex.join(["python", "run.py", *args.argv]),
            "environment": {**provenance.environment_provenance(), "world_size": world_size},
            "data_fingerprint": provenance.data_fingerprint(plan.data_directory),
            **({"parent": parent} if parent else {}),
            **({"bootstrap": plan.bootstrap} if plan.bootstrap else {}),
        },
        provenance.installed_packages(),
    )
    if parent:
        update_metadata(directory, parent=parent)
        print(f"branching from {parent['run']} at step {parent['step']}")
    print(f"logging to {directory}")
    faults.maybe_fail("run_directory")
    return directory


def start_resume(
    run_directory: Path, context: DistContext, hash_of_config: str, commit: str
) -> tuple[Path | None, dict | None]:
    """Find the newest valid checkpoint, check that it belongs to this config and commit, clear
    what the killed process left behind, and record the resume in metadata.yaml. Returns the
    checkpoint's path and its verified state (None, None: start at step 0)."""
    found = newest_valid_checkpoint(run_directory / "checkpoints")
    path, state = found if found else (None, None)
    step = state["progress"]["global_step"] if state else 0
    if state and state["config_hash"] != hash_of_config:
        raise UserError(
            f"--resume {run_directory}: {path.name} was made with another config than the run's "
            f"{CONFIG_FILE} (was it edited by hand?). Restore that file, or start a new run."
        )
    if state:
        check_same_commit(str(state["commit"]), commit, "--resume", run_directory, what=path.name)
    for name in set_aside_newer_than(run_directory / "checkpoints", step):
        warn(f"warning: moved {name}, newer than the checkpoint resumed from, to checkpoints/discarded/")
    remove_temporary_files(run_directory)
    print(f"resuming {run_directory} from {path.name if path else 'the start (no valid checkpoint)'}")
    metadata_file = run_directory / METADATA_FILE
    resumes = ((read_yaml(metadata_file) or {}) if metadata_file.exists() else {}).get("resumes") or []
    resumes.append(
        {
            "at": now(),
            "from_step": step,
            "from_checkpoint": path.name if path else None,
            "world_size": context.world_size,
            "saved_world_size": state["world_size"] if state else None,
        }
    )
    update_metadata(run_directory, status="running", resumes=resumes, error=None, finished=None)
    return path, state
