"""What a training command asks for, decided before anything is built: the config (read
and validated once), the git gate, the data, and where the run continues from.

Under torchrun, rank 0 makes the plan and every rank receives it (src/core/distributed.py).
"""

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from src.core import provenance
from src.core.archive import check_archive, is_archive_uri, restore_for_resume
from src.core.bootstrap import bootstrap_record, check_bootstrap
from src.core.checkpoint import manifest_path, step_checkpoints, step_file_name
from src.core.config import (
    Config,
    ConfigEdits,
    apply_defaults,
    apply_edits,
    dump_yaml,
    finalize,
    load_yaml_file,
    result_affecting_keys,
    split_provenance,
)
from src.core.distributed import DistContext, launch_settings
from src.core.errors import Refusal, UserError
from src.core.resolve import check_config_names
from src.core.rundir import CONFIG_FILE, METADATA_FILE, log_root, read_run_files, read_yaml
from src.core.template_schema import project_schema
from src.core.trackers import check_trackers


@dataclass(frozen=True)
class Request:
    """The command line's config, read and validated once: a new run's, a resumed run's
    (with `run_directory` and its recorded provenance), or a sweep's document."""

    config: Config | None = None
    run_directory: Path | None = None  # --resume
    saved: dict | None = None  # the resumed run's provenance sections (git, flags, data...)
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
    bootstrap: dict | None = None  # a new run's initial weights: {path, sha256} (src/core/bootstrap.py)


def read_request(args, edits: ConfigEdits | None = None, resume: str | None = None) -> Request:
    """Read the config the command line names, once, and validate it."""
    edits = args.edits if edits is None else edits
    resume = resume or args.resume
    if is_archive_uri(resume):  # --resume s3://...: download and verify it, then resume it here
        resume = str(restore_for_resume(resume, log_root(args.log_dir)))
    if resume:
        if args.config is not None and resume == args.resume:  # (a torchrun restart of a new run resumes it)
            raise UserError("--resume uses the run's own config; drop the config file argument")
        if getattr(args, "from_step", None) is not None and resume == args.resume:
            return read_branch(args, edits)
        run_directory, saved, config = load_run(resume, edits, "--resume")
        return Request(config, run_directory, saved)
    if args.config is None:
        raise UserError("no config file given; usage: python run.py CONFIG.yaml [flags] (see --help)")
    document = apply_edits(load_yaml_file(args.config), edits, project_schema())
    if document.get("sweep") is not None or args.slurm or args.submit:
        return Request(sweep=document)
    config = finalize(document, project_schema())
    check_config_names(config)
    return Request(config)


def make_plan(args, request: Request | None, context: DistContext | None = None) -> Plan | None:
    """The plan of this run (None for --print-config). After torchrun restarted the workers
    (a worker died), the same run directory is resumed."""
    previous = context.recall("run_directory") if context is not None and context.restart_count else None
    if previous:
        print(f"restart {context.restart_count}: resuming {previous}")
        # A new run's (and a branch's) edits are in its config.yaml already; a resume's (--epochs=N) are not.
        resumed = args.resume and args.from_step is None
        request = read_request(args, edits=args.edits if resumed else ConfigEdits(), resume=previous)
    elif request is None:  # a torchrun worker: read here, on rank 0 alone
        request = read_request(args)
    if request.sweep is not None:
        raise UserError("a sweep runs its members one by one: start it with python run.py, not torchrun")
    if args.auto_resume and request.run_directory is None:
        request = auto_resume_request(args, request)
        if request is None:  # that run has finished already
            return None
    if request.run_directory is not None:
        return plan_resume(args, request)
    if request.branch is not None:
        return plan_branch(args, request)
    if args.print_config:
        print(dump_yaml(request.config.to_dict()), end="")
        return None
    data_directory = str(find_data_directory(request.config))
    git = logging_gate(args)
    if git is not None:  # a tracker not installed, an archive URI with credentials: before anything runs
        check_trackers(request.config.loggers)
        check_archive(request.config.to_dict())
    return Plan(request.config, data_directory, git, args.mini, bootstrap=bootstrap_record(request.config))


