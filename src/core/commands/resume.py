"""What a resume continues from, decided in one place: the run's own config (with the edits a
resume may make), its commit, its data and initial weights, the checkpoint (the newest one
that verifies), and for a branch (--from-step) the parent's checkpoint. The answer is a
`training.start` value (Fresh, Continue or Branch) that the run's output and the Trainer
follow.
"""

import json
import time
from dataclasses import replace
from pathlib import Path

from src.core.commands.cli import CommandLine
from src.core.config.edits import ConfigEdits, apply_edits
from src.core.config.loader import split_provenance
from src.core.config.schema import project_schema
from src.core.config.validation import Config, apply_defaults, changed_keys, finalize
from src.core.distributed import DistContext, share_from_rank_zero
from src.core.errors import Refusal, UserError, warn
from src.core.record.bootstrap import check_bootstrap
from src.core.record.checkpoint import (
    DamagedCheckpoint,
    manifest_path,
    newest_valid_checkpoint,
    read_checkpoint,
    set_aside_newer_than,
    step_checkpoints,
    step_file_name,
)
from src.core.record.environment import data_fingerprint, find_data_directory
from src.core.record.git import check_same_commit
from src.core.record.rundir import (
    CONFIG_FILE,
    METADATA_FILE,
    now,
    read_run_files,
    read_yaml,
    remove_temporary_files,
    update_metadata,
)
from src.core.record.snapshot import logging_gate, resume_hint
from src.core.tracking.trackers import check_trackers
from src.core.training.build import check_config_names
from src.core.training.start import Branch, Continue, Fresh, Start

# A run directory without config.yaml younger than this is taken as one another process is creating.
CREATION_SECONDS = 60

# --resume may change these and keys that leave results unchanged (epochs, max_steps, description...).
RESUME_MAY_CHANGE = frozenset()


def load_run(
    run_directory: str | Path, edits: ConfigEdits, flag: str, may_change: frozenset[str] | None = RESUME_MAY_CHANGE
) -> tuple[Path, dict, Config]:
    """A logged run's saved config (read once), with the command line's edits if they leave
    results unchanged (or touch only `may_change`, dotted keys; None: anything may change,
    for a branch, which is a new run); and its recorded provenance."""
    run_directory = Path(run_directory)
    schema = project_schema()
    document, saved = split_provenance(read_run_files(run_directory, flag)[0])
    original = apply_defaults(document, schema)  # validated when the run started
    config = finalize(apply_edits(original, edits, schema), schema)
    changed = [
        key for key in changed_keys(original, config, schema) if may_change is not None and key not in may_change
    ]
    if changed and may_change:
        raise UserError(
            f"{flag} cannot change {', '.join(changed)}: it would no longer evaluate the run's results. "
            f"An evaluation may change only: {', '.join(sorted(may_change))} (and keys that leave "
            "results unchanged)."
        )
    if changed:
        raise UserError(
            f"{flag} cannot change {', '.join(changed)}: they change what the run computes, so the "
            "result would not belong to this run. Start a new run instead (or branch one: "
            "--resume RUN_DIR --from-step N). (Keys such as epochs, max_steps, description and "
            "checkpoint timing may change.)"
        )
    check_config_names(config)
    return run_directory, saved, config


