"""`--runs [DIR]`: every logged run at a glance, newest first; `--note RUN_DIR TEXT`.

A run whose metadata says `running` but whose lock nobody holds was killed without a
chance to say so: it shows as `crashed` (resume it with --resume).
"""

import fcntl
import json
import re
from pathlib import Path

from src.core.archive.restore import archived_runs
from src.core.commands.cli import CommandLine
from src.core.commands.sweep import member_rows
from src.core.config.uris import is_archive_uri
from src.core.errors import Refusal, UserError
from src.core.record.git import PROJECT_ROOT, run_git
from src.core.record.rundir import (
    CONFIG_FILE,
    METADATA_FILE,
    log_root,
    read_yaml,
    require_run_directory,
    update_metadata,
)
from src.core.tables import csv_text

FIRST_AT = re.compile(r"first at step (\d+)")
COLUMNS = ("run", "started", "commit", "status", "epochs", "best", "description")


def is_locked(run_directory: Path) -> bool:
    """Whether a process holds the run's lock, i.e. is training it right now."""
    lock = run_directory / ".lock"
    if not lock.exists():
        return False
    with open(lock, "a+") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.lockf(handle, fcntl.LOCK_UN)
    return False


def commits_on_remote(commits: set[str], repository: Path = PROJECT_ROOT) -> dict[str, bool]:
    """Which of `commits` a remote-tracking branch contains now (a push after the run
    started counts), in two git calls whatever the number of runs. Commits git cannot
    answer for (no git, no repository, a commit not fetched) are left out."""
    commits = {commit for commit in commits if commit}
    if not commits:
        return {}

    def git(*args: str, stdin: str = "") -> str | None:
        try:
            result = run_git(list(args), cwd=repository, check=False, input=stdin)
        except Refusal:  # no git
            return None
        return result.stdout if result.returncode == 0 else None

    known = git("cat-file", "--batch-check=%(objectname) %(objecttype)", stdin="\n".join(commits) + "\n")
    reachable = git("rev-list", "--remotes") if known is not None else None
    if reachable is None:
        return {}
    present = {line.split()[0] for line in known.splitlines() if line.endswith(" commit")}
    on_remote = set(reachable.split())
    return {commit: commit in on_remote for commit in commits if commit in present}


def summarize(run_directory: Path, root: Path, config: dict, on_remote: dict[str, bool]) -> dict:
    """One row of the table; `on_remote` (from commits_on_remote) overrides the mark
    recorded when the run started."""
    metadata = read_yaml(run_directory / METADATA_FILE) or {}
    status = metadata.get("status", "?")
    if status == "running" and not is_locked(run_directory):
        status = "crashed"
    row = make_row(str(run_directory.relative_to(root)), config, metadata, status, on_remote)
    verdict = reproduction_verdict(run_directory)
    if verdict is not None:
        row["reproduced"] = verdict
    return {"order": (row["started"], (run_directory / CONFIG_FILE).stat().st_mtime), **row}


def reproduction_verdict(run_directory: Path) -> str | None:
    """The newest --reproduce's verdict: identical, differs at step N, or not reproduced
    (it failed, or runs still); None when the run was never reproduced."""
    reproductions = sorted((run_directory / "reproductions").glob("*/config.yaml"))
    if not reproductions:
        return None
    comparison_file = reproductions[-1].parent / "comparison.json"
    try:
        comparison = json.loads(comparison_file.read_text())
    except (OSError, ValueError):
        return "not reproduced"
    if comparison.get("identical"):
        complete = comparison.get("complete")
        return "identical" if complete else f"identical to step {comparison.get('compared_up_to_step')}"
    parts = comparison.get("parts_at") or {}
    # A comparison written before parts_at: its lines say "first at step N" per metric.
    steps = [int(step) for line in comparison.get("differences") or [] for step in FIRST_AT.findall(line)]
    step = parts.get("step", min(steps, default=None))
    return "differs" if step is None else f"differs at step {step}"


def make_row(run: str, config: dict, metadata: dict, status: str, on_remote: dict[str, bool]) -> dict:
    """A row of the table from a run's config.yaml and metadata.yaml (local or archived)."""
    git = config.get("git") or {}
    resumes = len(metadata.get("resumes") or [])
    best = metadata.get("best") or {}
    pushed = on_remote.get(git.get("commit") or "", git.get("commit_on_remote"))
    return {
        "run": run,
        "started": str(metadata.get("started", "")),
        "commit": (git.get("commit") or "")[:10] + ("+" if git.get("snapshot") else "") + ("" if pushed else "*"),
        "status": status + (f" (resumed {resumes}x)" if resumes else ""),
        "epochs": f"{metadata.get('epochs_done', 0)}/{config.get('epochs', '?')}",
        "best": f"{best['metric']}={best['value']:.4g}" if best.get("value") is not None else "",
        "description": metadata.get("description") or config.get("description", ""),
        **({"parent": _parent_cell(config["parent"])} if config.get("parent") else {}),
    }


