"""Train a model from a YAML config, and log every result with the code that made it.

    python run.py CONFIG.yaml [flags] [--key.path=value ...]
    python run.py --resume RUN_DIR [--epochs=N]
    python run.py --evaluate RUN_DIR [--checkpoints NAME ...]

What happens, top to bottom (README.md has the details):
  1. the config: YAML -> --find-replace -> --delete -> --modify -> --a.b=v -> defaults -> validation
  2. its names resolve to your classes in src/model.py and src/data_loader.py
  3. the git gate: logging needs a clean working tree, whose commit is recorded
  4. the model and the data are built, then the run directory is created
  5. the Trainer trains: per epoch, training, validation and the rollout phase

Under torchrun, rank 0 alone does steps 1 to 3 and creates the run directory; every
rank receives the result. Exit codes: 0 done, 2 bad command line, config or checkpoint,
3 refused (repository state), 1 training failed, 4 --reproduce found differences, 130 Ctrl-C.
"""

import os
import shlex
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from src.core import provenance
from src.core.checkpoint import (
    CheckpointWriteError,
    load_model_weights,
    newest_valid_checkpoint,
    read_checkpoint,
    set_aside_newer_than,
    warn,
)
from src.core.cli import parse_command_line, recorded_flags
from src.core.config import (
    Config,
    ConfigEdits,
    apply_edits,
    config_hash,
    dump_yaml,
    finalize,
    load_config,
    load_yaml_file,
    result_affecting_keys,
)
from src.core.distributed import (
    DistContext,
    broadcast_object,
    choose_device,
    connect,
    init_process_group,
    launch_settings,
    launch_with_torchrun,
    launched_by_torchrun,
    share_from_rank_zero,
    shutdown,
)
from src.core.errors import Refusal, UserError
from src.core.evaluation import checkpoints_to_evaluate, evaluate_checkpoints, write_evaluation
from src.core.reproduce import reproduce
from src.core.resolve import build_datasets, build_model, check_config_names, resolve_loss_function
from src.core.rundir import CONFIG_FILE, lock_run_directory, now, read_yaml, start_run, update_metadata
from src.core.runs import filter_rows, format_table, list_runs, set_note
from src.core.seeding import configure_determinism, derive_seed, seed_everything
from src.core.sweep import create as create_sweep
from src.core.sweep import expand, member_rows, requeue_this_job, run_locally, submit, write_slurm_script
from src.core.trainer import PREEMPTION_REQUESTED, Preempted, Trainer
from src.schema import SCHEMA


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_command_line(argv)
        if args.requeue:  # Slurm's warning before the time limit: checkpoint at the next step, then requeue
            signal.signal(signal.SIGUSR1, lambda *_: PREEMPTION_REQUESTED.set())
        if args.runs is not None:
            root = Path(args.runs) if args.runs else provenance.PROJECT_ROOT / "logs"
            if (root / "sweep.yaml").exists():  # a sweep: its members, with their Slurm state
                print(format_table(filter_rows(member_rows(root), args.filter, args.status), args.csv))
            else:
                print(format_table(list_runs(root, args.filter, args.status), args.csv))
            return 0
        if args.note:
            set_note(Path(args.note[0]), args.note[1])
            return 0
        if args.reproduce:
            return reproduce(Path(args.reproduce), args.cpu, args.edits.overrides)
        if args.evaluate:
            return evaluate(args)
        if args.config and not args.resume:
            document = apply_edits(load_yaml_file(args.config), args.edits, SCHEMA)
            if document.get("sweep") is not None or args.slurm or args.submit:
                return run_sweep(args, document)
        return train(args)
    except UserError as error:  # the user's to fix: one message, no traceback
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@dataclass
class Plan:
    """What rank 0 decides before anything is built, and every rank then follows."""

    config: dict
    data_directory: str
    git: dict | None  # None: this run logs nothing
    mini: bool  # --mini, or a resumed run's own setting
    resume_from: str | None = None  # a run directory to continue


