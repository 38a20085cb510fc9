"""Restore: an archived run downloaded into a local run directory, every checkpoint verified
against its manifest; and the archived runs under a URI, for `--runs URI`."""

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from src.core.archive.store import Store, check_uri, sha256_of_file, store_call
from src.core.archive.upload import POINTERS, RUN_FILES_MANIFEST, read_run_files_manifest
from src.core.config.loader import parse_yaml
from src.core.errors import UserError
from src.core.record.checkpoint import STEP_FILE, manifest_path
from src.core.record.rundir import (
    CONFIG_FILE,
    METADATA_FILE,
    fsync_directory,
    now,
    read_yaml,
    update_metadata,
    write_text_atomic,
)

RESTORING_MARKER = ".restoring"  # in a run directory whose restore has not finished


@dataclass
class RestoreReport:
    directory: Path
    restored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already restored and verified
    damaged: list[str] = field(default_factory=list)  # "name: why"
    unverified: bool = False  # the archive holds no manifest of its run files (archived by an older version)


def restore_run(uri: str, log_dir: Path) -> RestoreReport:
    """Download the run at `uri` into `log_dir/<project>/<run>`, verifying every checkpoint
    against its manifest (a temporary name, verified, then renamed). Re-running an
    interrupted restore completes it; a finished local run is never overwritten."""
    location = check_uri(uri)
    store = Store(location)
    with store_call("--restore", location):
        store.refresh()
        listing = store.listing()
    if CONFIG_FILE not in listing or METADATA_FILE not in listing:
        raise UserError(
            f"--restore {location}: no run there (expected {CONFIG_FILE} and {METADATA_FILE}); "
            "list the archived runs with --runs ARCHIVE_URI"
        )
    with store_call("--restore", location):
        digests = read_run_files_manifest(store)
        for name in (CONFIG_FILE, METADATA_FILE):  # before anything is written here
            data = store.read(name)
            _check_run_document(location, name, data)
            if digests is not None and hashlib.sha256(data).hexdigest() not in digests.get(name, []):
                raise UserError(
                    f"--restore {location}: the archived {name} is not the file that was archived (its SHA-256 "
                    f"is not the one {RUN_FILES_MANIFEST} records: altered since?); nothing was restored"
                )
    project, run = location.rsplit("/", 2)[1:]
    directory = Path(log_dir) / project / run
    marker = directory / RESTORING_MARKER
    if directory.exists() and not marker.exists():
        raise UserError(
            f"--restore {location}: {directory} exists already (a finished restore, or the original run); "
            "use it as it is (--resume DIR), delete it, or restore elsewhere with --log-dir DIR"
        )
    try:
        (directory / "checkpoints").mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError as error:
        raise UserError(
            f"--restore {location}: cannot create {directory} ({error.strerror or type(error).__name__}); "
            "give a --log-dir this user may write"
        ) from None
    report = RestoreReport(directory, unverified=digests is None)
    with store_call("--restore", location, then=f"; run the same --restore again to complete {directory}"):
        _restore_files(store, listing, directory, report, digests)
    update_metadata(directory, restored={"from": location, "at": now()})
    marker.unlink()
    fsync_directory(directory)
    return report


def _check_run_document(location: str, name: str, data: bytes | None) -> None:
    """An archived config.yaml or metadata.yaml must be what a run writes: a YAML mapping that the
    safe loader reads (a python tag, say, is refused here, before anything is restored)."""
    where = f"--restore {location}: the archived {name}"
    try:
        document = parse_yaml((data or b"").decode("utf-8"), where)
    except UnicodeDecodeError:
        document = None
    if not isinstance(document, dict):
        raise UserError(f"{where} is not the YAML mapping a run writes; the archive is damaged, nothing was restored")


def _manifest_of(text: bytes | None) -> dict | None:
    """A checkpoint manifest as a mapping, or None when it is missing, not JSON or not a mapping."""
    try:
        manifest = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) else None


def _restore_files(
    store: Store, listing: dict[str, int], directory: Path, report: RestoreReport, digests: dict | None
) -> None:
    checkpoints = directory / "checkpoints"
    for name in sorted(listing):
        if name.startswith("checkpoints/") or Path(name).name.startswith(".") or name == RUN_FILES_MANIFEST:
            continue
        if Path(name).is_absolute() or ".." in Path(name).parts:  # a key crafted to write elsewhere
            report.damaged.append(f"{name}: not a path inside the run; not restored")
            continue
        if not store.is_plain_file(name):
            report.damaged.append(f"{name}: not a plain file in the archive (a symlink or a device); not restored")
            continue
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.part")
        store.download(name, temporary)
        if digests is not None and sha256_of_file(temporary) not in digests.get(name, []):
            temporary.unlink()
            report.damaged.append(f"{name}: its SHA-256 is not the one {RUN_FILES_MANIFEST} records (altered?)")
            continue
        os.replace(temporary, target)
    for name in sorted(listing):
        match = STEP_FILE.fullmatch(name.removeprefix("checkpoints/"))
        if not name.startswith("checkpoints/") or not match:
            continue
        file_name = match.group(0)
        manifest_text = store.read(f"checkpoints/{manifest_path(Path(file_name)).name}")
        if manifest_text is None:
            report.damaged.append(f"{file_name}: no manifest in the archive (its upload did not finish)")
            continue
        manifest = _manifest_of(manifest_text)
        if manifest is None:
            report.damaged.append(f"{file_name}: its manifest in the archive is not a JSON object; not restored")
            continue
        target = checkpoints / file_name
        if _verified_locally(target, manifest_text):
            report.skipped.append(file_name)
            continue
        if not store.is_plain_file(f"checkpoints/{file_name}"):
            report.damaged.append(f"{file_name}: not a plain file in the archive (a symlink or a device)")
            continue
        temporary = checkpoints / f".{file_name}.part"
        store.download(f"checkpoints/{file_name}", temporary)
        size, sha256 = temporary.stat().st_size, sha256_of_file(temporary)
        if (size, sha256) != (manifest.get("bytes"), manifest.get("sha256")):
            temporary.unlink()
            report.damaged.append(
                f"{file_name}: {size} bytes, SHA-256 {sha256[:12]}… where the manifest says "
                f"{manifest.get('bytes')} bytes, {str(manifest.get('sha256'))[:12]}…"
            )
            continue
        manifest_path(target).unlink(missing_ok=True)  # a stale manifest must never describe the new file
        os.replace(temporary, target)
        write_text_atomic(manifest_path(target), manifest_text.decode())
        report.restored.append(file_name)
    _restore_pointers(store, checkpoints, report)
    fsync_directory(checkpoints)


