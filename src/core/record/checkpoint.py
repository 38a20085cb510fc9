"""Checkpoints that are atomic, verified and never run code.

Each checkpoint is `checkpoints/step-<global step>.pt` (a plain `torch.save` file)
plus `step-<global step>.json`, its manifest: SHA-256, size, step and epoch.
A write goes to a temporary file, is fsynced, renamed into place, and only then
gets its manifest; so at any instant of a crash the newest *complete* checkpoint
is intact, and an incomplete or damaged one is detected (no manifest, wrong
size or hash) and skipped with a warning. `last.pt` and `best.pt` are hard links
to step files, each with its own manifest.

Loading uses `torch.load(weights_only=True)`: a checkpoint holds tensors and
plain Python values only, so a crafted file cannot run code.
"""

import copy
import hashlib
import io
import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from src.core import faults
from src.core.errors import warn
from src.core.record.rundir import fsync_directory, now, write_text_atomic

FORMAT_VERSION = 1
STEP_FILE = re.compile(r"step-(\d+)\.pt")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions...); the previous ones are intact."""

    def __init__(self, path: Path, cause: OSError):
        super().__init__(
            f"could not write checkpoint {path}: {cause}. The previous checkpoints are intact; "
            "free the space (or fix the permissions) and continue with --resume."
        )
        self.path = path


class DamagedCheckpoint(Exception):
    """A checkpoint that must not be loaded: incomplete, altered, or not loadable safely."""


@dataclass
class CheckpointInfo:
    path: Path
    step: int


def step_file_name(step: int) -> str:
    return f"step-{step:09d}.pt"


def manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes what passes through (torch.save writes sequentially)."""

    def __init__(self, stream):
        self.stream = stream
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self):
        return True

    def write(self, data):
        written = self.stream.write(data)
        faults.maybe_fail_within_write(self.size, self.size + len(data), settle=self.stream.flush)
        self.hash.update(data)
        self.size += len(data)
        return written


def write_checkpoint(
    directory: Path, state: dict, links: tuple[str, ...] = (), covered: Callable[[], None] | None = None
) -> Path:
    """Write `state` atomically as step-<step>.pt with its manifest, then point `links` at it.
    `covered`: makes what the checkpoint covers durable (the logged values and figures a resume
    will not write again), called before the checkpoint becomes visible."""
    directory.mkdir(parents=True, exist_ok=True)
    step = state["progress"]["global_step"]
    path = directory / step_file_name(step)
    temporary = directory / f".{path.name}.tmp"
    try:
        with open(temporary, "wb") as stream:
            hashing = _HashingFile(stream)
            torch.save(state, hashing)
            stream.flush()
            os.fsync(stream.fileno())
        if covered is not None:
            covered()
        os.replace(temporary, path)
        manifest = {
            "file": path.name,
            "sha256": hashing.hash.hexdigest(),
            "bytes": hashing.size,
            "step": step,
            "epoch": state["progress"]["epoch"],
            "batch_in_epoch": state["progress"]["batch_in_epoch"],
            "written": now(),
            "format": FORMAT_VERSION,
        }
        write_text_atomic(manifest_path(path), json.dumps(manifest, indent=1))
        for name in links:  # last.pt / best.pt: a hard link swapped in atomically
            link = directory / f"{name}.pt"
            temporary_link = directory / f".{name}.pt.tmp"
            temporary_link.unlink(missing_ok=True)
            try:
                os.link(path, temporary_link)
            except OSError:  # a filesystem without hard links: a copy does the same job
                shutil.copyfile(path, temporary_link)
            os.replace(temporary_link, link)
            write_text_atomic(
                manifest_path(link), json.dumps({**manifest, "file": link.name, "links_to": path.name}, indent=1)
            )
        fsync_directory(directory)
    except Exception as error:
        temporary.unlink(missing_ok=True)
        cause = _os_error_in(error)
        if cause is None:
            raise
        raise CheckpointWriteError(path, cause) from error
    return path