def plan_resume(args, request: Request) -> Plan:
    """Continue a logged run from its newest valid checkpoint, exactly as if never stopped."""
    if args.no_logging or args.allow_dirty_repo:
        raise UserError("--resume continues a logged run, so it cannot run with --no-logging or --allow-dirty-repo")
    git = provenance.gate()
    check_trackers(request.config.loggers)
    check_same_commit(request.saved["git"]["commit"], git["commit"], "--resume", request.run_directory)
    data_directory = str(find_data_directory(request.config))
    check_same_data(request.saved.get("data_fingerprint"), data_directory, request.run_directory)
    check_bootstrap(request.saved.get("bootstrap"), "--resume", request.run_directory)
    mini = request.saved["flags"]["mini"]
    return Plan(request.config, data_directory, git, mini, resume_from=request.run_directory)


def read_branch(args, edits: ConfigEdits) -> Request:
    """--resume RUN_DIR --from-step N: a new run from the parent's checkpoint at step N, with
    the parent's config and any edits (results may change: it is a new run). Named
    `<parent>-from-<N>` unless the edits set run_name."""
    parent = Path(args.resume)
    if not any(key == "run_name" for key, _ in edits.overrides) and "run_name" not in dict(edits.modify):
        edits = replace(edits, overrides=[*edits.overrides, ("run_name", f"{parent.name}-from-{args.from_step}")])
    _, saved, config = load_run(parent, edits, "--resume --from-step", may_change=None)
    checkpoint = parent / "checkpoints" / step_file_name(args.from_step)
    if not checkpoint.exists() or not manifest_path(checkpoint).exists():
        kept = [info.step for info in step_checkpoints(parent / "checkpoints") if manifest_path(info.path).exists()]
        raise UserError(
            f"--from-step {args.from_step}: {parent} keeps no checkpoint of step {args.from_step}; "
            f"steps kept: {', '.join(map(str, kept)) or 'none'} (keep more with checkpoint.keep_every_n_steps "
            "or keep_every_n_epochs)"
        )
    branch = {"run": str(parent.resolve()), "step": args.from_step, "checkpoint": str(checkpoint.resolve())}
    return Request(config, None, saved, branch=branch)


def plan_branch(args, request: Request) -> Plan:
    """A branch runs the parent's code: the same commit, or its checkpoint would meet other code."""
    git = provenance.gate()
    check_trackers(request.config.loggers)
    check_same_commit(request.saved["git"]["commit"], git["commit"], "--from-step", Path(request.branch["run"]))
    data_directory = str(find_data_directory(request.config))
    return Plan(request.config, data_directory, git, request.saved["flags"]["mini"], branch=request.branch)


def auto_resume_request(args, request: Request) -> Request | None:
    """--auto-resume: continue `<project>/<run_name>` if it exists with this commit and config,
    or start it (the same request); None when it has finished. Anything else is refused, so a
    re-submitted job script never overwrites, nor forks, a run."""
    config = request.config
    if not config.run_name:
        raise UserError("--auto-resume finds the run by its name: set run_name in the config or --run_name=NAME")
    directory = run_parent(args, config) / config.run_name
    if not directory.exists():
        return request
    if not (directory / CONFIG_FILE).exists():
        raise Refusal(
            f"--auto-resume: {directory} exists but holds no {CONFIG_FILE} (a run killed while it was "
            "being created, or not a run directory); move it away, or choose another run_name"
        )
    _, saved, saved_config = load_run(directory, ConfigEdits(), "--auto-resume", may_change=None)
    differences = []
    current_commit = provenance.gate()["commit"]
    if saved["git"]["commit"] != current_commit:
        differences.append(f"commit ({str(saved['git']['commit'])[:12]} there, HEAD is {current_commit[:12]})")
    schema = project_schema()
    before, after = result_affecting_keys(saved_config, schema), result_affecting_keys(config, schema)
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    if changed:
        differences.append(f"config ({', '.join(changed)})")
    if bool(saved["flags"]["mini"]) != bool(args.mini):
        differences.append(f"--mini ({'on' if saved['flags']['mini'] else 'off'} there)")
    if differences:
        raise Refusal(
            f"--auto-resume: {directory} was made with another {' and '.join(differences)}; it is left as it is. "
            "Choose another run_name, or check out the run's commit and config."
        )
    metadata = read_yaml(directory / METADATA_FILE) or {}
    if metadata.get("status") == "finished" and not extends(config, metadata):
        print(f"{directory} has finished already ({metadata.get('stop_reason') or 'all epochs done'}); nothing to do")
        return None
    print(f"--auto-resume: {directory} exists with this commit and config; continuing it")
    return Request(config, directory, saved)


