"""Runs that outlive the machine: mirror a run directory to object storage, restore it, list it.

An archive is a URI (`s3://bucket/prefix`, `gs://bucket/prefix`, `file:///mnt/shared/runs`)
read and written through fsspec; s3fs and gcsfs are the S3 and GCS back ends
(`pip install -r requirements-archive.txt`). A run `logs/<project>/<run>/` goes to
`<archive>/<project>/<run>/`, laid out as on disk:

    config.yaml packages.txt metadata.yaml metrics.jsonl events.out.tfevents.* figures/ evaluation/
    checkpoints/step-<N>.pt      uploaded first; its SHA-256 is computed while it is sent
    checkpoints/step-<N>.json    its manifest, uploaded only after the .pt is verified
    checkpoints/last.json, best.json   pointers ("links_to": the step file); no last.pt/best.pt
                                       objects: a restore makes them hard links again

A step file without its manifest in the archive is not a checkpoint (an upload that was
interrupted), and a restore skips it. metrics.jsonl is uploaded before a checkpoint's
manifest, so an archived checkpoint never covers more logged lines than the archive holds.
Credentials come from the usual places (the environment, ~/.aws, an instance role,
GOOGLE_APPLICATION_CREDENTIALS); a URI holding credentials is refused, so none reach
config.yaml, metadata.yaml or the command line. S3-compatible stores (and the tests'
local server) are reached through the standard AWS_ENDPOINT_URL variable, a GCS emulator
(the tests' too) through STORAGE_EMULATOR_HOST, without credentials.

Integration (the Trainer and run.py):

    uri = check_archive(config)           # at plan time, before the run directory: exit 2 on bad input
    mirror = Mirror(run_directory, uri, interval=config.archive.sync_interval_seconds)
                                          # rank 0, when uri is not None; starts the worker thread
    CheckpointWriter(..., archive=mirror) # calls mirror.checkpoint_durable(path) after the manifest
                                          # and mirror.checkpoints_pruned(names) after pruning
    mirror.sync_run_files()               # whenever run files changed (any time; coalesced)
    ok = mirror.close(config.archive.final_sync_timeout_seconds)   # after the final metadata update

    status = run_archive_command(args)    # --archive, --restore: an exit code, or None
    archived_runs(uri)                    # --runs URI (src/core/runs.py makes the table)
    restore_for_resume(uri, log_root)     # --resume URI: the local run directory to resume

Nothing the mirror does blocks training: it works on its own thread, retries with
backoff, warns once, and records `archive: {uri, status, last_synced_step}` in
metadata.yaml (status: synced, behind, or failed when the store refuses).
"""

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import yaml

from src.core import faults
from src.core.checkpoint import STEP_FILE, manifest_path, step_checkpoints
from src.core.errors import UserError
from src.core.rundir import (
    CONFIG_FILE,
    METADATA_FILE,
    fsync_directory,
    lock_run_directory,
    log_root,
    now,
    update_metadata,
    write_bytes_atomic,
    write_text_atomic,
)

ENVIRONMENT_VARIABLE = "TEMPLATE_ARCHIVE_URI"
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "file": None}
SECRET_WORDS = ("key", "secret", "token", "password", "credential", "signature", "sig")
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)  # seconds between attempts while the store fails
RUN_FILE_DIRECTORIES = ("figures", "evaluation")
IDENTITY_FILES = (CONFIG_FILE, METADATA_FILE, "packages.txt")
POINTERS = ("last", "best")
RESTORING_MARKER = ".restoring"  # in a run directory whose restore has not finished


class ArchiveError(OSError):
    """An upload that could not be verified (the stored object has another size)."""


def store_errors() -> tuple[type[BaseException], ...]:
    """What a failing store raises: OSError (s3fs maps most errors to it), and the network
    errors of the S3 and GCS clients, where installed. A bug (TypeError...) stays a traceback."""
    errors: list[type[BaseException]] = [OSError]
    clients = (
        ("botocore.exceptions", ("BotoCoreError", "ClientError")),
        ("aiohttp", ("ClientError",)),
        ("gcsfs.retry", ("HttpError",)),  # what gcsfs raises for an HTTP status it does not map (401, 5xx)
        ("google.auth.exceptions", ("GoogleAuthError",)),  # credentials that cannot be loaded or refreshed
    )
    for module, names in clients:
        try:
            imported = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        errors += [getattr(imported, name) for name in names]
    return tuple(errors)


