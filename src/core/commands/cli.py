"""The command line of run.py (README, "Command line"), parsed once into a `CommandLine`:
a frozen record of what was asked, which is all the rest of the core ever sees of it."""

import argparse
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from src.core.config.edits import ConfigEdits
from src.core.errors import UserError

OVERRIDE = re.compile(r"--([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)=(.*)", re.DOTALL)

DESCRIPTION = """Train, resume, evaluate, sweep and reproduce runs of this template.

  python run.py CONFIG.yaml [flags] [--KEY.PATH=VALUE ...]

Config edits apply in this order: --find-replace, --delete, --modify, then
--key=value overrides (VALUE is YAML: --epochs=3, --optimizer.lr=3e-4, --sizes=[1,2])."""


@dataclass(frozen=True)
class CommandLine:
    """What the command line asks for (each flag's meaning: build_parser's help texts)."""

    argv: tuple[str, ...]
    config: str | None  # CONFIG.yaml: a new run (or a sweep)
    edits: ConfigEdits  # --find-replace, --delete, --modify and --KEY=VALUE, in that order
    # How a run runs
    cpu: bool = False
    mini: bool = False
    no_logging: bool = False
    allow_dirty_repo: bool = False
    snapshot: bool = False  # --snapshot, or TEMPLATE_SNAPSHOT=1 (record/snapshot.py)
    y: bool = False
    print_config: bool = False
    log_dir: str | None = None
    run_parent: str | None = None
    auto_resume: bool = False
    requeue: bool = False
    slurm: bool = False
    submit: bool = False
    # What else it can do: one of these at a time
    resume: str | None = None
    from_step: int | None = None
    evaluate: str | None = None
    checkpoints: tuple[str, ...] | None = None
    name: str | None = None
    subset: float | None = None
    save_outputs: bool = False
    reproduce: str | None = None
    runs: str | None = None
    filter: str | None = None
    status: str | None = None
    csv: bool = False
    note: tuple[str, str] | None = None
    export: str | None = None
    to: str | None = None
    archive: tuple[str, ...] | None = None
    delete_local_checkpoints: bool = False
    restore: str | None = None
    diff: tuple[str, str] | None = None
    json: bool = False
    full_diff: bool = False


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse shows nargs="+" as `X [X ...]`; --archive takes RUN_DIR and an optional URI."""

    def _format_args(self, action, default_metavar):
        if action.dest == "archive":
            return "RUN_DIR [URI]"
        return super()._format_args(action, default_metavar)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a usage mistake is exit code 2 with one line, as every other
        raise UserError(f"{message} (see python run.py --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="run.py",
        description=DESCRIPTION,
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("config", nargs="?", help="the YAML config to run")
    add = parser.add_argument
    add("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    add("--mini", action="store_true", help="datasets load a small subset (default: the first 100 items)")
    add("--no-logging", action="store_true", help="write nothing: no run directory, logs or checkpoints")
    add("--allow-dirty-repo", action="store_true", help="run with uncommitted changes (asks; logging off)")
    add("--snapshot", action="store_true", help="log a dirty tree's run against a snapshot commit (docs/snapshot.md)")
    add("--y", action="store_true", help="answer yes to the --allow-dirty-repo question")
    # Given twice, these add up (argparse's default would keep only the last occurrence).
    add("--find-replace", nargs="+", action="append", metavar="OLD NEW", default=[], help="replace substrings")
    add("--delete", nargs="+", action="append", metavar="KEY", default=[], help="remove keys (names or dotted paths)")
    add("--modify", nargs="+", action="append", metavar="KEY VALUE", default=[], help="replace a key's value (YAML)")
    add("--print-config", action="store_true", help="print the resolved, validated config and exit")
    add("--log-dir", metavar="DIR", help="where run directories go (default: logs/ in the project)")
    add("--resume", metavar="RUN_DIR", help="continue a logged run (a directory or an archive URI)")
    add("--evaluate", metavar="RUN_DIR", help="run validation and rollout on a run's saved checkpoints")
    add("--checkpoints", nargs="+", metavar="NAME", help="with --evaluate: only these (best, last, step-N.pt, N)")
    add("--name", metavar="NAME", help="with --evaluate: the evaluation's name (default: default)")
    add("--subset", type=_fraction, metavar="FRACTION", help="with --evaluate: the first ceil(F*n) samples")
    add("--save-outputs", action="store_true", help="with --evaluate: keep per-sample outputs (.npz)")
    add("--from-step", type=_step, metavar="N", help="with --resume: branch a new run from step N's checkpoint")
    add("--auto-resume", action="store_true", help="continue the run named run_name if it exists, else start it")
    add("--reproduce", metavar="RUN_DIR", help="re-run a logged run at its commit and compare the results")
    add("--runs", nargs="?", const="", metavar="DIR", help="a table of logged runs (default: logs/; or an archive URI)")
    add("--filter", metavar="TEXT", help="with --runs: runs whose description or name contains TEXT")
    add("--status", metavar="STATUS", help="with --runs: running, finished, failed, crashed or interrupted")
    add("--csv", action="store_true", help="with --runs: print CSV")
    add("--note", nargs=2, metavar=("RUN_DIR", "TEXT"), help="write TEXT as the run's summary in metadata.yaml")
    add("--export", metavar="RUN_DIR", help="replay a run's metrics and figures into a tracker (with --to)")
    add("--to", choices=["wandb", "mlflow"], help="with --export: the tracker to fill")
    add("--archive", nargs="+", metavar="RUN_DIR [URI]", help="back a run up to an archive (default: its archive.uri)")
    add("--delete-local-checkpoints", action="store_true", help="with --archive: then delete step files but best, last")
    add("--restore", metavar="URI", help="download an archived run into --log-dir (default: logs/), verified")
    add(
        "--diff",
        nargs=2,
        metavar=("RUN_A", "RUN_B"),
        help="what differs between two runs, and whether it can change results",
    )
    add("--json", action="store_true", help="with --diff: print one JSON document")
    add("--full-diff", action="store_true", help="with --diff: the whole code diff, not only its --stat")
    add("--run-parent", metavar="DIR", help="create the run directory right under DIR (used by --reproduce)")
    add("--slurm", action="store_true", help="write the sweep's Slurm array script instead of running it here")
    add("--submit", action="store_true", help="with --slurm: also submit it with sbatch")
    add("--requeue", action="store_true", help="on SIGUSR1 (Slurm's warning): checkpoint, requeue, later resume")
    return parser


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction 0 < F <= 1 (0.1 is 10%), got {text!r}")
    return value


def _step(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an optimizer step (an integer >= 0), got {text!r}")
    return int(text)


def _pairs(occurrences: list[list[str]], flag: str, names: str) -> list[tuple[str, str]]:
    """The pairs of every occurrence of `flag`, in order; each occurrence must hold whole pairs."""
    pairs = []
    for values in occurrences:
        if len(values) % 2:
            raise UserError(
                f"{flag} takes pairs ({names}), but got {len(values)} value(s): {' '.join(values)}; "
                "the last one has no partner"
            )
        pairs += zip(values[::2], values[1::2], strict=True)
    return pairs


def parse_command_line(argv: list[str] | None = None) -> CommandLine:
    """Parse flags; `--a.b=value` arguments become `edits.overrides`."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    # Take the overrides out first: argparse would read "--sizes=[1, 2]" (with a space) as a value.
    overrides, rest = [], []
    for argument in argv:
        match = OVERRIDE.fullmatch(argument)
        if match and f"--{match.group(1)}" not in flags:
            overrides.append((match.group(1), match.group(2)))
        else:
            rest.append(argument)
    args, unknown = parser.parse_known_args(rest)
    for argument in unknown:
        if argument.startswith("--"):
            raise UserError(
                f"unknown flag {argument!r}; to change a config key write {argument.split('=')[0]}=VALUE "
                "(see python run.py --help for the flags)"
            )
        else:
            raise UserError(f"unexpected argument {argument!r} (one config file at most)")
    if args.to and not args.export:
        raise UserError(f"--to {args.to} goes with --export RUN_DIR (which run to replay into {args.to})")
    edits = ConfigEdits(
        find_replace=_pairs(args.find_replace, "--find-replace", "OLD NEW"),
        delete=[key for keys in args.delete for key in keys],
        modify=_pairs(args.modify, "--modify", "KEY VALUE"),
        overrides=overrides,
    )
    given = {field.name: getattr(args, field.name) for field in fields(CommandLine) if hasattr(args, field.name)}
    for name in ("checkpoints", "note", "archive", "diff"):  # lists become tuples: the record is frozen
        if given[name] is not None:
            given[name] = tuple(given[name])
    command = CommandLine(**{**given, "argv": tuple(argv), "edits": edits})
    check_flags_apply(command)
    check_paths(command)
    return command