def train(args) -> int:
    if not launched_by_torchrun():
        settings = processes_requested(args)
        if settings:  # several processes: start them through torchrun, each running this script
            make_plan(args, DistContext())  # refuse bad input here, once, not once per torchrun restart
            return launch_with_torchrun(settings, __file__, [*args.argv, "--y"] if args.allow_dirty_repo else args.argv)
    context = connect()
    status = 1
    try:
        plan = share_from_rank_zero(context, "plan", lambda: make_plan(args, context))
        if plan is None:  # --print-config
            return 0
        status = build_and_fit(plan, args, context)
        return status
    finally:
        shutdown(context, finished=status == 0)


def make_plan(args, context: DistContext) -> Plan | None:
    previous = context.recall("run_directory") if context.restart_count else None
    if previous:  # torchrun restarted the workers after a failure: continue the same run
        print(f"restart {context.restart_count}: resuming {previous}")
        if not args.resume:  # a new run's edits are in its config.yaml already; a resume's (--epochs=N) are not
            args.edits = ConfigEdits()
        args.resume, args.config = previous, None
    return plan_resume(args) if args.resume else plan_new_run(args)


def plan_new_run(args) -> Plan | None:
    if args.config is None:
        raise UserError("no config file given; usage: python run.py CONFIG.yaml [flags] (see --help)")
    config = load_config(args.config, args.edits, SCHEMA)
    check_config_names(config)
    if args.print_config:
        print(dump_yaml(config.to_dict()), end="")
        return None
    data_directory = find_data_directory(config)
    return Plan(config.to_dict(), str(data_directory), logging_gate(args), args.mini)


def plan_resume(args) -> Plan:
    """Continue a logged run from its newest valid checkpoint, exactly as if never stopped."""
    if args.no_logging or args.allow_dirty_repo:
        raise UserError("--resume continues a logged run, so it cannot run with --no-logging or --allow-dirty-repo")
    run_directory, saved, config = load_run(args.resume, args, "--resume")
    git = provenance.gate()
    check_same_commit(saved, git, "--resume", run_directory)
    data_directory = str(find_data_directory(config))
    check_same_data(saved.get("data_fingerprint"), data_directory, run_directory)
    return Plan(config.to_dict(), data_directory, git, saved["flags"]["mini"], resume_from=str(run_directory))


def build_and_fit(plan: Plan, args, context: DistContext) -> int:
    """Every rank: build the model and the data; rank 0: create (or reopen) the run directory; train."""
    config = Config(plan.config)
    device = choose_device(args.cpu, context)
    init_process_group(context, config.distributed.backend, config.distributed.timeout_seconds, device)
    model, datasets, loss_function = build_parts(config, plan.data_directory, plan.mini, device, context.rank)
    run_directory = lock = None
    if context.is_main and plan.git is not None:
        run_directory = (
            Path(plan.resume_from) if plan.resume_from else create_run_directory(plan, args, context.world_size)
        )
        lock = lock_run_directory(run_directory)
        context.remember("run_directory", str(run_directory))
    run_directory = broadcast_object(run_directory, context)
    checkpoint = None
    if plan.resume_from:
        checkpoint = share_from_rank_zero(
            context, "checkpoint", lambda: start_resume(run_directory, context, config, plan.git["commit"])
        )
    try:
        trainer = Trainer(
            config,
            model,
            loss_function,
            datasets,
            device=device,
            context=context,
            run_directory=run_directory,
            resume_state=(read_checkpoint(checkpoint) if checkpoint else {}) if plan.resume_from else None,
            commit=plan.git["commit"] if plan.git else None,
            config_hash=config_hash(config, SCHEMA),
            show_progress=config.progress_bar is True or (config.progress_bar == "auto" and sys.stderr.isatty()),
        )
        trainer.handles_preemption = args.requeue
        trainer.fit()
    except Preempted as preempted:
        if run_directory is not None and context.is_main:
            update_metadata(run_directory, status="preempted", error=None)
            print(f"{preempted}; {requeue_this_job()}")
        return 0
    except BaseException as error:
        if run_directory is not None and context.is_main:
            status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            update_metadata(run_directory, status=status, error=repr(error))
        if isinstance(error, UserError | KeyboardInterrupt):
            raise
        if isinstance(error, CheckpointWriteError):  # the disk, not the code: no traceback
            print(f"error: {error}", file=sys.stderr)
        else:
            traceback.print_exc()
        return 1
    finally:
        if lock is not None:
            lock.close()
    if run_directory is not None and context.is_main:
        update_metadata(run_directory, status="finished", finished=now())
        print(f"finished: {run_directory}")
    return 0


