"""Train a model from a YAML config, and log every result with the code that made it.

    python run.py CONFIG.yaml [flags] [--key.path=value ...]
    python run.py --resume RUN_DIR [--epochs=N]

What happens, top to bottom (see README.md):
  1. the config: YAML -> --find-replace -> --delete -> --modify -> --a.b=v -> defaults -> validation
  2. the names in it resolve to your classes in src/model.py and src/data_loader.py
  3. the git gate: logging needs a clean working tree, whose commit is recorded
  4. the model and the data are built, then the run directory is created
  5. the Trainer trains: per epoch, training, validation and the rollout phase

Exit codes: 0 done, 2 bad command line or config, 3 refused (repository state), 1 training failed.
"""

import shlex
import sys
import traceback
from pathlib import Path

from src.core import provenance
from src.core.checkpoint import load_model_weights, newest_valid_checkpoint
from src.core.cli import parse_command_line, recorded_flags
from src.core.config import (
    Config,
    apply_edits,
    config_hash,
    dump_yaml,
    finalize,
    load_config,
    load_yaml_file,
    result_affecting_keys,
)
from src.core.distributed import choose_device, init_distributed, shutdown
from src.core.errors import Refusal, UserError
from src.core.resolve import build_datasets, build_model, check_config_names, resolve_loss_function
from src.core.rundir import CONFIG_FILE, lock_run_directory, now, read_yaml, start_run, update_metadata
from src.core.seeding import configure_determinism, seed_everything
from src.core.trainer import Trainer
from src.schema import SCHEMA


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_command_line(argv)
        if args.resume:
            return resume(args)
        return train(args)
    except UserError as error:  # the user's to fix: one message, no traceback
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


def train(args) -> int:
    if args.config is None:
        raise UserError("no config file given; usage: python run.py CONFIG.yaml [flags] (see --help)")
    config = load_config(args.config, args.edits, SCHEMA)
    check_config_names(config)
    if args.print_config:
        print(dump_yaml(config.to_dict()), end="")
        return 0
    data_directory = find_data_directory(config)
    git = logging_gate(args)  # None: this run logs nothing
    return execute(config, args, data_directory, git)


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
        state = provenance.repository_state()
        changes = state.changes
    except Refusal as refusal:  # no git, no repository: nothing to log from either
        changes = [str(refusal).split(".")[0]]
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


def execute(config: Config, args, data_directory: Path, git: dict | None, resume_from: Path | None = None) -> int:
    """Build the model and the data, create (or reopen) the run directory, and train."""
    context = init_distributed(cpu=args.cpu)
    device = choose_device(args.cpu, context)
    seed_everything(config.seed)
    configure_determinism(config.deterministic, device)
    model = build_model(config)
    if config.bootstrap_model_file:
        model.load_state_dict(load_model_weights(config.bootstrap_model_file))
    datasets = build_datasets(config, str(data_directory), mini=args.mini)
    loss_function = resolve_loss_function(config.loss_function)

    run_directory, lock, resume_state = resume_from, None, None
    if git is not None and resume_from is None:
        run_directory = start_run(
            Path(args.log_dir or provenance.PROJECT_ROOT / "logs") / (config.project_name or config.model_type),
            config.run_name,
            config.to_dict(),
            {
                "git": git,
                "flags": recorded_flags(args),
                "command_line": shlex.join(["python", "run.py", *args.argv]),
                "environment": provenance.environment_provenance(),
                "data_fingerprint": provenance.data_fingerprint(data_directory),
            },
            provenance.installed_packages(),
        )
        print(f"logging to {run_directory}")
    if run_directory is not None:
        lock = lock_run_directory(run_directory)
    if resume_from is not None:
        found = newest_valid_checkpoint(run_directory / "checkpoints")
        resume_state = found[1] if found else {}
        step = resume_state["progress"]["global_step"] if found else 0
        print(f"resuming {run_directory} from {found[0].name if found else 'the start (no valid checkpoint)'}")
        metadata = read_yaml(run_directory / "metadata.yaml") or {}
        resumes = metadata.get("resumes") or []
        resumes.append({"at": now(), "from_step": step, "from_checkpoint": found[0].name if found else None})
        update_metadata(run_directory, status="running", resumes=resumes, error=None, finished=None)

    try:
        trainer = Trainer(
            config,
            model,
            loss_function,
            datasets,
            device=device,
            context=context,
            run_directory=run_directory,
            resume_state=resume_state,
            commit=git["commit"] if git else None,
            config_hash=config_hash(config, SCHEMA),
            show_progress=config.progress_bar is True or (config.progress_bar == "auto" and sys.stderr.isatty()),
        )
        trainer.fit()
    except BaseException as error:
        if run_directory is not None:
            interrupted = isinstance(error, KeyboardInterrupt)
            update_metadata(run_directory, status="interrupted" if interrupted else "failed", error=repr(error))
        if isinstance(error, UserError | KeyboardInterrupt):
            raise
        traceback.print_exc()
        return 1
    finally:
        shutdown(context)
        if lock is not None:
            lock.close()
    if run_directory is not None:
        update_metadata(run_directory, status="finished", finished=now())
        print(f"finished: {run_directory}")
    return 0


def resume(args) -> int:
    """Continue a logged run from its newest valid checkpoint, exactly as if never stopped."""
    run_directory = Path(args.resume)
    if not (run_directory / CONFIG_FILE).is_file():
        raise UserError(f"--resume {run_directory}: no {CONFIG_FILE} there; expected a run directory under logs/")
    if args.config is not None:
        raise UserError("--resume takes the run's own config; drop the config file argument")
    if args.no_logging or args.allow_dirty_repo:
        raise UserError("--resume continues a logged run, so it cannot run with --no-logging or --allow-dirty-repo")
    saved = read_yaml(run_directory / CONFIG_FILE)
    recorded = saved["git"]["commit"]
    git = provenance.gate()
    if git["commit"] != recorded:
        raise Refusal(
            f"--resume {run_directory}: the run was made at commit {recorded[:12]}, but HEAD is "
            f"{git['commit'][:12]}. Check out its commit first: git checkout {recorded[:12]}"
        )
    original = finalize(load_yaml_file(run_directory / CONFIG_FILE), SCHEMA)
    config = finalize(apply_edits(original.to_dict(), args.edits, SCHEMA), SCHEMA)
    before, after = result_affecting_keys(original, SCHEMA), result_affecting_keys(config, SCHEMA)
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    if changed:
        raise UserError(
            f"--resume cannot change {', '.join(changed)}: they change what the run computes, so the "
            "resumed run would not continue the original. Start a new run instead. (Keys such as "
            "epochs, description and checkpoint timing may change.)"
        )
    args.mini = saved["flags"]["mini"]  # a result-affecting flag: always the run's own
    check_config_names(config)
    return execute(config, args, find_data_directory(config), git, resume_from=run_directory)


if __name__ == "__main__":
    sys.exit(main())
