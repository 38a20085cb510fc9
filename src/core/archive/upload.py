"""Upload: one pass that brings the archive up to date with a run directory, idempotently."""

import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from src.core import faults
from src.core.archive.store import ArchiveError, Store, refused, run_location, sha256_of_file, store_errors
from src.core.record.checkpoint import STEP_FILE, manifest_path, step_checkpoints
from src.core.record.rundir import CONFIG_FILE, METADATA_FILE, update_metadata

RUN_FILE_DIRECTORIES = ("figures", "evaluation")
IDENTITY_FILES = (CONFIG_FILE, METADATA_FILE, "packages.txt")
POINTERS = ("last", "best")
# The SHA-256 of every run file the archive holds ({name: [accepted digests]}), which a restore
# checks each download against. Two digests while a file is replaced: the one before and the
# one being sent, so that a pass killed between the upload and the manifest's update leaves
# a file that still verifies.
RUN_FILES_MANIFEST = "run-files.json"


def run_files(run_directory: Path) -> list[str]:
    """The run's files the archive holds beside its checkpoints (relative paths)."""
    names = [p.name for p in run_directory.iterdir() if p.is_file() and not p.name.startswith(".")]
    for folder in RUN_FILE_DIRECTORIES:
        base = run_directory / folder
        if base.is_dir():
            names += [
                str(p.relative_to(run_directory))
                for p in sorted(base.rglob("*"))
                if p.is_file() and not p.name.startswith(".")
            ]
    return sorted(names)


@dataclass
class UploadReport:
    uploaded: list[str] = field(default_factory=list)  # checkpoint files uploaded and verified
    skipped: list[str] = field(default_factory=list)  # already verified in the archive
    damaged: list[str] = field(default_factory=list)  # local files that do not match their manifest
    removed: list[str] = field(default_factory=list)  # pruned from the archive
    newest_step: int | None = None


