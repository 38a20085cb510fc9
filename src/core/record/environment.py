"""What else a result depends on: the environment (Python, torch, CUDA, the host, every
installed package) and the data, which lives outside git and is fingerprinted."""

import hashlib
import importlib.metadata
import os
import platform
import socket
import sys
import threading
from pathlib import Path

from src.core.errors import UserError
from src.core.record.git import PROJECT_ROOT

# Data fingerprints hash file contents when the directory holds at most this much.
DATA_HASH_LIMIT_BYTES = 256 * 2**20
# ...and list each file (name, size, SHA-256 when hashed) when it holds at most this many,
# so that `--diff` can name the files two runs' data differ in.
DATA_LISTING_LIMIT_FILES = 200


def installed_packages() -> list[str]:
    """`pip freeze` without starting pip: every installed distribution as name==version.

    Reads only the `Name` and `Version` headers of each METADATA file: `dist.metadata`
    parses every whole file with the email parser, twice per package, which cost a
    logged run's start 0.13 s for 130 packages (this: 0.01 s, the same list).
    """
    packages = set()
    for dist in importlib.metadata.distributions():
        text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""  # where importlib looks
        fields: dict[str, str] = {}
        for line in text.split("\n\n", 1)[0].splitlines():  # the headers end at the first blank line
            key, colon, value = line.partition(":")
            if colon and key in ("Name", "Version") and key not in fields:
                fields[key] = value.strip()
        if fields.get("Name"):
            packages.add(f"{fields['Name']}=={fields.get('Version')}")
    return sorted(packages, key=str.lower)


def environment_provenance() -> dict:
    """The `environment` section of a run's config.yaml."""
    import numpy
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a str subclass YAML cannot write
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "executable": sys.executable,
    }


def data_fingerprint(directory: Path | str) -> dict:
    """Identify the data, which lives outside git: every file's name and size, and a
    SHA-256 of all contents when the directory holds at most DATA_HASH_LIMIT_BYTES."""
    directory = Path(directory)
    files, total, listing = data_listing(directory)
    content, digests = None, {}
    if total <= DATA_HASH_LIMIT_BYTES:
        content_hash = hashlib.sha256()
        for path in files:
            content_hash.update(path.relative_to(directory).as_posix().encode() + b"\0")
            with open(path, "rb") as stream:
                digest = hashlib.file_digest(stream, "sha256")
            content_hash.update(digest.digest())
            digests[path] = digest.hexdigest()
        content = content_hash.hexdigest()
    per_file = None
    if len(files) <= DATA_LISTING_LIMIT_FILES:
        per_file = {
            path.relative_to(directory).as_posix(): {"bytes": path.stat().st_size, "sha256": digests.get(path)}
            for path in files
        }
    return {
        "directory": str(directory.resolve()),
        "files": len(files),
        "bytes": total,
        "listing_sha256": listing,
        "content_sha256": content,
        "rule": f"names and sizes always; contents when at most {DATA_HASH_LIMIT_BYTES // 2**20} MiB",
        "per_file": per_file,  # None over DATA_LISTING_LIMIT_FILES files
    }


def data_listing(directory: Path) -> tuple[list[Path], int, str]:
    """The data's files, their total size and the SHA-256 of their names and sizes."""
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    listing = hashlib.sha256()
    total = 0
    for path in files:
        size = path.stat().st_size
        total += size
        listing.update(f"{path.relative_to(directory).as_posix()}\0{size}\n".encode())
    return files, total, listing.hexdigest()


class Gathering:
    """The package list and the data's fingerprint, gathered on a thread while the model and its
    data are built (hashing up to DATA_HASH_LIMIT_BYTES of data takes seconds); `result` waits."""

    def __init__(self, data_directory: Path | str):
        self.data_directory = Path(data_directory)
        self.values: tuple[list[str], dict] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._gather, name="provenance", daemon=True)
        self.thread.start()

    def _gather(self) -> None:
        try:
            self.values = (installed_packages(), data_fingerprint(self.data_directory))
        except BaseException as error:  # raised by `result`, on the thread that records the run
            self.error = error

    def result(self) -> tuple[list[str], dict]:
        """(packages, data fingerprint). A dataset that wrote into its directory while it was built
        (a cache) changed the listing: the data is then fingerprinted again, as it is now."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        packages, fingerprint = self.values
        if data_listing(self.data_directory)[2] != fingerprint["listing_sha256"]:
            fingerprint = data_fingerprint(self.data_directory)
        return packages, fingerprint


def find_data_directory(value: str) -> Path:
    """The config's `data_directory`, relative to the project root unless absolute; it must exist."""
    data_directory = Path(value)
    if not data_directory.is_absolute():
        data_directory = PROJECT_ROOT / data_directory
    try:
        is_directory = data_directory.is_dir()
    except OSError:  # a name too long for the filesystem, say
        is_directory = False
    if not is_directory:
        shown = str(data_directory) if len(str(data_directory)) <= 300 else f"{str(data_directory)[:300]}…"
        raise UserError(
            f"config key 'data_directory': {shown!r} is not a directory "
            "(relative paths start at the project root; for the example data run: make data)"
        )
    return data_directory