def refused(error: BaseException) -> bool:
    """Whether the store refused (permissions, credentials): the mirror's status is then "failed"
    rather than "behind". s3fs raises PermissionError; gcsfs raises OSError("Forbidden: ...") for
    a 403, HttpError with code 401 for credentials it does not accept, and google.auth's errors
    for credentials it cannot load or refresh."""
    if isinstance(error, PermissionError):
        return True
    if type(error) is OSError and str(error).startswith("Forbidden"):
        return True
    if any(cls.__module__.startswith("google.auth") for cls in type(error).__mro__):
        return True  # credentials that cannot be loaded or refreshed (a revoked key, an expired login)
    return getattr(error, "code", None) in (401, 403)


# ---------------------------------------------------------------------------------------
# URIs


def is_archive_uri(text: str | None) -> bool:
    """Whether `text` names an archive (scheme://...) rather than a local directory."""
    return bool(text) and "://" in text


def credentials_problem(uri: str) -> str | None:
    """Why `uri` must be refused for holding credentials, or None. The URI itself is never
    repeated in the message, since it holds a secret."""
    parts = urlsplit(uri)
    secret_parameters = [name for name, _ in parse_qsl(parts.query) if any(w in name.lower() for w in SECRET_WORDS)]
    if "@" not in parts.netloc and not secret_parameters:
        return None
    where = "user:secret@ before the bucket" if "@" in parts.netloc else f"?{secret_parameters[0]}="
    return (
        f"the archive URI holds credentials ({where}), which would be saved with the run; "
        "give them the usual way instead (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws for S3, "
        "GOOGLE_APPLICATION_CREDENTIALS for GCS) and write only scheme://bucket/prefix (value not shown)"
    )


def check_uri(uri: str) -> str:
    """`uri` without a trailing slash; UserError for credentials or an unknown scheme."""
    problem = credentials_problem(uri)
    if problem:
        raise UserError(problem)
    scheme = urlsplit(uri).scheme.lower()
    if scheme not in BACKENDS or not uri.split("://", 1)[1].strip("/"):
        raise UserError(
            f"archive URI {uri!r}: expected s3://bucket/prefix, gs://bucket/prefix or file:///absolute/path"
        )
    return uri.rstrip("/")


def archive_uri(config: dict) -> str | None:
    """The archive of a run with this config: `archive.uri`, else $TEMPLATE_ARCHIVE_URI, else None
    (also when `archive.enabled` is false). Checked, so it can go into metadata.yaml."""
    section = config.get("archive") or {}
    if section.get("enabled") is False:
        return None
    uri = section.get("uri") or os.environ.get(ENVIRONMENT_VARIABLE) or None
    return check_uri(uri) if uri else None


def require_backend(uri: str) -> str | None:
    """The fsspec back end `uri` needs (None for file://); UserError when it is not installed.
    Found without importing it: importing s3fs and its AWS client costs about 0.3 s of CPU, which
    the mirror pays on its own thread instead of at start-up."""
    scheme = urlsplit(uri).scheme.lower()
    backend = BACKENDS[scheme]
    if backend is not None and importlib.util.find_spec(backend) is None:
        raise UserError(
            f"{scheme}:// needs {backend}: pip install -r requirements-archive.txt (or make install-archive)"
        )
    return backend


def check_archive(config: dict) -> str | None:
    """Before a run writes anything: its archive URI (or None), refused with one UserError when
    it holds credentials, has an unknown scheme, or its back end is not installed. No network."""
    uri = archive_uri(config)
    if uri is not None:
        require_backend(uri)
    return uri


def run_location(uri: str, run_directory: Path) -> str:
    """Where a run goes in the archive at `uri`: <uri>/<project>/<run>."""
    run_directory = Path(run_directory).resolve()
    return f"{check_uri(uri)}/{run_directory.parent.name}/{run_directory.name}"


