"""The command line of run.py (README, "Command line")."""

import argparse
import re
import sys

from src.core.config import ConfigEdits
from src.core.errors import UserError

OVERRIDE = re.compile(r"--([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)=(.*)", re.DOTALL)

DESCRIPTION = """Train, resume, evaluate, sweep and reproduce runs of this template.

  python run.py CONFIG.yaml [flags] [--KEY.PATH=VALUE ...]

Config edits apply in this order: --find-replace, --delete, --modify, then
--key=value overrides (VALUE is YAML: --epochs=3, --optimizer.lr=3e-4, --sizes=[1,2])."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a usage mistake is exit code 2 with one line, as every other
        raise UserError(f"{message} (see python run.py --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="run.py",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("config", nargs="?", help="the YAML config to run")
    add = parser.add_argument
    add("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    add("--mini", action="store_true", help="datasets load a small subset (default: the first 100 items)")
    add("--no-logging", action="store_true", help="write nothing: no run directory, logs or checkpoints")
    add("--allow-dirty-repo", action="store_true", help="run with uncommitted changes (asks; logging off)")
    add("--y", action="store_true", help="answer yes to the --allow-dirty-repo question")
    add("--find-replace", nargs="+", metavar="OLD NEW", default=[], help="replace substrings in string values")
    add("--delete", nargs="+", metavar="KEY", default=[], help="remove keys (names or dotted paths)")
    add("--modify", nargs="+", metavar="KEY VALUE", default=[], help="replace a key's value (VALUE is YAML)")
    add("--print-config", action="store_true", help="print the resolved, validated config and exit")
    add("--log-dir", metavar="DIR", help="where run directories go (default: logs/ in the project)")
    add("--resume", metavar="RUN_DIR", help="continue a logged run (a directory or an archive URI)")
    add("--evaluate", metavar="RUN_DIR", help="run validation and rollout on a run's saved checkpoints")
    add("--checkpoints", nargs="+", metavar="NAME", help="with --evaluate: only these (best, last, step-N.pt, N)")
    add("--reproduce", metavar="RUN_DIR", help="re-run a logged run at its commit and compare the results")
    add("--runs", nargs="?", const="", metavar="DIR", help="a table of logged runs (default: logs/; or an archive URI)")
    add("--filter", metavar="TEXT", help="with --runs: runs whose description or name contains TEXT")
    add("--status", metavar="STATUS", help="with --runs: running, finished, failed, crashed or interrupted")
    add("--csv", action="store_true", help="with --runs: print CSV")
    add("--note", nargs=2, metavar=("RUN_DIR", "TEXT"), help="write TEXT as the run's summary in metadata.yaml")
    add("--archive", nargs="+", metavar="RUN_DIR [URI]", help="back a run up to an archive (default: its archive.uri)")
    add("--delete-local-checkpoints", action="store_true", help="with --archive: then delete step files but best, last")
    add("--restore", metavar="URI", help="download an archived run into --log-dir (default: logs/), verified")
    add("--run-parent", metavar="DIR", help="create the run directory right under DIR (used by --reproduce)")
    add("--slurm", action="store_true", help="write the sweep's Slurm array script instead of running it here")
    add("--submit", action="store_true", help="with --slurm: also submit it with sbatch")
    add("--requeue", action="store_true", help="on SIGUSR1 (Slurm's warning): checkpoint, requeue, later resume")
    return parser


def _pairs(values: list[str], flag: str, names: str) -> list[tuple[str, str]]:
    if len(values) % 2:
        raise UserError(
            f"{flag} takes pairs ({names}), but got {len(values)} value(s): {' '.join(values)}; "
            "the last one has no partner"
        )
    return list(zip(values[::2], values[1::2], strict=True))


def parse_command_line(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; `--a.b=value` arguments become `args.edits.overrides`."""
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
    args.edits = ConfigEdits(
        find_replace=_pairs(args.find_replace, "--find-replace", "OLD NEW"),
        delete=list(args.delete),
        modify=_pairs(args.modify, "--modify", "KEY VALUE"),
        overrides=overrides,
    )
    args.argv = list(argv)
    return args


def recorded_flags(args: argparse.Namespace) -> dict:
    """The flags as they are saved in a run's config.yaml."""
    return {
        "cpu": args.cpu,
        "mini": args.mini,
        "no_logging": args.no_logging,
        "allow_dirty_repo": args.allow_dirty_repo,
        "y": args.y,
        "log_dir": args.log_dir,
        "run_parent": args.run_parent,
        "requeue": args.requeue,
        "find_replace": [list(pair) for pair in args.edits.find_replace],
        "delete": list(args.edits.delete),
        "modify": [list(pair) for pair in args.edits.modify],
        "overrides": {key: value for key, value in args.edits.overrides},
    }
