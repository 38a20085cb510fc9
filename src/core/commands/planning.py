"""What a training command asks for, decided before anything is built: the config (read
and validated once), the git gate, the data, and where the run continues from
(commands/resume.py decides that).

Under torchrun, rank 0 makes the plan and every rank receives it (src/core/distributed.py).
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from src.core.archive.restore import restore_for_resume
from src.core.archive.store import check_archive
from src.core.commands import resume
from src.core.commands.cli import CommandLine
from src.core.commands.launch import launch_settings
from src.core.config.edits import ConfigEdits, apply_edits
from src.core.config.loader import dump_yaml, load_yaml_file
from src.core.config.schema import project_schema
from src.core.config.uris import is_archive_uri
from src.core.config.validation import Config, finalize
from src.core.distributed import DistContext
from src.core.errors import Refusal, UserError
from src.core.record.bootstrap import bootstrap_record
from src.core.record.environment import find_data_directory
from src.core.record.git import MAX_LISTED_PATHS, repository_state
from src.core.record.rundir import log_root
from src.core.record.snapshot import logging_gate as snapshot_gate
from src.core.tracking.trackers import check_trackers
from src.core.training.build import check_config_names


@dataclass(frozen=True)
class Request:
    """The command line's config, read and validated once: a new run's, a resumed run's
    (with `run_directory` and its recorded provenance), a branch's, or a sweep's document."""

    config: Config | None = None
    run_directory: Path | None = None  # --resume
    saved: dict | None = None  # the resumed (or branched) run's provenance sections (git, flags, data...)
    sweep: dict | None = None  # a sweep's edited document: its members are validated one by one
    branch: dict | None = None  # --resume RUN_DIR --from-step N: the parent run, step and checkpoint

    @property
    def launch(self) -> dict:
        """The `distributed` settings (torchrun's process counts)."""
        return launch_settings(self.config)

    @property
    def processes(self) -> int:
        return self.launch["nproc_per_node"] * self.launch["nnodes"] if self.config else 1


@dataclass(frozen=True)
class Plan:
    """What rank 0 decided, and every rank follows."""

    config: Config
    data_directory: str
    git: dict | None  # None: this run logs nothing
    mini: bool  # --mini, or a resumed run's own setting
    resume_from: Path | None = None  # a run directory to continue
    branch: dict | None = None  # a new run starting from another run's checkpoint (--from-step)
    bootstrap: dict | None = None  # a new run's initial weights: {path, sha256} (src/core/record/bootstrap.py)


def read_request(command: CommandLine, edits: ConfigEdits | None = None, resume_from: str | None = None) -> Request:
    """Read the config the command line names, once, and validate it."""
    edits = command.edits if edits is None else edits
    resume_from = resume_from or command.resume
    if is_archive_uri(resume_from):  # --resume s3://...: download and verify it, then resume it here
        resume_from = str(restore_for_resume(resume_from, log_root(command.log_dir)))
    if resume_from:
        if command.config is not None and resume_from == command.resume:  # (a torchrun restart of a new run resumes it)
            raise UserError("--resume uses the run's own config; drop the config file argument")
        if command.from_step is not None and resume_from == command.resume:
            config, saved, branch = resume.read_branch(Path(resume_from), command.from_step, edits)
            return Request(config, None, saved, branch=branch)
        run_directory, saved, config = resume.load_run(resume_from, edits, "--resume")
        return Request(config, run_directory, saved)
    if command.config is None:
        raise UserError("no config file given; usage: python run.py CONFIG.yaml [flags] (see --help)")
    document = apply_edits(load_yaml_file(command.config), edits, project_schema())
    if document.get("sweep") is not None or command.slurm or command.submit:
        return Request(sweep=document)
    config = finalize(document, project_schema())
    check_config_names(config)
    return Request(config)


def make_plan(command: CommandLine, request: Request | None, context: DistContext | None = None) -> Plan | None:
    """The plan of this run (None for --print-config, or an --auto-resume of a finished run).
    After torchrun restarted the workers (a worker died), the same run directory is resumed."""
    previous = context.recall("run_directory") if context is not None and context.restart_count else None
    if previous:
        print(f"restart {context.restart_count}: resuming {previous}")
        # A new run's (and a branch's) edits are in its config.yaml already; a resume's (--epochs=N) are not.
        resumed = command.resume and command.from_step is None
        request = read_request(command, edits=command.edits if resumed else ConfigEdits(), resume_from=previous)
    elif request is None:  # a torchrun worker: read here, on rank 0 alone
        request = read_request(command)
    if request.sweep is not None:
        raise UserError("a sweep runs its members one by one: start it with python run.py, not torchrun")
    if command.auto_resume and request.run_directory is None:
        request = auto_resume_request(command, request)
        if request is None:  # that run has finished already
            return None
    if command.print_config:
        print(dump_yaml(request.config.to_dict()), end="")
        return None
    return plan_of(command, request)


def auto_resume_request(command: CommandLine, request: Request) -> Request | None:
    """--auto-resume: continue `<project>/<run_name>` if it exists with this commit and config,
    or start it (the same request); None when it has finished."""
    config = request.config
    if not config.run_name:
        raise UserError("--auto-resume finds the run by its name: set run_name in the config or --run_name=NAME")
    directory = run_parent(command, config) / config.run_name
    decision, saved = resume.auto_resume(config, directory, command.mini, command.snapshot)
    if decision == "finished":
        return None
    return Request(config, directory, saved) if decision == "continue" else request


def plan_of(command: CommandLine, request: Request) -> Plan:
    """The one place a Plan is assembled: a new run's (gated here), or a resume's or a branch's
    (checked against the run's own commit, data and initial weights by commands/resume.py)."""
    config = request.config
    if request.saved is None:  # a new run: its provenance is recorded when its directory is made
        data_directory = find_data_directory(config.data_directory)
        git = logging_gate(command, config)
        if git is not None:  # a tracker not installed, an archive URI with credentials: before anything runs
            check_trackers(config.loggers)
            check_archive(config.to_dict())
        mini, bootstrap = command.mini, bootstrap_record(config)
    else:
        git, data_directory = resume.check_continuation(
            command, config, request.run_directory, request.saved, request.branch
        )
        mini, bootstrap = request.saved["flags"]["mini"], None
    return Plan(config, str(data_directory), git, mini, request.run_directory, request.branch, bootstrap)


def logging_gate(command: CommandLine, config: Config) -> dict | None:
    """The run's git provenance when it logs; None when it does not (--no-logging, --allow-dirty-repo).
    With --snapshot, a dirty tree's provenance is a snapshot commit (record/snapshot.py)."""
    if command.no_logging:
        return None
    if command.allow_dirty_repo:
        confirm_dirty_run(command.y)
        return None
    return snapshot_gate(command.snapshot, config.snapshot_max_file_mb)


def confirm_dirty_run(yes: bool) -> None:
    """--allow-dirty-repo: say what is uncommitted, and ask before running without logging."""
    try:
        changes = repository_state().changes
    except Refusal as refusal:  # no git, no repository: nothing could be logged either
        changes = [str(refusal).split(", so")[0]]
    if changes:
        print("uncommitted changes:\n  " + "\n  ".join(changes[:MAX_LISTED_PATHS]), file=sys.stderr)
    print("--allow-dirty-repo: this run will log nothing (no run directory, metrics or checkpoints).", file=sys.stderr)
    if yes or not changes:
        return
    if not sys.stdin.isatty():
        raise Refusal("--allow-dirty-repo asks for confirmation, but there is no terminal to ask on; add --y")
    answer = input("Run anyway, without logging? [y/n] ").strip().lower()
    if answer not in ("y", "yes"):
        raise Refusal("not confirmed; nothing was run")


def run_parent(command: CommandLine, config: Config) -> Path:
    """Where a new run directory goes: --run-parent, else <log dir>/<project_name or model_type>."""
    if command.run_parent:
        return Path(command.run_parent)
    return log_root(command.log_dir) / (config.project_name or config.model_type)