def _restore_pointers(store: Store, checkpoints: Path, report: RestoreReport) -> None:
    """last.pt and best.pt, as links to the restored step files they name."""
    for pointer in POINTERS:
        text = store.read(f"checkpoints/{pointer}.json")
        target_name = (_manifest_of(text) or {}).get("links_to")
        if not isinstance(target_name, str) or not STEP_FILE.fullmatch(target_name):
            continue
        source = checkpoints / target_name
        if not _verified_locally(source, None):
            report.damaged.append(f"{pointer}.pt: points at {target_name}, which was not restored")
            continue
        link, temporary = checkpoints / f"{pointer}.pt", checkpoints / f".{pointer}.pt.part"
        temporary.unlink(missing_ok=True)
        try:
            os.link(source, temporary)
        except OSError:  # no hard links on this filesystem: a copy does the same job
            shutil.copyfile(source, temporary)
        os.replace(temporary, link)
        write_text_atomic(checkpoints / f"{pointer}.json", text.decode())


def _verified_locally(path: Path, manifest_text: bytes | None) -> bool:
    """Whether `path` is in place with its manifest (equal to `manifest_text` when given).
    Only verified files are ever renamed into place, so the size check guards against truncation."""
    try:
        local = manifest_path(path).read_text()
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if manifest_text is not None and local != manifest_text.decode():
        return False
    return size == (_manifest_of(local.encode()) or {}).get("bytes")


def restore_for_resume(uri: str, log_dir: Path) -> Path:
    """`--resume URI`: restore the run into `log_dir` (completing an interrupted restore) and
    return its local directory, which run.py then resumes as any other."""
    report = restore_run(uri, log_dir)
    print_restore_report(report)
    return report.directory


def print_restore_report(report: RestoreReport) -> None:
    print(
        f"restored {report.directory}: {len(report.restored)} checkpoint(s) downloaded and verified"
        + (f", {len(report.skipped)} already here and verified" if report.skipped else "")
    )
    for line in report.damaged:
        print(f"warning: skipped {line}", file=sys.stderr)
    if report.unverified:
        print(
            f"warning: the archive holds no {RUN_FILES_MANIFEST} (archived by an earlier version): its run files "
            "were restored unverified; the checkpoints were verified. --archive the run again to add it",
            file=sys.stderr,
        )


def archived_runs(uri: str) -> dict[str, tuple[dict, dict]]:
    """Every archived run under `uri`: its name -> (config.yaml, metadata.yaml), for `--runs URI`."""
    store = Store(uri)
    with store_call("--runs", store.uri):
        store.refresh()
        listing = store.listing()
    runs = sorted(
        name[: -len(METADATA_FILE)].rstrip("/")
        for name in listing
        if Path(name).name == METADATA_FILE and f"{name[: -len(METADATA_FILE)]}{CONFIG_FILE}" in listing
    )
    documents = {}
    for run in runs:
        prefix = f"{run}/" if run else ""
        config = yaml.safe_load(store.read(f"{prefix}{CONFIG_FILE}") or b"") or {}
        metadata = yaml.safe_load(store.read(f"{prefix}{METADATA_FILE}") or b"") or {}
        documents[run or Path(store.root).name] = (config, metadata)
    return documents


def restore_checkpoint(run_directory: Path, file_name: str, sha256: str, flag: str) -> Path | None:
    """One checkpoint of a run, fetched back from the run's archive (metadata.yaml `archive.uri`)
    into its checkpoints/ (where --archive --delete-local-checkpoints removed it, say), verified
    by `sha256`. None when the run has no archive, or its archive lacks the file."""
    metadata_file = run_directory / METADATA_FILE
    metadata = (read_yaml(metadata_file) or {}) if metadata_file.is_file() else {}
    location = (metadata.get("archive") or {}).get("uri") if isinstance(metadata, dict) else None
    if not isinstance(location, str) or not location:
        return None
    store = Store(check_uri(location))
    relative = f"checkpoints/{file_name}"
    target = run_directory / "checkpoints" / file_name
    temporary = target.with_name(f".{target.name}.part")
    with store_call(flag, location):
        store.refresh()
        if store.size(relative) is None:
            return None
        target.parent.mkdir(exist_ok=True)
        store.download(relative, temporary)
        manifest = store.read(f"checkpoints/{manifest_path(Path(file_name)).name}")
    if sha256_of_file(temporary) != sha256:
        temporary.unlink()
        raise UserError(
            f"{flag}: {location}/{relative} is not the checkpoint recorded (its SHA-256 differs); nothing was written"
        )
    if manifest is not None:
        write_text_atomic(manifest_path(target), manifest.decode("utf-8"))
    os.replace(temporary, target)
    fsync_directory(target.parent)
    print(f"fetched {file_name} from {location} (SHA-256 verified) into {target.parent}")
    return target
