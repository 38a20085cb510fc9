"""`--archive RUN_DIR [URI]`: a one-shot backup of a finished or crashed run."""

import json
from pathlib import Path

import yaml

from src.core.archive.store import ENVIRONMENT_VARIABLE, archive_uri, refused, store_call
from src.core.archive.upload import POINTERS, RunUploader, UploadReport
from src.core.errors import UserError
from src.core.record.checkpoint import manifest_path, step_checkpoints
from src.core.record.rundir import CONFIG_FILE, lock_run_directory


def archive_run(run_directory: Path, uri: str | None = None, delete_local_checkpoints: bool = False) -> UploadReport:
    """One-shot backup of a finished or crashed run; what the archive holds verified is skipped.
    `delete_local_checkpoints`: then delete local step files other than best and last whose
    upload is verified."""
    run_directory = Path(run_directory)
    if not (run_directory / CONFIG_FILE).is_file():
        raise UserError(f"--archive {run_directory}: no {CONFIG_FILE} there; expected a run directory under logs/")
    if uri is None:
        saved = yaml.safe_load((run_directory / CONFIG_FILE).read_text()) or {}
        uri = archive_uri(saved)
        if uri is None:
            raise UserError(
                f"--archive {run_directory}: no archive URI; give one (--archive RUN_DIR s3://bucket/prefix), "
                f"set archive.uri in the config, or set {ENVIRONMENT_VARIABLE}"
            )
    # The run's lock: a live run's mirror archives it itself; and no upload under it is in flight,
    # so the scan may abort the unfinished ones a killed writer left (exit 3 while it trains).
    with lock_run_directory(run_directory):
        return _archive_locked(run_directory, uri, delete_local_checkpoints)


def _archive_locked(run_directory: Path, uri: str, delete_local_checkpoints: bool) -> UploadReport:
    uploader = RunUploader(run_directory, uri)

    def record(error: Exception) -> None:  # metadata.yaml's archive.status says how it failed
        uploader.record_status("failed" if refused(error) else "behind")

    with store_call("--archive", uploader.location, on_failure=record):
        report = uploader.sync()
    if delete_local_checkpoints:
        keep = {_pointer_target(run_directory / "checkpoints" / f"{name}.json") for name in POINTERS}
        for info in step_checkpoints(run_directory / "checkpoints"):
            manifest_file = manifest_path(info.path)
            verified = manifest_file.exists() and uploader.archived.get(info.path.name) == manifest_file.read_text()
            if verified and info.path.name not in keep:
                manifest_file.unlink()
                info.path.unlink()
                print(f"deleted local {info.path.name} (verified in the archive)")
    return report


def _pointer_target(pointer: Path) -> str | None:
    try:
        return json.loads(pointer.read_text()).get("links_to")
    except (OSError, ValueError):
        return None