class RunUploader:
    """Brings `<archive>/<project>/<run>` up to date with a run directory, idempotently:
    what the archive already holds, verified, is not sent again (a killed pass resumes)."""

    def __init__(self, run_directory: Path, uri: str):
        self.run_directory = Path(run_directory)
        self.location = run_location(uri, self.run_directory)
        self._store: Store | None = None
        self.archived: dict[str, str] = {}  # step file name -> the manifest text the archive holds
        self.unverified: set[str] = set()  # step files the archive holds a manifest for that does not match
        self.refused: set[str] = set()  # local step files that failed verification (never sent again)
        self.present: set[str] = set()  # step files the archive may hold: listed, or their upload began
        self.sent_files: dict[str, tuple[int, int]] = {}  # run file -> (size, mtime_ns) when sent
        self.sent_pointers: dict[str, str] = {}
        self.run_file_digests: dict[str, list[str]] = {}  # RUN_FILES_MANIFEST's content
        self.digests_written: dict[str, list[str]] | None = None  # what the archive's copy says
        self.scanned = False
        self.recorded: tuple[str, int | None] | None = None  # the archive status metadata.yaml holds
        self.report = UploadReport()

    @property
    def store(self) -> Store:
        """Made at first use, on the mirror's own thread when there is one (see require_backend)."""
        if self._store is None:
            self._store = Store(self.location)
        return self._store

    @property
    def checkpoints(self) -> Path:
        return self.run_directory / "checkpoints"

    def scan(self) -> None:
        """Once: which checkpoints the archive holds verified; and drop from it the step files
        of a timeline a resume discarded (newer than every local one, absent here); and abort
        the uploads a killed writer left unfinished."""
        self.store.refresh()
        try:
            for name in self.store.abort_unfinished_uploads():
                print(f"archive: removed an unfinished upload of {name} (its writer was killed)", file=sys.stderr)
        except store_errors() as error:
            if not refused(error):
                raise  # the store is down: the whole pass is retried
            print(  # a policy without s3:ListBucketMultipartUploads: archiving goes on without the clean-up
                f"archive: may not look for unfinished uploads under {self.location} ({type(error).__name__}); "
                "a bucket lifecycle rule AbortIncompleteMultipartUpload removes them instead",
                file=sys.stderr,
            )
        self.run_file_digests = read_run_files_manifest(self.store) or {}  # extended, never started afresh
        self.digests_written = {name: list(digests) for name, digests in self.run_file_digests.items()}
        remote = self.store.listing("checkpoints")
        local_steps = [info.step for info in step_checkpoints(self.checkpoints)]
        newest_local = max(local_steps, default=-1)
        for name in sorted(remote):
            match = STEP_FILE.fullmatch(name)
            if not match:
                continue
            if int(match.group(1)) > newest_local and not (self.checkpoints / name).exists():
                self.remove_checkpoint(name)
                continue
            self.present.add(name)
            text = self.store.read(f"checkpoints/{manifest_path(Path(name)).name}")
            if text is not None and _manifest_bytes(text) == remote[name]:
                self.archived[name] = text.decode()
            elif text is not None:
                self.unverified.add(name)
        self.scanned = True

    def sync(self, pruned: set[str] = frozenset(), upload_files: bool = True) -> UploadReport:
        """One pass: prune, upload new checkpoints (then their manifests), pointers, run files."""
        self.report = UploadReport()
        if not self.scanned:
            self.scan()
            for name in IDENTITY_FILES:  # first: what makes the archived copy a run (restore needs them)
                self.upload_run_file(name)
        for name in sorted(pruned & self.present):
            self.remove_checkpoint(name)  # one never sent (pruned within an interval) costs no request
        for info in step_checkpoints(self.checkpoints):
            manifest_file = manifest_path(info.path)
            if info.path.name in self.refused or not manifest_file.exists():
                continue  # no manifest: still being written, or never completed
            text = manifest_file.read_text()
            if self.archived.get(info.path.name) == text:
                self.report.skipped.append(info.path.name)
                continue
            self.upload_checkpoint(info.path, text)
        self.upload_pointers()
        self.report.newest_step = self.newest_archived_step()
        if upload_files:
            for name in run_files(self.run_directory):
                if name != METADATA_FILE:
                    self.upload_run_file(name)
            self.record_status("synced")
            self.upload_run_file(METADATA_FILE)  # last, so that the archived copy says synced
        self.write_run_files_manifest()
        return self.report

    def refuse(self, path: Path, why: str) -> None:
        """A local checkpoint that cannot be verified: never sent again, reported once."""
        self.refused.add(path.name)
        self.report.damaged.append(path.name)
        print(f"warning: archive: {why}", file=sys.stderr)

    def upload_checkpoint(self, path: Path, manifest_text: str) -> None:
        try:
            manifest = json.loads(manifest_text)
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict):  # a damaged local manifest: the checkpoint cannot be verified
            self.refuse(path, f"{manifest_path(path)} is not a JSON object; {path.name} not archived")
            return
        manifest_name = f"checkpoints/{manifest_path(path).name}"
        if path.name in self.archived or path.name in self.unverified:
            self.store.remove(manifest_name)  # another checkpoint of that step (a resumed run): unverified now
            self.archived.pop(path.name, None)
            self.unverified.discard(path.name)
        self.present.add(path.name)
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:  # hash while uploading: hashlib releases the GIL
                digest = pool.submit(sha256_of_file, path)
                self.store.upload(path, f"checkpoints/{path.name}")
                sha256 = digest.result()
        except FileNotFoundError:
            if path.exists():
                raise
            return  # pruned locally meanwhile (keep_recent): the next pass removes it from the archive too
        if sha256 != manifest.get("sha256"):
            self.store.remove(f"checkpoints/{path.name}")
            self.refuse(path, f"{path} does not match its manifest (SHA-256); not archived")
            return
        stored = self.store.size(f"checkpoints/{path.name}")
        if stored != manifest.get("bytes"):
            sent = manifest["bytes"]
            raise ArchiveError(f"{self.location}/checkpoints/{path.name}: {stored} bytes stored, {sent} sent")
        self.upload_run_file("metrics.jsonl")  # the archive's metrics must cover what the checkpoint covers
        faults.maybe_fail("archive_manifest")
        self.store.write(manifest_name, manifest_text.encode())
        self.archived[path.name] = manifest_text
        self.report.uploaded.append(path.name)

    def upload_pointers(self) -> None:
        for name in POINTERS:
            pointer = self.checkpoints / f"{name}.json"
            try:
                text = pointer.read_text()
            except FileNotFoundError:
                continue
            if self.sent_pointers.get(name) != text and json.loads(text).get("links_to") in self.archived:
                self.store.write(f"checkpoints/{name}.json", text.encode())
                self.sent_pointers[name] = text

    def upload_run_file(self, name: str) -> None:
        path = self.run_directory / name
        try:
            status = path.stat()
        except FileNotFoundError:
            return
        stamp = (status.st_size, status.st_mtime_ns)
        if self.sent_files.get(name) == stamp:
            return
        # A snapshot, hashed and sent: the run may append to the file (metrics.jsonl) meanwhile.
        snapshot = self.run_directory / f".archive-snapshot.tmp-{os.getpid()}"
        try:
            shutil.copyfile(path, snapshot)
            digest = sha256_of_file(snapshot)
            accepted = self.run_file_digests.get(name, [])
            if digest not in accepted:
                self.run_file_digests[name] = [*accepted[-1:], digest]  # before it is replaced: either verifies
                self.write_run_files_manifest()
            self.store.upload(snapshot, name)
        finally:
            snapshot.unlink(missing_ok=True)
        self.run_file_digests[name] = [digest]  # written at the end of the pass
        self.sent_files[name] = stamp

    def write_run_files_manifest(self) -> None:
        if self.run_file_digests != self.digests_written:
            text = json.dumps(self.run_file_digests, indent=1, sort_keys=True)
            self.store.write(RUN_FILES_MANIFEST, text.encode())
            self.digests_written = {name: list(digests) for name, digests in self.run_file_digests.items()}

    def remove_checkpoint(self, name: str) -> None:
        """Manifest first: from that moment on the archive no longer offers it as a checkpoint."""
        self.store.remove(f"checkpoints/{manifest_path(Path(name)).name}")
        self.store.remove(f"checkpoints/{name}")
        self.archived.pop(name, None)
        self.present.discard(name)
        self.report.removed.append(name)

    def newest_archived_step(self) -> int | None:
        return max((int(STEP_FILE.fullmatch(name).group(1)) for name in self.archived), default=None)

    def record_status(self, status: str) -> None:
        """`archive: {uri, status, last_synced_step}` in metadata.yaml, written when it changes."""
        state = (status, self.newest_archived_step())
        if state != self.recorded:
            self.recorded = state
            update_metadata(
                self.run_directory, archive={"uri": self.location, "status": status, "last_synced_step": state[1]}
            )


def read_run_files_manifest(store: Store) -> dict[str, list[str]] | None:
    """The archive's RUN_FILES_MANIFEST; None when it holds none (archived by an older version),
    or one that is not {name: [SHA-256, ...]}."""
    text = store.read(RUN_FILES_MANIFEST)
    try:
        document = json.loads(text) if text is not None else None
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    return {
        name: [digest for digest in digests if isinstance(digest, str)]
        for name, digests in document.items()
        if isinstance(digests, list)
    }


def _manifest_bytes(text: bytes) -> int | None:
    try:
        return json.loads(text).get("bytes")
    except (ValueError, AttributeError):
        return None