def build_parts(config: Config, data_directory: str, mini: bool, device, rank: int = 0):
    """The model (the same initial weights on every rank), its datasets and its loss function."""
    seed_everything(config.seed)
    configure_determinism(config.deterministic, device)
    model = build_model(config)
    if config.bootstrap_model_file:
        model.load_state_dict(load_model_weights(config.bootstrap_model_file))
    datasets = build_datasets(config, data_directory, mini=mini)
    seed_everything(derive_seed(config.seed, "rank", rank))  # each rank its own dropout and augmentations
    return model, datasets, resolve_loss_function(config.loss_function)


def create_run_directory(plan: Plan, args, world_size: int) -> Path:
    config = Config(plan.config)
    log_root = Path(args.log_dir) if args.log_dir else provenance.PROJECT_ROOT / "logs"
    run_directory = start_run(
        Path(args.run_parent) if args.run_parent else log_root / (config.project_name or config.model_type),
        config.run_name,
        plan.config,
        {
            "git": plan.git,
            "flags": recorded_flags(args),
            "command_line": shlex.join(["python", "run.py", *args.argv]),
            "environment": {**provenance.environment_provenance(), "world_size": world_size},
            "data_fingerprint": provenance.data_fingerprint(plan.data_directory),
        },
        provenance.installed_packages(),
    )
    print(f"logging to {run_directory}")
    return run_directory


def start_resume(run_directory: Path, context: DistContext, config: Config, commit: str) -> Path | None:
    """Find the newest valid checkpoint, check that it belongs to this config and commit,
    and record the resume in metadata.yaml."""
    found = newest_valid_checkpoint(run_directory / "checkpoints")
    path, state = found if found else (None, None)
    step = state["progress"]["global_step"] if state else 0
    if state and state["config_hash"] != config_hash(config, SCHEMA):
        raise UserError(
            f"--resume {run_directory}: {path.name} was made with another config than the run's "
            f"{CONFIG_FILE} (was it edited by hand?). Restore that file, or start a new run."
        )
    if state and state["commit"] != commit:
        raise Refusal(
            f"--resume {run_directory}: {path.name} was made at commit {str(state['commit'])[:12]}, "
            f"but HEAD is {commit[:12]}. Check out its commit first: git checkout {str(state['commit'])[:12]}"
        )
    for name in set_aside_newer_than(run_directory / "checkpoints", step):
        warn(f"warning: moved {name}, newer than the checkpoint resumed from, to checkpoints/discarded/")
    print(f"resuming {run_directory} from {path.name if path else 'the start (no valid checkpoint)'}")
    resumes = (read_yaml(run_directory / "metadata.yaml") or {}).get("resumes") or []
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
    return path


def evaluate(args) -> int:
    """Run the validation and rollout phases on a run's saved checkpoints (see src/core/evaluation.py)."""
    run_directory, saved, config = load_run(args.evaluate, args, "--evaluate")
    commit = None
    if not args.no_logging:  # results written into the run must come from the run's own code
        commit = provenance.gate()["commit"]
        check_same_commit(saved, {"commit": commit}, "--evaluate", run_directory)
    device = choose_device(args.cpu, DistContext())
    data_directory = str(find_data_directory(config))
    model, datasets, loss_function = build_parts(config, data_directory, saved["flags"]["mini"], device)
    trainer = Trainer(config, model, loss_function, datasets, device=device)
    paths = checkpoints_to_evaluate(run_directory / "checkpoints", args.checkpoints)
    results = evaluate_checkpoints(trainer, paths)
    if commit is not None:
        print(f"wrote {write_evaluation(run_directory, results, commit)}")
    return 0


