"""The run directory: created exactly once, never reused; its YAML files and its lock.

Its layout is in the README ("Run directory").
"""

import datetime
import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from src.core.config.loader import dump_yaml, parse_yaml
from src.core.errors import Refusal, UserError
from src.core.record.git import PROJECT_ROOT

METADATA_FILE = "metadata.yaml"
_metadata_lock = threading.Lock()
CONFIG_FILE = "config.yaml"


FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def log_root(log_dir: str | None) -> Path:
    """Where run directories go: --log-dir, else logs/ in the project."""
    return Path(log_dir) if log_dir else PROJECT_ROOT / "logs"


def require_run_directory(path: str | Path, flag: str) -> Path:
    """`path` as a run directory, or one clear error: what a flag that takes RUN_DIR checks first."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{flag} {path}: not a directory; expected a run directory (logs/<project>/<run>)")
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{flag} {path}: no {CONFIG_FILE} there; expected a run directory under logs/")
    return path


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def create_run_directory(parent: Path, name: str | None, prefix: str = "") -> Path:
    """Make a new directory under `parent`, named `prefix` + (`name` or a timestamp).

    `mkdir` is atomic: when two runs pick the same name in the same second, one
    gets the name and the other a `-2` suffix, so a directory is never shared.
    """
    parent.mkdir(parents=True, exist_ok=True)
    base = prefix + (name or datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    for attempt in range(1, 10_000):
        path = parent / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not find a free run directory name under {parent}")


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary file, fsync, then rename over `path`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: a temporary file, fsync, then rename over `path`."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a full disk must not also keep a half-written file
        raise
    fsync_directory(path.parent)


def remove_temporary_files(run_directory: Path) -> list[str]:
    """Delete the half-written `.<name>.tmp-<pid>` files a killed process left (at --resume)."""
    removed = []
    for temporary in run_directory.glob(".*.tmp-*"):
        temporary.unlink(missing_ok=True)
        removed.append(temporary.name)
    return removed


def read_yaml(path: Path) -> Any:
    """A YAML file the template wrote, with libyaml's safe parser when PyYAML has it (a config
    from the user is parsed by config.parse_yaml, with its bounds)."""
    with open(path, encoding="utf-8") as stream:
        return yaml.load(stream, Loader=FAST_LOADER)


def _read_run_file(path: Path, flag: str) -> dict:
    """One YAML file of a run directory as a mapping, bounded like a config (see config.parse_yaml)."""
    where = f"{flag} {path.parent}: {path.name}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{where} cannot be read: {error}") from None
    document = parse_yaml(text, where)
    if not isinstance(document, dict):
        raise UserError(
            f"{where} holds {'nothing' if document is None else 'a ' + type(document).__name__}; expected "
            "the mapping the run wrote (restore the file, or start a new run)"
        )
    return document


def read_run_files(run_directory: Path, flag: str) -> tuple[dict, dict]:
    """A run directory's saved config.yaml (with its provenance: git, flags...) and its metadata.yaml,
    for `flag` (--resume, --evaluate). Anything missing, unparsable or not what a run writes is a
    UserError naming the file; a missing metadata.yaml reads as `{}`."""
    run_directory = require_run_directory(run_directory, flag)
    config = _read_run_file(run_directory / CONFIG_FILE, flag)
    git, flags = config.get("git"), config.get("flags")
    if not (isinstance(git, dict) and isinstance(git.get("commit"), str) and isinstance(flags, dict)):
        raise UserError(
            f"{flag} {run_directory}: {CONFIG_FILE} has no git.commit or flags, which every logged run records; "
            "expected a run's own saved config (restore it, or start a new run)"
        )
    if not (run_directory / METADATA_FILE).is_file():  # killed before it was written: a resume writes it
        return config, {}
    return config, _read_run_file(run_directory / METADATA_FILE, flag)


def update_metadata(run_directory: Path, **changes: Any) -> dict:
    """Read metadata.yaml, apply `changes` and write it back atomically.

    Reading first keeps what others wrote meanwhile (a `--note` summary).
    """
    path = Path(run_directory) / METADATA_FILE
    with _metadata_lock:  # the checkpoint writer's thread updates it too
        metadata = (read_yaml(path) or {}) if path.exists() else {}
        metadata.update(changes)
        write_text_atomic(path, dump_yaml(metadata))
    return metadata


def record_status(run_directory: Path, **changes: Any) -> bool:
    """How a run ended, into metadata.yaml, even on a full disk: when the atomic write finds no
    space for its temporary file, the file is rewritten in place if its allocated blocks hold the
    new text (a write that needs no new block cannot fail for space). False: not recorded."""
    try:
        update_metadata(run_directory, **changes)
        return True
    except OSError:
        pass
    path = Path(run_directory) / METADATA_FILE
    try:
        with _metadata_lock:
            metadata = read_yaml(path) or {}
            metadata.update(changes)
            text = dump_yaml(metadata).encode()
            if os.stat(path).st_blocks * 512 < len(text):
                return False
            with open(path, "r+b") as stream:
                stream.write(text)
                stream.truncate()
                os.fsync(stream.fileno())
        return True
    except (OSError, yaml.YAMLError):
        return False


def start_run(
    parent: Path, run_name: str | None, config: dict, provenance: dict | Callable[[Path], dict], packages: list[str]
) -> Path:
    """Create the run directory and write config.yaml, packages.txt and metadata.yaml.
    `provenance` may depend on the directory's name (a snapshot's ref): then it is a function of it."""
    run_directory = create_run_directory(parent, run_name)
    if callable(provenance):
        provenance = provenance(run_directory)
    (run_directory / "packages.txt").write_text("\n".join(packages) + "\n", encoding="utf-8")
    write_text_atomic(run_directory / CONFIG_FILE, dump_yaml({**config, **provenance}))
    update_metadata(
        run_directory,
        status="running",
        description=config["description"],
        commit=provenance["git"]["commit"],
        started=now(),
        finished=None,
        error=None,
        epochs_done=0,
        global_step=0,
        best=None,
        last_checkpoint=None,
        resumes=[],
        summary="",  # yours: what this run showed (python run.py --note RUN_DIR "...")
    )
    return run_directory


def lock_run_directory(run_directory: Path):
    """Hold an exclusive lock on the run for as long as the returned file stays open.

    A second process resuming the same run is refused instead of interleaving its
    checkpoints. The kernel drops the lock when the holder dies, even by kill -9;
    a POSIX lock (lockf) is not inherited by forked DataLoader workers (which, on
    Linux, die with their parent: see seeding.seed_worker).
    """
    handle = open(run_directory / ".lock", "a+")  # noqa: SIM115 (held until the process ends)
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise Refusal(f"{run_directory} is in use by another process (still training?); wait for it to end") from None
    return handle
