"""`--export RUN_DIR --to wandb|mlflow`: replay a run's metrics and figures into a tracker."""

from pathlib import Path

from src.core.config.edits import ConfigEdits, apply_edits
from src.core.config.loader import split_provenance
from src.core.config.schema import project_schema
from src.core.errors import UserError
from src.core.record.rundir import CONFIG_FILE, METADATA_FILE, lock_run_directory, read_yaml, update_metadata
from src.core.tracking.trackers import TRACKERS, Trackers, check_trackers


def export_run(run_directory: Path, to: str | None, edits: ConfigEdits | None = None) -> int:
    """Replay a finished (or crashed) run into a tracker; again later, only what is missing.

    The tracker run's id is kept in metadata.yaml `trackers:`, so a second export, or an
    export of a run that logged live, continues the same tracker run. `edits` may set the
    tracker's own keys (--mlflow.tracking_uri=..., --wandb.project=...), nothing else: the run's
    results are exported as they were logged.
    """
    run_directory = Path(run_directory)
    if to not in TRACKERS:
        raise UserError(f"--export needs --to {' or --to '.join(TRACKERS)}, but got {to!r}")
    if not (run_directory / CONFIG_FILE).is_file():
        raise UserError(f"--export {run_directory}: no {CONFIG_FILE} there; expected a run directory under logs/")
    check_trackers([to])
    lock = lock_run_directory(run_directory)  # a run still training is refused (exit 3)
    try:
        saved = read_yaml(run_directory / CONFIG_FILE) or {}
        metadata = (read_yaml(run_directory / METADATA_FILE) or {}) if (run_directory / METADATA_FILE).exists() else {}
        config, provenance = split_provenance(saved)
        known = dict(metadata.get("trackers") or {})
        config = tracker_settings(config, edits or ConfigEdits(), to)
        uri = (config.get("mlflow") or {}).get("tracking_uri")
        if to == "mlflow" and uri and (known.get("mlflow") or {}).get("tracking_uri") not in (None, uri):
            known.pop("mlflow")  # another server: a run of its own there
        trackers = Trackers.open([to], run_directory, config, provenance, known, exporting=True)
        update_metadata(run_directory, trackers={**known, **trackers.ids()})
        status = metadata.get("status")
        trackers.close("finished" if status == "finished" else "failed" if status == "failed" else "killed")
        if trackers.failed or trackers._thread.is_alive():
            return 1
        print(
            f"exported {run_directory} to {to} ({trackers.ids()[to]}): {trackers.sent[to]} value(s) and "
            f"figure(s) sent, {trackers.skipped[to]} already there"
        )
        return 0
    finally:
        lock.close()


def tracker_settings(config: dict, edits: ConfigEdits, to: str) -> dict:
    """The saved config with the command line's edits of the `to` tracker's section (only those)."""
    others = [key for key, _ in (*edits.modify, *edits.overrides) if key.split(".")[0] != to]
    others += [key for key in edits.delete if key.split(".")[0] != to]
    if others or edits.find_replace:
        shown = ", ".join(others) or "--find-replace"
        raise UserError(
            f"--export replays the run as it was logged; it may change only the {to} section "
            f"(such as --{to}.{'tracking_uri' if to == 'mlflow' else 'project'}=...), not: {shown}"
        )
    return apply_edits(config, edits, project_schema())