def run_sweep(args, document: dict) -> int:
    """A sweep (or, with --slurm, any config): every combination, pinned to this commit."""
    members = expand(document, SCHEMA)
    if args.print_config:
        for member in members:
            print(f"{member.name}: {member.parameters}")
        return 0
    if args.no_logging or args.allow_dirty_repo:
        raise UserError("a sweep logs every run it makes, so it cannot run with --no-logging or --allow-dirty-repo")
    for member in members:  # the sub-runs run in a worktree without the data: give them its real place
        member.config["data_directory"] = str(find_data_directory(Config(member.config)))
    git = provenance.gate()
    first = Config(members[0].config)
    log_root = Path(args.log_dir) if args.log_dir else provenance.PROJECT_ROOT / "logs"
    sweep = create_sweep(log_root / (first.project_name or first.model_type), first.run_name, document, members, git)
    print(f"sweep of {len(members)} run(s) at commit {git['commit'][:12]}: {sweep.directory}")
    flags = [flag for flag, on in (("--cpu", args.cpu), ("--mini", args.mini)) if on]
    if not (args.slurm or args.submit):
        return run_locally(sweep, flags)
    script = write_slurm_script(sweep, first.slurm.to_dict(), flags, args.requeue)
    if args.submit:
        print(f"submitted job {submit(script)} ({script})")
    else:
        print(f"wrote {script}\nsubmit it with: sbatch {script}")
    return 0


# ---------------------------------------------------------------------------------------
# Checks


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


def load_run(run_directory: str, args, flag: str) -> tuple[Path, dict, Config]:
    """A logged run's saved config, with the command line's edits if they leave results unchanged."""
    run_directory = Path(run_directory)
    if not (run_directory / CONFIG_FILE).is_file():
        raise UserError(f"{flag} {run_directory}: no {CONFIG_FILE} there; expected a run directory under logs/")
    if args.config is not None:
        raise UserError(f"{flag} uses the run's own config; drop the config file argument")
    saved = read_yaml(run_directory / CONFIG_FILE)
    original = finalize(load_yaml_file(run_directory / CONFIG_FILE), SCHEMA)
    config = finalize(apply_edits(original.to_dict(), args.edits, SCHEMA), SCHEMA)
    before, after = result_affecting_keys(original, SCHEMA), result_affecting_keys(config, SCHEMA)
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    if changed:
        raise UserError(
            f"{flag} cannot change {', '.join(changed)}: they change what the run computes, so the "
            "result would not belong to this run. Start a new run instead. (Keys such as "
            "epochs, description and checkpoint timing may change.)"
        )
    check_config_names(config)
    return run_directory, saved, config


def check_same_commit(saved: dict, git: dict, flag: str, run_directory: Path) -> None:
    recorded = saved["git"]["commit"]
    if git["commit"] != recorded:
        raise Refusal(
            f"{flag} {run_directory}: the run was made at commit {recorded[:12]}, but HEAD is "
            f"{git['commit'][:12]}. Check out its commit first: git checkout {recorded[:12]}"
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


def processes_requested(args) -> dict | None:
    """The `distributed` settings when the config asks for several processes, else None."""
    if args.print_config or (args.config is None and args.resume is None):
        return None
    if args.resume:
        config = load_run(args.resume, args, "--resume")[2]
    else:
        config = load_config(args.config, args.edits, SCHEMA)
    settings = launch_settings(config)
    return settings if settings["nproc_per_node"] * settings["nnodes"] > 1 else None


if __name__ == "__main__":
    sys.exit(main())