def extends(config: Config, metadata: dict) -> bool:
    """Whether a finished run's config asks for more training (a larger epochs or max_steps)."""
    if config.get("max_steps"):
        return config.max_steps > (metadata.get("global_step") or 0)
    stopped_early = str(metadata.get("stop_reason") or "").startswith("early stopping")
    return not stopped_early and config.epochs > (metadata.get("epochs_done") or 0)


def load_run(
    run_directory: str | Path, edits: ConfigEdits, flag: str, may_change: frozenset[str] | None = frozenset()
) -> tuple[Path, dict, Config]:
    """A logged run's saved config (read once), with the command line's edits if they leave
    results unchanged (or touch only `may_change`, dotted keys; None: anything may change,
    for a branch, which is a new run); and its recorded provenance."""
    run_directory = Path(run_directory)
    schema = project_schema()
    document, saved = split_provenance(read_run_files(run_directory, flag)[0])
    original = apply_defaults(document, schema)  # validated when the run started
    config = finalize(apply_edits(original, edits, schema), schema)
    before, after = result_affecting_keys(original, schema), result_affecting_keys(config, schema)
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    changed = [key for key in changed if may_change is not None and key not in may_change]
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


def check_same_commit(recorded: str, current: str, flag: str, run_directory: Path, what: str = "the run") -> None:
    if current != recorded:
        raise Refusal(
            f"{flag} {run_directory}: {what} was made at commit {str(recorded)[:12]}, but HEAD is "
            f"{current[:12]}. Check out its commit first: git checkout {str(recorded)[:12]}"
        )


def check_same_data(recorded: dict | None, data_directory: str, run_directory: Path) -> None:
    """A resumed run must read the data it started with: the data lives outside git."""
    if not recorded:
        return
    current = provenance.data_fingerprint(data_directory)
    for key, what in (("listing_sha256", "file names or sizes"), ("content_sha256", "file contents")):
        if recorded.get(key) and current.get(key) and recorded[key] != current[key]:
            raise UserError(
                f"--resume {run_directory}: the data in {data_directory} differs from the run's "
                f"({what} changed since it started), so the run could not continue as it began. "
                "Restore the data, or start a new run."
            )


def find_data_directory(config: Config) -> Path:
    """`data_directory`, relative to the project root unless absolute; it must exist."""
    data_directory = Path(config.data_directory)
    if not data_directory.is_absolute():
        data_directory = provenance.PROJECT_ROOT / data_directory
    if not data_directory.is_dir():
        raise UserError(
            f"config key 'data_directory': {str(data_directory)!r} is not a directory "
            "(relative paths start at the project root; for the example data run: make data)"
        )
    return data_directory


def logging_gate(args) -> dict | None:
    """The run's git provenance when it logs; None when it does not (--no-logging, --allow-dirty-repo)."""
    if args.no_logging:
        return None
    if args.allow_dirty_repo:
        confirm_dirty_run(args.y)
        return None
    return provenance.gate()


def confirm_dirty_run(yes: bool) -> None:
    """--allow-dirty-repo: say what is uncommitted, and ask before running without logging."""
    try:
        changes = provenance.repository_state().changes
    except Refusal as refusal:  # no git, no repository: nothing could be logged either
        changes = [str(refusal).split(", so")[0]]
    if changes:
        print("uncommitted changes:\n  " + "\n  ".join(changes[: provenance.MAX_LISTED_PATHS]), file=sys.stderr)
    print("--allow-dirty-repo: this run will log nothing (no run directory, metrics or checkpoints).", file=sys.stderr)
    if yes or not changes:
        return
    if not sys.stdin.isatty():
        raise Refusal("--allow-dirty-repo asks for confirmation, but there is no terminal to ask on; add --y")
    answer = input("Run anyway, without logging? [y/n] ").strip().lower()
    if answer not in ("y", "yes"):
        raise Refusal("not confirmed; nothing was run")


def run_parent(args, config: Config) -> Path:
    """Where a new run directory goes: --run-parent, else <log dir>/<project_name or model_type>."""
    return (
        Path(args.run_parent)
        if args.run_parent
        else log_root(args.log_dir) / (config.project_name or config.model_type)
    )
