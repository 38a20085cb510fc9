"""The store: one location in an archive, read and written through fsspec, and what its
failures mean (a refusal, or an outage the mirror retries)."""

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from src.core import faults
from src.core.config.uris import BACKENDS, check_uri
from src.core.errors import UserError
from src.core.record.rundir import write_bytes_atomic

ENVIRONMENT_VARIABLE = "TEMPLATE_ARCHIVE_URI"
PROBE_SECONDS = 10.0  # a new run waits at most this long for its object store's first answer


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


CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}  # botocore's


def refused(error: BaseException) -> bool:
    """Whether the store refused (permissions, credentials): the mirror's status is then "failed"
    rather than "behind". s3fs raises PermissionError; gcsfs raises OSError("Forbidden: ...") for
    a 403, HttpError with code 401 for credentials it does not accept, and google.auth's errors
    for credentials it cannot load or refresh; botocore raises NoCredentialsError where it finds none."""
    if isinstance(error, PermissionError):
        return True
    if type(error) is OSError and str(error).startswith("Forbidden"):
        return True
    if any(cls.__module__.startswith("google.auth") for cls in type(error).__mro__):
        return True  # credentials that cannot be loaded or refreshed (a revoked key, an expired login)
    if any(cls.__name__ in CREDENTIAL_ERRORS for cls in type(error).__mro__):
        return True  # botocore found no credentials, or half of them
    return getattr(error, "code", None) in (401, 403)


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
    it holds credentials, has an unknown scheme, or its back end is not installed. The archive
    is probed too, so that what would refuse it after training is refused now: a file://
    directory that can never be written (under /dev/null or /proc, a name too long, a
    read-only disk); an object store that refuses the run (no or bad credentials, no
    permission) or whose bucket does not exist."""
    uri = archive_uri(config)
    if uri is not None:
        require_backend(uri)
        if urlsplit(uri).scheme.lower() == "file":
            probe_local_archive(Path(urlsplit(uri).path))
        else:
            probe_remote_archive(uri)
    return uri


def probe_local_archive(root: Path) -> None:
    """Create `root` (and its missing parents), write and delete a file in it, then remove the
    directories the probe made: UserError naming the reason when any step fails. Nothing is
    created outside `root`, and nothing is left behind."""
    made: list[Path] = []
    probe = root / f".probe-{os.getpid()}"
    try:
        made = [directory for directory in (root, *root.parents) if not directory.exists()]
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserError(
            f"archive file://{str(root)[:200]}{'…' if len(str(root)) > 200 else ''} cannot be written ({reason}); "
            "give a directory this machine may create and write, as file:///absolute/path"
        ) from None
    finally:
        for directory in made:  # deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()


def probe_remote_archive(uri: str, seconds: float = PROBE_SECONDS) -> None:
    """One listing of the archive's prefix (what the mirror lists first anyway), waited for at most
    `seconds`: UserError when the store refuses it or its bucket does not exist. A store that
    does not answer in time, or fails otherwise (an outage), is left to the mirror, which warns
    and retries while the run trains."""
    outcome: list[BaseException] = []

    def probe() -> None:
        try:
            store = Store(uri)
            try:
                store.fs.ls(store.root, detail=False)
            except FileNotFoundError:  # nothing archived there yet, or no such bucket
                bucket = store.root.split("/", 1)[0]
                if not store.fs.exists(bucket):
                    raise
        except BaseException as error:  # handed to the run's thread
            outcome.append(error)

    thread = threading.Thread(target=probe, name="archive probe", daemon=True)
    thread.start()
    thread.join(seconds)
    error = outcome[0] if outcome else None
    if isinstance(error, UserError):  # a back end installed but broken
        raise error
    if isinstance(error, FileNotFoundError) or (error is not None and refused(error)):
        raise UserError(store_failure("archive.uri", uri, error) + "; nothing was run") from None


def run_location(uri: str, run_directory: Path) -> str:
    """Where a run goes in the archive at `uri`: <uri>/<project>/<run>."""
    run_directory = Path(run_directory).resolve()
    return f"{check_uri(uri)}/{run_directory.parent.name}/{run_directory.name}"


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
        elif self.backend == "gcsfs":
            # gcsfs's own log lines (a traceback for each request it gave up on) go nowhere: the
            # template says once what failed. Its lookup of the bucket's type (Storage Control API)
            # retries for 60 s by default, and again for each request: 5 s here.
            quiet = logging.getLogger("gcsfs")
            quiet.propagate = False
            if not quiet.handlers:  # once: a Store is made for every operation
                quiet.addHandler(logging.NullHandler())
            options = {"retry_timeout": 5}
            if gcs_emulator():
                # An emulator wants no credentials (Google's own client sends none when STORAGE_EMULATOR_HOST
                # is set). Without this, gcsfs looks for real ones first: gcloud's, which it would send to
                # the emulator, then the GCE metadata server, seconds of timeouts off Google Cloud.
                options["token"] = "anon"
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
        """The object's bytes; None when it does not exist (or, in a local store, is no plain file)."""
        if self.local and not self.is_plain_file(relative):
            return None
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

    def is_plain_file(self, relative: str) -> bool:
        """Whether `relative` is an ordinary file (an object store holds nothing else); in a local
        store a symlink (to /dev/zero, say) or a device is not, and is never read."""
        if not self.local:
            return True
        try:
            return stat.S_ISREG(os.lstat(self.path(relative)).st_mode)
        except OSError:
            return False

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


def store_failure(flag: str, location: str, error: Exception) -> str:
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
    if isinstance(error, ValueError):  # the store's answer (not gcsfs's advice, which names its own options)
        return (
            f"{flag}: the store refused the request for {location} ({error.__cause__ or error}); it will answer "
            "the same again: archive to a bucket your project owns"
        )
    return f"{flag}: could not reach {location} ({type(error).__name__}: {error}); nothing was lost, run it again"


@contextlib.contextmanager
def store_call(flag: str, location: str, then: str = "", on_failure: Callable | None = None) -> Iterator[None]:
    """A failing store inside the block becomes one UserError for `flag`, saying what went wrong
    at `location` (and `then`, what to do next); `on_failure(error)` runs first."""
    try:
        yield
    except (*store_errors(), ValueError) as error:
        if isinstance(error, ValueError) and not isinstance(error.__cause__, store_errors()):
            raise  # a bug, not the store (gcsfs raises ValueError from its HttpError for a requester-pays bucket)
        if on_failure is not None:
            on_failure(error)
        raise UserError(store_failure(flag, location, error) + then) from None