def _os_error_in(error: BaseException | None) -> OSError | None:
    """The OSError behind `error` (torch.save wraps a failed write in a RuntimeError)."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Verify a checkpoint against its manifest and load it safely; raise DamagedCheckpoint."""
    manifest_file = manifest_path(path)
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as error:
        raise DamagedCheckpoint(f"{path.name}: no readable manifest ({manifest_file.name}: {error})") from None
    try:
        stream = open(path, "rb")  # noqa: SIM115 (closed by the with below)
    except OSError as error:
        raise DamagedCheckpoint(f"{path.name}: cannot be read ({error})") from None
    with stream, ThreadPoolExecutor(max_workers=1) as pool:
        size = os.fstat(stream.fileno()).st_size
        if size != manifest.get("bytes"):
            expected = manifest.get("bytes")
            raise DamagedCheckpoint(f"{path.name}: {size} bytes where the manifest says {expected} (truncated?)")
        # Hash (with pread, beside the loader's reads) while loading: hashlib releases the GIL,
        # so a verified load costs about one hash rather than a hash plus a load.
        digest = pool.submit(_sha256_of_descriptor, stream.fileno(), size)
        try:
            state, load_error = torch.load(stream, map_location=map_location, weights_only=True), None
        except Exception as error:  # an unsafe pickle lands here, unexecuted
            state, load_error = None, error
        if digest.result() != manifest.get("sha256"):
            raise DamagedCheckpoint(f"{path.name}: its SHA-256 does not match the manifest (the file was altered)")
    if load_error is not None:
        reason = load_refusal(load_error)
        raise DamagedCheckpoint(f"{path.name}: refused by torch.load(weights_only=True): {reason}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise DamagedCheckpoint(f"{path.name}: not a checkpoint of this template (format {FORMAT_VERSION})")
    named = STEP_FILE.fullmatch(path.name)
    held = (state.get("progress") or {}).get("global_step") if isinstance(state.get("progress"), dict) else None
    if named and held != int(named.group(1)):  # another step's file, with a manifest made to fit it
        raise DamagedCheckpoint(
            f"{path.name}: holds the state of step {held}, not {int(named.group(1))} (a file renamed, "
            "and its manifest re-signed?)"
        )
    return state


def load_refusal(error: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, without PyTorch's advice to retry with
    weights_only=False (which would run whatever the file holds): the line naming the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if type(error).__name__ == "UnpicklingError" and lines:
        causes = [line for line in lines if "weights_only" not in line and "torch.load" not in line]
        return f"it holds code or objects other than tensors ({(causes or ['unsupported content'])[0][:300]})"
    detail = (lines or [type(error).__name__])[0][:300]
    return f"it is not a file torch.save wrote, or it is damaged ({type(error).__name__}: {detail})"


def _sha256_of_descriptor(descriptor: int, size: int, chunk: int = 2**22) -> str:
    digest = hashlib.sha256()
    for offset in range(0, size, chunk):
        digest.update(os.pread(descriptor, chunk, offset))
    return digest.hexdigest()


def step_checkpoints(directory: Path) -> list[CheckpointInfo]:
    """The step-<n>.pt files in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = STEP_FILE.fullmatch(path.name)
        if match:
            found.append(CheckpointInfo(path, int(match.group(1))))
    return sorted(found, key=lambda info: info.step)


def newest_valid_checkpoint(directory: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that passes verification; each damaged one is reported and skipped."""
    for info in reversed(step_checkpoints(directory)):
        try:
            return info.path, read_checkpoint(info.path)
        except DamagedCheckpoint as error:
            warn(f"warning: skipping checkpoint {error}")
    return None


@dataclass(frozen=True)
class Retention:
    """Which step files pruning keeps: the `keep_recent` newest, plus milestones (the config's
    `checkpoint.keep_every_n_steps`: steps that are multiples of N; `keep_every_n_epochs`:
    the ends of every N-th epoch), so a finished run keeps a history to evaluate."""

    keep_recent: int
    every_n_steps: int | None = None
    every_n_epochs: int | None = None

    def is_milestone(self, info: CheckpointInfo) -> bool:
        if self.every_n_steps and info.step % self.every_n_steps == 0:
            return True
        if self.every_n_epochs:
            try:
                manifest = json.loads(manifest_path(info.path).read_text())
            except (OSError, ValueError):
                return False
            epoch_end = manifest.get("batch_in_epoch") == 0 and manifest.get("epoch", 0) > 0
            return epoch_end and manifest["epoch"] % self.every_n_epochs == 0
        return False


def prune_checkpoints(directory: Path, keep: int | Retention, protected: set[str]) -> list[str]:
    """Delete complete step files beyond the `keep_recent` newest, never one in `protected`
    (best, last) nor a milestone; return the names deleted. Only files with a manifest count as
    recent, so a leftover without one can never push the only valid checkpoint out."""
    retention = keep if isinstance(keep, Retention) else Retention(keep)
    infos = [info for info in step_checkpoints(directory) if manifest_path(info.path).exists()]
    deleted = []
    for info in infos[: max(0, len(infos) - retention.keep_recent)]:
        if info.path.name in protected or retention.is_milestone(info):
            continue
        manifest_path(info.path).unlink(missing_ok=True)
        info.path.unlink(missing_ok=True)
        deleted.append(info.path.name)
    return deleted


def set_aside_newer_than(directory: Path, step: int) -> list[str]:
    """Before a resume from `step`: move the killed run's later step files (damaged or incomplete,
    or they would have been chosen) to `checkpoints/discarded/`, and delete unfinished temporary
    files. The resumed run writes those steps again; nothing it keeps can be confused with them."""
    moved = []
    for info in step_checkpoints(directory):
        if info.step > step:
            discarded = directory / "discarded"
            discarded.mkdir(exist_ok=True)
            for path in (info.path, manifest_path(info.path)):
                if path.exists():
                    os.replace(path, discarded / path.name)
            moved.append(info.path.name)
    for pattern in (".*.tmp", ".*.tmp-*"):  # a checkpoint's, a manifest's
        for temporary in directory.glob(pattern) if directory.is_dir() else []:
            temporary.unlink(missing_ok=True)
    return moved


def snapshot(state: dict, reuse: dict | None = None) -> dict:
    """Copy every tensor to CPU memory, so training can go on while the copy is written.
    Tensors of `reuse` (the previous snapshot, already written) are filled in place where
    they fit: copying into memory already mapped is several times faster than into new memory."""

    def copy_value(value, old):
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if isinstance(old, torch.Tensor) and (old.shape, old.dtype) == (value.shape, value.dtype):
                return old.copy_(value)
            return value.to("cpu", copy=True)
        if isinstance(value, dict):
            old = old if isinstance(old, dict) else {}
            return {key: copy_value(item, old.get(key)) for key, item in value.items()}
        if isinstance(value, list | tuple):
            old = old if isinstance(old, list | tuple) and len(old) == len(value) else [None] * len(value)
            return type(value)(copy_value(item, previous) for item, previous in zip(value, old, strict=True))
        return copy.copy(value)

    return copy_value(state, reuse)


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time.

    `save()` blocks only while it copies the state to CPU memory; the write, the
    fsync and the manifest happen behind training. A failed write is raised by the
    next `save()` or by `wait()`, so training stops with the error. `archive` (an
    `archive.Mirror`) hears of each durable checkpoint and of each pruned one.
    """

    def __init__(self, directory: Path, keep_recent: int | Retention, background: bool = True, archive=None):
        """`keep_recent`: how many step files pruning keeps, or a Retention (with milestones)."""
        self.directory = directory
        self.retention = keep_recent if isinstance(keep_recent, Retention) else Retention(keep_recent)
        self.background = background
        self.archive = archive
        self.protected: dict[str, str] = {}  # "last"/"best" -> step file name
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._snapshot: dict | None = None  # kept for the next save to copy into (see snapshot)
        for name in ("last", "best"):  # after a resume, keep protecting what the links point at
            manifest_file = directory / f"{name}.json"
            if manifest_file.exists():
                self.protected[name] = json.loads(manifest_file.read_text()).get("links_to", "")

    def save(
        self,
        state: dict,
        links: tuple[str, ...],
        on_written: Callable[[Path], None],
        covered: Callable[[], None] | None = None,
    ) -> None:
        """`covered`: see write_checkpoint (called on the writer's thread)."""
        self._raise_pending_error()
        if not self.background:
            self._write(state, links, on_written, covered)
            return
        self.wait()  # at most one write in flight: bounded memory, ordered files
        self._snapshot = snapshot(state, reuse=self._snapshot)  # the previous one is on disk now
        self._thread = threading.Thread(
            target=self._write_in_background, args=(self._snapshot, links, on_written, covered), daemon=True
        )
        self._thread.start()

    def _write(
        self,
        state: dict,
        links: tuple[str, ...],
        on_written: Callable[[Path], None],
        covered: Callable[[], None] | None,
    ) -> None:
        path = write_checkpoint(self.directory, state, links, covered)
        for name in links:
            self.protected[name] = path.name
        pruned = prune_checkpoints(self.directory, self.retention, set(self.protected.values()))
        if self.archive is not None:  # only wakes the mirror's thread: never waits for the store
            self.archive.checkpoints_pruned(pruned)
            self.archive.checkpoint_durable(path)
        on_written(path)

    def _write_in_background(self, state, links, on_written, covered) -> None:
        try:
            self._write(state, links, on_written, covered)
        except BaseException as error:  # handed to the training thread
            self._error = error

    @property
    def failed(self) -> bool:
        """Whether a background write failed (checked after every step: one attribute read)."""
        return self._error is not None

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_pending_error()

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