# ---------------------------------------------------------------------------------------
# The store: an fsspec filesystem and a path inside it


def sha256_of_file(path: Path, chunk: int = 2**22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class _FaultCallback:
    """An fsspec progress callback that gives the crash tests a point inside a transfer."""

    def __init__(self, point: str):
        self.point = point

    def set_size(self, size):
        pass

    def relative_update(self, increment=1):
        faults.maybe_fail(self.point)

    def absolute_update(self, value):
        faults.maybe_fail(self.point)

    def branched(self, *args, **kwargs):
        return None

    def call(self, *args, **kwargs):
        pass


def gcs_emulator() -> str | None:
    """The GCS emulator gcsfs talks to instead of Google (STORAGE_EMULATOR_HOST, read as gcsfs
    reads it: unset, empty or "default" means the real service), or None."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    return None if host in ("", "default") else host


class Store:
    """One location in an archive. Writes to a local or shared directory go to a temporary
    name first, as an object store's uploads do by nature: a name holds all or nothing."""

    def __init__(self, uri: str):
        self.uri = check_uri(uri)
        self.backend = require_backend(self.uri)
        options = {}
        if self.backend == "s3fs":  # fail fast: the mirror retries on its own schedule
            options = {
                "config_kwargs": {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 2}},
                "skip_instance_cache": True,  # a new client reads AWS_ENDPOINT_URL and the credentials anew
            }
        elif self.backend == "gcsfs" and gcs_emulator():
            # An emulator wants no credentials (Google's own client sends none when STORAGE_EMULATOR_HOST
            # is set). Without this, gcsfs looks for real ones first: gcloud's, which it would send to
            # the emulator, then the GCE metadata server, seconds of timeouts off Google Cloud.
            options = {"token": "anon"}
        import fsspec.core

        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri, **options)
        except ImportError as error:  # installed, but broken (say, a botocore that does not fit aiobotocore)
            cause = error.__cause__ or error  # fsspec's own message only says "Install s3fs"
            raise UserError(
                f"{self.backend} is installed but cannot be imported ({cause}); reinstall the pinned versions: "
                "pip install -r requirements-archive.txt"
            ) from None
        self.root = self.root.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def refresh(self) -> None:
        """Forget cached listings: another process (a killed upload, a second machine) may have written."""
        self.fs.invalidate_cache()

    def size(self, relative: str) -> int | None:
        try:
            return int(self.fs.info(self.path(relative))["size"])
        except FileNotFoundError:
            return None

    def read(self, relative: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(relative))
        except FileNotFoundError:
            return None

    def write(self, relative: str, data: bytes) -> None:
        if self.local:
            target = Path(self.path(relative))
            target.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(target, data)
        else:
            self.fs.pipe_file(self.path(relative), data)

    def upload(self, local: Path, relative: str) -> None:
        if self.local:
            target = Path(self.path(relative))
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.part-{os.getpid()}")
            with open(local, "rb") as source, open(temporary, "wb") as destination:
                shutil.copyfileobj(source, destination, 2**22)
                faults.maybe_fail("archive_upload")
                destination.flush()
                os.fsync(destination.fileno())
            os.replace(temporary, target)
        else:
            self.fs.put_file(str(local), self.path(relative), callback=_FaultCallback("archive_upload"))

    def download(self, relative: str, local: Path) -> None:
        """Into `local`, a temporary name the caller renames once the file is verified."""
        self.fs.get_file(self.path(relative), str(local))
        faults.maybe_fail("archive_download")

    def remove(self, relative: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(relative))

    def abort_unfinished_uploads(self) -> list[str]:
        """Remove what writers killed mid-upload left under this location; the names.

        S3 keeps (and bills) the parts of an unfinished multipart upload until it is aborted;
        a local store keeps a `.<name>.part-<pid>` (or `.tmp-<pid>`) file. Only the run's
        holder calls this (its live mirror, or --archive under the run's lock), so none
        belongs to a live writer.
        GCS needs nothing: it expires an unfinished resumable upload after a week."""
        if self.local:
            base = Path(self.root)
            patterns = (".*.part-*", ".*.tmp-*") if base.is_dir() else ()  # a copy's, an atomic write's
            leftovers = sorted(path for pattern in patterns for path in base.rglob(pattern))
            for path in leftovers:
                path.unlink(missing_ok=True)
            return [str(path.relative_to(base)) for path in leftovers]
        if self.backend != "s3fs":
            return []
        bucket, _, prefix = self.root.partition("/")
        request, aborted = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else ""}, []
        while True:
            page = self.fs.call_s3("list_multipart_uploads", **request)
            for upload in page.get("Uploads") or []:
                key = upload["Key"]
                if key.startswith(request["Prefix"]):  # "run1/": not run10's
                    with contextlib.suppress(FileNotFoundError):  # completed or aborted meanwhile
                        self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"])
                    aborted.append(key[len(request["Prefix"]) :])
            if not (page.get("IsTruncated") and page.get("NextKeyMarker")):
                return aborted
            request.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page.get("NextUploadIdMarker", ""))

    def listing(self, relative: str = "") -> dict[str, int]:
        """Every object under `relative`: its path relative to `relative`, and its size."""
        base = self.path(relative)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        return {
            name[len(base) + 1 :]: int(info.get("size") or 0)
            for name, info in found.items()
            if info.get("type") != "directory" and name.startswith(base + "/")
        }