def read_branch(parent: Path, step: int, edits: ConfigEdits) -> tuple[Config, dict, dict]:
    """--resume RUN_DIR --from-step N: a new run from the parent's checkpoint at step N, with
    the parent's config and any edits (results may change: it is a new run). Named
    `<parent>-from-<N>` unless the edits set run_name. Returns its config, the parent's
    provenance, and the branch: {run, step, checkpoint}."""
    if not edits.sets("run_name"):
        edits = replace(edits, overrides=[*edits.overrides, ("run_name", f"{parent.name}-from-{step}")])
    _, saved, config = load_run(parent, edits, "--resume --from-step", may_change=None)
    checkpoint = parent / "checkpoints" / step_file_name(step)
    if not checkpoint.exists() or not manifest_path(checkpoint).exists():
        kept = [info.step for info in step_checkpoints(parent / "checkpoints") if manifest_path(info.path).exists()]
        raise UserError(
            f"--from-step {step}: {parent} keeps no checkpoint of step {step}; "
            f"steps kept: {', '.join(map(str, kept)) or 'none'} (keep more with checkpoint.keep_every_n_steps "
            "or keep_every_n_epochs)"
        )
    read_branch_checkpoint(checkpoint)  # verified before the branch's directory exists: a refusal writes nothing
    return config, saved, {"run": str(parent.resolve()), "step": step, "checkpoint": str(checkpoint.resolve())}


def check_continuation(
    command: CommandLine, config: Config, run_directory: Path | None, saved: dict, branch: dict | None
) -> tuple[dict, Path]:
    """A resume continues, and a branch starts from, the run's own code and data: the gate, then
    the commit, the data and the initial weights against the recorded ones. Returns the git
    provenance and the data directory."""
    if run_directory is not None and (command.no_logging or command.allow_dirty_repo):
        raise UserError("--resume continues a logged run, so it cannot run with --no-logging or --allow-dirty-repo")
    try:  # a snapshot run's commit is found again by snapshotting the same tree (--snapshot)
        git = logging_gate(command.snapshot, config.snapshot_max_file_mb)
        flag, run = ("--from-step", Path(branch["run"])) if branch is not None else ("--resume", run_directory)
        check_same_commit(saved["git"]["commit"], git["commit"], flag, run)
    except Refusal as refusal:
        raise Refusal(f"{refusal}{resume_hint(saved['git'])}") from None
    check_trackers(config.loggers)
    if branch is not None:  # a branch runs its parent's code, or the checkpoint would meet other code
        return git, find_data_directory(config.data_directory)
    data_directory = find_data_directory(config.data_directory)
    check_same_data(saved.get("data_fingerprint"), data_directory, run_directory)
    check_bootstrap(saved.get("bootstrap"), "--resume", run_directory)
    return git, data_directory


def check_same_data(recorded: dict | None, data_directory: Path, run_directory: Path) -> None:
    """A resumed run must read the data it started with: the data lives outside git."""
    if not recorded:
        return
    current = data_fingerprint(data_directory)
    for key, what in (("listing_sha256", "file names or sizes"), ("content_sha256", "file contents")):
        if recorded.get(key) and current.get(key) and recorded[key] != current[key]:
            raise UserError(
                f"--resume {run_directory}: the data in {data_directory} differs from the run's "
                f"({what} changed since it started), so the run could not continue as it began. "
                "Restore the data, or start a new run."
            )


def auto_resume(config: Config, directory: Path, mini: bool, snapshot: bool = False) -> tuple[str, dict | None]:
    """--auto-resume of the run `directory` (`<project>/<run_name>`): "start" it when it does not
    exist, "continue" it (with its provenance) when it has this commit and config, or say it
    has "finished". Anything else is refused, so a re-submitted job script never overwrites,
    nor forks, a run."""
    if not directory.exists():
        return "start", None
    if not (directory / CONFIG_FILE).exists():
        if time.time() - directory.stat().st_mtime < CREATION_SECONDS:
            raise Refusal(
                f"--auto-resume: {directory} is being created by another process right now (two --auto-resume "
                "of the same run started together?); it runs that run. Run this command again once it has "
                "started, to continue it (or wait for it to finish)"
            )
        raise Refusal(
            f"--auto-resume: {directory} exists but holds no {CONFIG_FILE} (a run killed while it was "
            "being created, or not a run directory); move it away, or choose another run_name"
        )
    _, saved, saved_config = load_run(directory, ConfigEdits(), "--auto-resume", may_change=None)
    differences = []
    current_commit = logging_gate(snapshot, config.snapshot_max_file_mb)["commit"]  # a snapshot's, with --snapshot
    if saved["git"]["commit"] != current_commit:
        differences.append(f"commit ({str(saved['git']['commit'])[:12]} there, HEAD is {current_commit[:12]})")
    changed = changed_keys(saved_config, config, project_schema())
    if changed:
        differences.append(f"config ({', '.join(changed)})")
    if bool(saved["flags"]["mini"]) != bool(mini):
        differences.append(f"--mini ({'on' if saved['flags']['mini'] else 'off'} there)")
    if differences:
        raise Refusal(
            f"--auto-resume: {directory} was made with another {' and '.join(differences)}; it is left as it is. "
            "Choose another run_name, or check out the run's commit and config."
        )
    metadata = read_yaml(directory / METADATA_FILE) or {}
    if metadata.get("status") == "finished" and not extends(config, metadata):
        print(f"{directory} has finished already ({metadata.get('stop_reason') or 'all epochs done'}); nothing to do")
        return "finished", None
    print(f"--auto-resume: {directory} exists with this commit and config; continuing it")
    return "continue", saved