def _parent_cell(parent: dict) -> str:
    """A branch's parent -> child link: `<parent run name>@<step>`."""
    return f"{Path(str(parent.get('run', '?'))).name}@{parent.get('step', '?')}"


def filter_rows(rows: list[dict], text: str | None = None, status: str | None = None) -> list[dict]:
    """--filter and --status, for runs' rows and a sweep's member rows alike.

    TEXT matches the description, the run's or member's name, case-insensitively; a
    status matches its first word(s), so `finished` keeps `finished (resumed 1x)`.
    """
    if text:
        rows = [row for row in rows if text.lower() in _searchable(row)]
    if status:
        rows = [  # a search trial's state (pruned, complete...) matches too
            row for row in rows if any(f"{row.get(key, '')} ".startswith(f"{status} ") for key in ("status", "state"))
        ]
    return rows


def _searchable(row: dict) -> str:
    return " ".join(str(row.get(key, "")) for key in ("description", "run", "member")).lower()


def list_runs(root: Path, text: str | None = None, status: str | None = None) -> list[dict]:
    """Every run directory under `root` (reproductions and sweeps included), newest first."""
    if not root.is_dir():
        raise UserError(f"--runs {root}: no such directory")
    directories = [path.parent for path in root.rglob(METADATA_FILE) if (path.parent / CONFIG_FILE).exists()]
    configs = {directory: read_yaml(directory / CONFIG_FILE) or {} for directory in directories}
    on_remote = commits_on_remote({(config.get("git") or {}).get("commit") for config in configs.values()})
    rows = [summarize(directory, root, config, on_remote) for directory, config in configs.items()]
    rows = filter_rows(rows, text, status)
    return sorted(rows, key=lambda row: row.pop("order"), reverse=True)


def format_table(rows: list[dict], as_csv: bool = False) -> str:
    """Aligned columns for people, or CSV for scripts."""
    columns = list(dict.fromkeys(key for row in rows for key in row)) or list(COLUMNS)
    if as_csv:
        return csv_text(rows, columns)
    shown = [{key: _cell(key, row.get(key, "")) for key in columns} for row in rows]
    widths = {column: max([len(column)] + [len(row[column]) for row in shown]) for column in columns}
    lines = ["  ".join(column.ljust(widths[column]) for column in columns)]
    lines += ["  ".join(row[column].ljust(widths[column]) for column in columns) for row in shown]
    note = "; * marks a commit that no remote-tracking branch contains" if "commit" in columns else ""
    if any("+" in str(row.get("commit", "")) for row in rows):
        note += "; + a snapshot of uncommitted work (--snapshot, kept under refs/runs/)"
    lines.append(f"{len(rows)} row(s){note}")
    return "\n".join(lines)


def _cell(column: str, value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    limit = {"description": 50, "started": 16}.get(column)
    return str(value)[:limit] if limit else str(value)


def set_note(run_directory: Path, text: str) -> int:
    """Write the run's `summary` (what the run showed, after analysis)."""
    update_metadata(require_run_directory(run_directory, "--note"), summary=text)
    return 0


def archived_rows(uri: str, text: str | None = None, status: str | None = None) -> list[dict]:
    """The rows of `--runs URI`: every archived run under `uri`, newest first, as for local runs."""
    documents = archived_runs(uri)
    on_remote = commits_on_remote({(config.get("git") or {}).get("commit") for config, _ in documents.values()})
    rows = [
        make_row(run, config, metadata, metadata.get("status", "?"), on_remote)
        for run, (config, metadata) in documents.items()
    ]
    return sorted(filter_rows(rows, text, status), key=lambda row: row["started"], reverse=True)


def show_runs(command: CommandLine) -> int:
    """`--runs [DIR]`: the runs under DIR (default: logs/), or a sweep's members with their Slurm state."""
    if command.runs and is_archive_uri(command.runs):  # an archive: the same table
        print(format_table(archived_rows(command.runs, command.filter, command.status), command.csv))
        return 0
    root = Path(command.runs) if command.runs else log_root(None)
    if not command.runs and not root.exists():  # a fresh clone: no run logged yet
        print(format_table([], command.csv))
    elif (root / "sweep.yaml").exists():
        print(format_table(filter_rows(member_rows(root), command.filter, command.status), command.csv))
    else:
        print(format_table(list_runs(root, command.filter, command.status), command.csv))
    return 0