# ---------------------------------------------------------------------------------------
# Upload: one pass that brings the archive up to date with the run directory


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
        return self.report

    def upload_checkpoint(self, path: Path, manifest_text: str) -> None:
        manifest = json.loads(manifest_text)
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
            self.refused.add(path.name)
            self.report.damaged.append(path.name)
            print(
                f"warning: archive: {path} does not match its manifest (SHA-256); not archived",
                file=sys.stderr,
            )
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
        self.store.upload(path, name)
        self.sent_files[name] = stamp

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


def _manifest_bytes(text: bytes) -> int | None:
    try:
        return json.loads(text).get("bytes")
    except (ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------
# The live mirror


class Mirror:
    """Mirrors a training run to its archive on a background thread, never blocking training.

    `checkpoint_durable`, `checkpoints_pruned` and `sync_run_files` only note what changed
    and wake the worker, which makes one `RunUploader.sync` pass for everything pending.
    Passes start at most once per `interval` seconds (`archive.sync_interval_seconds`):
    what changes meanwhile goes up together, so a run with many short epochs does not send
    (and then prune) every checkpoint, nor its growing metrics.jsonl and TensorBoard files
    again after every epoch. close() does not wait for the interval. When the store fails, the worker
    warns once, records `status: behind` (`failed` when the store refuses: permissions,
    credentials) and retries after RETRY_DELAYS; training never waits for it.
    """

    def __init__(
        self, run_directory: Path, uri: str, retry_delays: tuple[float, ...] = RETRY_DELAYS, interval: float = 0.0
    ):
        self.run_directory = Path(run_directory)
        require_backend(uri)  # UserError now, not on the worker thread (which imports it: ~0.3 s of CPU)
        self.uploader = RunUploader(self.run_directory, uri)
        self.location = self.uploader.location
        self.retry_delays = retry_delays
        self.interval = min(interval, threading.TIMEOUT_MAX / 2)
        self._lock = threading.Lock()
        self._wake = threading.Event()  # work is pending
        self._idle = threading.Event()  # a pass finished with nothing pending
        self._closing = threading.Event()  # close() was called: retry at once, not after the backoff
        self._pruned: set[str] = set()
        self._abandoned = False
        self._warned = False
        self._status = "synced"
        self.passes = 0  # upload passes finished (the interval's test counts them)
        self._thread = threading.Thread(target=self._work, name="archive-mirror", daemon=True)
        self._thread.start()
        self.sync_run_files()

    def checkpoint_durable(self, path: Path) -> None:
        """A checkpoint and its manifest are on disk: upload it, then its manifest."""
        self._request()

    def checkpoints_pruned(self, names) -> None:
        """These step files were pruned locally: the archive drops them too."""
        with self._lock:
            self._pruned.update(names)
        self._request()

    def sync_run_files(self) -> None:
        """Upload config.yaml, metrics.jsonl, metadata.yaml, TensorBoard files, figures/ when changed."""
        self._request()

    def wait_until_idle(self, timeout: float) -> bool:
        """Until everything requested so far is in the archive (the crash tests' settle point)."""
        return self._idle.wait(timeout)

    def close(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a final sync; False (with a message) if it did not finish."""
        self._request()
        self._closing.set()
        deadline = time.monotonic() + timeout
        finished = False
        while not finished and self._thread.is_alive() and (left := deadline - time.monotonic()) > 0:
            finished = self._idle.wait(min(left, 1.0))  # a worker that has stopped cannot finish
        with self._lock:
            self._abandoned = True  # the worker stops at its next turn (a transfer in flight may finish)
        self._wake.set()
        if finished:
            return True
        why = f"did not finish within {timeout:g} s" if self._thread.is_alive() else "did not run (see above)"
        print(
            f"warning: archive: the final sync to {self.location} {why}; the archive is behind. "
            f"Complete it later with: python run.py --archive {self.run_directory}",
            file=sys.stderr,
        )
        self.uploader.record_status("failed" if self._status == "failed" else "behind")
        return False

    def _request(self) -> None:
        with self._lock:
            self._idle.clear()
            self._wake.set()

    def _work(self) -> None:
        failures, last_pass = 0, -math.inf
        while True:
            self._wake.wait()
            self._closing.wait(last_pass + self.interval - time.monotonic())  # close() cuts the wait short
            self._wake.clear()
            with self._lock:
                if self._abandoned:
                    return
                pruned, self._pruned = self._pruned, set()
            last_pass = time.monotonic()
            try:
                self.uploader.sync(pruned)
            except UserError as error:  # the back end cannot be imported: retrying cannot help
                self._failed(error, permanent=True)
                return
            except Exception as error:
                with self._lock:
                    self._pruned |= pruned
                    if self._abandoned:
                        return
                failures += 1
                self._failed(error)
                delay = self.retry_delays[min(failures, len(self.retry_delays)) - 1]
                self._closing.wait(delay)  # after close(), retry every second until it gives up
                if self._closing.is_set():
                    time.sleep(min(delay, 1.0))
                self._wake.set()
                continue
            if failures:
                print(f"archive: {self.location} reachable again; the archive caught up", file=sys.stderr)
            failures = 0
            self.passes += 1
            self._status = "synced"
            with self._lock:
                if not self._wake.is_set():
                    self._idle.set()

    def _failed(self, error: Exception, permanent: bool = False) -> None:
        self._status = "failed" if permanent or refused(error) else "behind"
        if not self._warned:
            self._warned = True
            then = "training goes on without it" if permanent else "training goes on, and the mirror retries"
            print(
                f"warning: archive: cannot write to {self.location} ({type(error).__name__}: {error}); "
                f"{then} (metadata.yaml archive.status: {self._status})",
                file=sys.stderr,
            )
        self.uploader.record_status(self._status)


# ---------------------------------------------------------------------------------------
# Commands: --archive, --restore, --runs URI, --resume URI


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
    try:
        report = uploader.sync()
    except store_errors() as error:
        uploader.record_status("failed" if refused(error) else "behind")
        raise UserError(_store_failure("--archive", uploader.location, error)) from None
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


def _store_failure(flag: str, location: str, error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return f"{flag}: {location} does not exist ({error}); create the bucket (or directory) first"
    if refused(error):
        where = (
            "GOOGLE_APPLICATION_CREDENTIALS, gcloud's login, the machine's account"
            if location.startswith(("gs://", "gcs://"))
            else "the environment, ~/.aws, an instance role"
        )
        return (
            f"{flag}: the store refused access to {location} ({type(error).__name__}: {error}); check the "
            f"credentials ({where}) and that they may read and write there"
        )
    return f"{flag}: could not reach {location} ({type(error).__name__}: {error}); nothing was lost, run it again"


@dataclass
class RestoreReport:
    directory: Path
    restored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already restored and verified
    damaged: list[str] = field(default_factory=list)  # "name: why"


def restore_run(uri: str, log_dir: Path) -> RestoreReport:
    """Download the run at `uri` into `log_dir/<project>/<run>`, verifying every checkpoint
    against its manifest (a temporary name, verified, then renamed). Re-running an
    interrupted restore completes it; a finished local run is never overwritten."""
    location = check_uri(uri)
    store = Store(location)
    try:
        store.refresh()
        listing = store.listing()
    except store_errors() as error:
        raise UserError(_store_failure("--restore", location, error)) from None
    if CONFIG_FILE not in listing or METADATA_FILE not in listing:
        raise UserError(
            f"--restore {location}: no run there (expected {CONFIG_FILE} and {METADATA_FILE}); "
            "list the archived runs with --runs ARCHIVE_URI"
        )
    project, run = location.rsplit("/", 2)[1:]
    directory = Path(log_dir) / project / run
    marker = directory / RESTORING_MARKER
    if directory.exists() and not marker.exists():
        raise UserError(
            f"--restore {location}: {directory} exists already (a finished restore, or the original run); "
            "use it as it is (--resume DIR), delete it, or restore elsewhere with --log-dir DIR"
        )
    (directory / "checkpoints").mkdir(parents=True, exist_ok=True)
    marker.touch()
    report = RestoreReport(directory)
    try:
        _restore_files(store, listing, directory, report)
    except store_errors() as error:
        raise UserError(
            _store_failure("--restore", location, error) + f"; run the same --restore again to complete {directory}"
        ) from None
    update_metadata(directory, restored={"from": location, "at": now()})
    marker.unlink()
    fsync_directory(directory)
    return report


def _restore_files(store: Store, listing: dict[str, int], directory: Path, report: RestoreReport) -> None:
    checkpoints = directory / "checkpoints"
    for name in sorted(listing):
        if name.startswith("checkpoints/") or Path(name).name.startswith("."):
            continue
        if Path(name).is_absolute() or ".." in Path(name).parts:  # a key crafted to write elsewhere
            report.damaged.append(f"{name}: not a path inside the run; not restored")
            continue
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.part")
        store.download(name, temporary)
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
        manifest = json.loads(manifest_text)
        target = checkpoints / file_name
        if _verified_locally(target, manifest_text):
            report.skipped.append(file_name)
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
    for pointer in POINTERS:
        text = store.read(f"checkpoints/{pointer}.json")
        target_name = json.loads(text).get("links_to") if text else None
        if not target_name:
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
    fsync_directory(checkpoints)


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
    return size == json.loads(local).get("bytes")


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


def archived_runs(uri: str) -> dict[str, tuple[dict, dict]]:
    """Every archived run under `uri`: its name -> (config.yaml, metadata.yaml), for `--runs URI`."""
    store = Store(uri)
    try:
        store.refresh()
        listing = store.listing()
    except store_errors() as error:
        raise UserError(_store_failure("--runs", store.uri, error)) from None
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


def run_archive_command(args) -> int | None:
    """--archive and --restore (see src/core/cli.py); None when neither was asked for."""
    if args.archive:
        if len(args.archive) > 2:
            raise UserError(f"--archive takes RUN_DIR [URI], got {len(args.archive)} values")
        report = archive_run(Path(args.archive[0]), *args.archive[1:], args.delete_local_checkpoints)
        print(
            f"archived {args.archive[0]}: {len(report.uploaded)} checkpoint(s) uploaded and verified, "
            f"{len(report.skipped)} already archived"
        )
        return 0
    if args.delete_local_checkpoints:
        raise UserError("--delete-local-checkpoints goes with --archive RUN_DIR [URI]")
    if args.restore:
        if not is_archive_uri(args.restore):
            raise UserError(f"--restore {args.restore}: expected an archive URI such as s3://bucket/prefix/project/run")
        report = restore_run(args.restore, log_root(args.log_dir))
        print_restore_report(report)
        return 0
    return None