# What a command does: one of these flags, or (none of them) a new run from CONFIG.yaml.
MODES = ("--runs", "--note", "--reproduce", "--evaluate", "--resume", "--diff")
NEW_RUN = "a new run (CONFIG.yaml)"

# Each flag and the modes where it does something. Anywhere else it would be silently
# ignored, and a run the user did not ask for would look like the one they did.
# (--mini with --resume changes nothing, the run keeps its own, but requeued Slurm tasks pass it.)
FLAG_MODES = {
    "--cpu": (NEW_RUN, "--resume", "--evaluate", "--reproduce"),
    "--mini": (NEW_RUN, "--resume"),
    "--no-logging": (NEW_RUN, "--evaluate"),
    "--allow-dirty-repo": (NEW_RUN,),
    "--snapshot": (NEW_RUN, "--resume"),
    "--find-replace": (NEW_RUN, "--resume", "--evaluate"),
    "--delete": (NEW_RUN, "--resume", "--evaluate"),
    "--modify": (NEW_RUN, "--resume", "--evaluate"),
    "--KEY=VALUE": (NEW_RUN, "--resume", "--evaluate", "--reproduce"),
    "--print-config": (NEW_RUN,),
    "--log-dir": (NEW_RUN,),
    "--run-parent": (NEW_RUN, "--resume"),  # with --resume: a branch's (--from-step)
    "--checkpoints": ("--evaluate",),
    "--name": ("--evaluate",),
    "--subset": ("--evaluate",),
    "--save-outputs": ("--evaluate",),
    "--from-step": ("--resume",),
    "--auto-resume": (NEW_RUN,),
    "--filter": ("--runs",),
    "--status": ("--runs",),
    "--csv": ("--runs",),
    "--slurm": (NEW_RUN,),
    "--submit": (NEW_RUN,),
    "--requeue": (NEW_RUN, "--resume"),
    "--json": ("--diff",),
    "--full-diff": ("--diff",),
}


