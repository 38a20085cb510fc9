"""`--runs [DIR]`: every logged run at a glance, newest first; `--note RUN_DIR TEXT`.

A run whose metadata says `running` but whose lock nobody holds was killed without a
chance to say so: it shows as `crashed` (resume it with --resume).
"""

import csv
import fcntl
import io
from pathlib import Path

from src.core.errors import UserError
from src.core.rundir import CONFIG_FILE, METADATA_FILE, read_yaml, update_metadata

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


def summarize(run_directory: Path, root: Path) -> dict:
    metadata = read_yaml(run_directory / METADATA_FILE) or {}
    config = read_yaml(run_directory / CONFIG_FILE) or {}
    git = config.get("git") or {}
    status = metadata.get("status", "?")
    if status == "running" and not is_locked(run_directory):
        status = "crashed"
    resumes = len(metadata.get("resumes") or [])
    best = metadata.get("best") or {}
    return {
        "order": (str(metadata.get("started", "")), (run_directory / CONFIG_FILE).stat().st_mtime),
        "run": str(run_directory.relative_to(root)),
        "started": str(metadata.get("started", "")),
        "commit": (git.get("commit") or "")[:10] + ("" if git.get("commit_on_remote") else "*"),
        "status": status + (f" (resumed {resumes}x)" if resumes else ""),
        "epochs": f"{metadata.get('epochs_done', 0)}/{config.get('epochs', '?')}",
        "best": f"{best['metric']}={best['value']:.4g}" if best.get("value") is not None else "",
        "description": metadata.get("description") or config.get("description", ""),
    }


def list_runs(root: Path, text: str | None = None, status: str | None = None) -> list[dict]:
    """Every run directory under `root` (reproductions and sweeps included), newest first."""
    if not root.is_dir():
        raise UserError(f"--runs {root}: no such directory")
    rows = [summarize(path.parent, root) for path in root.rglob(METADATA_FILE) if (path.parent / CONFIG_FILE).exists()]
    if text:
        rows = [row for row in rows if text.lower() in (row["description"] + " " + row["run"]).lower()]
    if status:
        rows = [row for row in rows if row["status"].split()[0] == status]
    return sorted(rows, key=lambda row: row.pop("order"), reverse=True)


def format_table(rows: list[dict], as_csv: bool = False) -> str:
    """Aligned columns for people, or CSV for scripts."""
    columns = list(dict.fromkeys(key for row in rows for key in row)) or list(COLUMNS)
    if as_csv:
        stream = io.StringIO()
        writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return stream.getvalue()
    shown = [{key: _cell(key, row.get(key, "")) for key in columns} for row in rows]
    widths = {column: max([len(column)] + [len(row[column]) for row in shown]) for column in columns}
    lines = ["  ".join(column.ljust(widths[column]) for column in columns)]
    lines += ["  ".join(row[column].ljust(widths[column]) for column in columns) for row in shown]
    note = "; * marks a commit that no remote-tracking branch contains" if "commit" in columns else ""
    lines.append(f"{len(rows)} row(s){note}")
    return "\n".join(lines)


def _cell(column: str, value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    limit = {"description": 50, "started": 16}.get(column)
    return str(value)[:limit] if limit else str(value)


def set_note(run_directory: Path, text: str) -> None:
    """Write the run's `summary` (what the run showed, after analysis)."""
    if not (run_directory / METADATA_FILE).is_file():
        raise UserError(f"--note {run_directory}: no {METADATA_FILE} there; expected a run directory under logs/")
    update_metadata(run_directory, summary=text)