def extends(config: Config, metadata: dict) -> bool:
    """Whether a finished run's config asks for more training (a larger epochs or max_steps)."""
    if config.get("max_steps"):
        return config.max_steps > (metadata.get("global_step") or 0)
    stopped_early = str(metadata.get("stop_reason") or "").startswith(("early stopping", "pruned"))
    return not stopped_early and config.epochs > (metadata.get("epochs_done") or 0)


# ---------------------------------------------------------------------------------------
# The starting point, once the run directory is open


def choose_start(
    resume_from: Path | None, branch: dict | None, directory: Path, context: DistContext, identity: dict
) -> Start:
    """Where this run's training starts: a branch from its parent's checkpoint, a resume from
    the newest valid checkpoint of its own (rank 0 chooses and verifies it; the other ranks
    read the one it chose), or step 0."""
    if branch is not None:
        return Branch(read_branch_checkpoint(Path(branch["checkpoint"])))
    if resume_from is None:
        return Fresh()
    found = {}  # rank 0 keeps the state it verified: no second load of the checkpoint

    def choose() -> Path | None:
        found["path"], found["state"] = continue_run(directory, context, identity)
        return found["path"]

    path = share_from_rank_zero(context, "checkpoint", choose)
    state = found["state"] if context.is_main else (read_checkpoint(path) if path else None)
    return Continue(state) if state is not None else Fresh()


def continue_run(run_directory: Path, context: DistContext, identity: dict) -> tuple[Path | None, dict | None]:
    """Find the newest valid checkpoint, check that it belongs to this config and commit, clear
    what the killed process left behind, and record the resume in metadata.yaml. Returns the
    checkpoint's path and its verified state (None, None: start at step 0)."""
    found = newest_valid_checkpoint(run_directory / "checkpoints")
    path, state = found if found else (None, None)
    step = state["progress"]["global_step"] if state else 0
    if state and state["config_hash"] != identity["config_hash"]:
        raise UserError(
            f"--resume {run_directory}: {path.name} was made with another config than the run's "
            f"{CONFIG_FILE} (was it edited by hand?). Restore that file, or start a new run."
        )
    if state:
        check_same_commit(str(state["commit"]), identity["commit"], "--resume", run_directory, what=path.name)
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


def read_branch_checkpoint(path: Path) -> dict:
    try:
        return read_checkpoint(path)
    except DamagedCheckpoint as error:
        raise UserError(f"--from-step: cannot branch from {error}; nothing was written") from None


def branch_provenance(branch: dict) -> dict:
    """What a branch records of its parent: the run, the step, and the checkpoint's SHA-256."""
    checkpoint = Path(branch["checkpoint"])
    sha256 = json.loads(manifest_path(checkpoint).read_text())["sha256"]
    return {"run": branch["run"], "step": branch["step"], "checkpoint": checkpoint.name, "checkpoint_sha256": sha256}