def _given(command: CommandLine) -> dict[str, bool]:
    """Which of FLAG_MODES's flags the command line holds."""
    return {
        "--cpu": command.cpu,
        "--mini": command.mini,
        "--no-logging": command.no_logging,
        "--allow-dirty-repo": command.allow_dirty_repo,
        "--snapshot": command.snapshot,
        "--find-replace": bool(command.edits.find_replace),
        "--delete": bool(command.edits.delete),
        "--modify": bool(command.edits.modify),
        "--KEY=VALUE": bool(command.edits.overrides),
        "--print-config": command.print_config,
        "--log-dir": command.log_dir is not None,
        "--run-parent": command.run_parent is not None,
        "--checkpoints": command.checkpoints is not None,
        "--name": command.name is not None,
        "--subset": command.subset is not None,
        "--save-outputs": command.save_outputs,
        "--from-step": command.from_step is not None,
        "--auto-resume": command.auto_resume,
        "--filter": command.filter is not None,
        "--status": command.status is not None,
        "--csv": command.csv,
        "--slurm": command.slurm,
        "--submit": command.submit,
        "--requeue": command.requeue,
        "--json": command.json,
        "--full-diff": command.full_diff,
    }


def check_flags_apply(command: CommandLine) -> None:
    """Refuse a flag that would do nothing where it is given (exit 2 at parse time)."""
    chosen = [mode for mode in MODES if getattr(command, mode[2:]) is not None]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)} cannot be combined; give one of them")
    mode = chosen[0] if chosen else NEW_RUN
    if command.config is not None and mode != NEW_RUN:
        raise UserError(f"{mode} takes no config file, but got {command.config!r}; drop it")
    given = _given(command)
    for flag, modes in FLAG_MODES.items():
        if given[flag] and mode not in modes:
            raise UserError(f"{flag} does nothing with {mode}; it applies to {' or '.join(modes)}. Drop it")
    requirements = [
        ("--y", command.y, "--allow-dirty-repo", command.allow_dirty_repo),
        ("--submit", command.submit, "--slurm", command.slurm),
        (
            "--run-parent",
            command.run_parent is not None and command.resume is not None,
            "--from-step",
            command.from_step is not None,
        ),
    ]
    for flag, flag_given, needed, needed_given in requirements:
        if flag_given and not needed_given:
            raise UserError(f"{flag} does nothing without {needed}; add {needed} or drop {flag}")
    silent = [("--no-logging", command.no_logging), ("--allow-dirty-repo", command.allow_dirty_repo)]
    silent += [("--print-config", command.print_config)]
    for flag, flag_given in silent:  # nothing is logged: where to log does not matter
        for path_flag, path in (("--log-dir", command.log_dir), ("--run-parent", command.run_parent)):
            if flag_given and path is not None:
                raise UserError(f"{path_flag} does nothing with {flag}, which logs nothing; drop one of them")
    if command.snapshot and (command.no_logging or command.allow_dirty_repo):
        flag = "--no-logging" if command.no_logging else "--allow-dirty-repo"
        raise UserError(f"--snapshot logs a dirty tree's run, and {flag} logs nothing; drop one of them")
    if command.auto_resume and (command.no_logging or command.allow_dirty_repo):
        raise UserError("--auto-resume continues a logged run; it cannot run with --no-logging or --allow-dirty-repo")
    if command.log_dir is not None and command.run_parent is not None:
        raise UserError("--run-parent places the run directory itself, so --log-dir would do nothing; drop one")
    printing_only = (("--slurm", command.slurm), ("--requeue", command.requeue), ("--auto-resume", command.auto_resume))
    for flag, flag_given in printing_only:
        if flag_given and command.print_config:
            raise UserError(f"{flag} does nothing with --print-config, which only prints the config; drop one of them")


def check_paths(command: CommandLine) -> None:
    """--log-dir and --run-parent must be directories that can exist: refuse them now, not after training starts."""
    for flag, value in (("--log-dir", command.log_dir), ("--run-parent", command.run_parent)):
        if value is None:
            continue
        path = Path(value)
        if path.exists() and not path.is_dir():
            raise UserError(f"{flag} {value}: is a file, not a directory; expected a directory (existing or not)")
        if flag == "--log-dir":  # created with its parents: the nearest existing one must be a directory
            existing = next(parent for parent in path.absolute().parents if parent.exists())
            if not existing.is_dir():
                raise UserError(f"{flag} {value}: {existing} is a file, so {value} cannot be a directory")
        elif not path.absolute().parent.is_dir():
            raise UserError(
                f"{flag} {value}: its parent {path.absolute().parent} is not an existing directory; "
                "expected a directory inside an existing one"
            )


def recorded_flags(command: CommandLine) -> dict:
    """The flags as they are saved in a run's config.yaml."""
    return {
        "cpu": command.cpu,
        "mini": command.mini,
        "no_logging": command.no_logging,
        "allow_dirty_repo": command.allow_dirty_repo,
        "snapshot": command.snapshot,
        "y": command.y,
        "log_dir": command.log_dir,
        "run_parent": command.run_parent,
        "requeue": command.requeue,
        "find_replace": [list(pair) for pair in command.edits.find_replace],
        "delete": list(command.edits.delete),
        "modify": [list(pair) for pair in command.edits.modify],
        "overrides": {key: value for key, value in command.edits.overrides},
    }
