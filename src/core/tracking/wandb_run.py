"""The W&B tracker: a W&B run, online or offline, whose files go into RUN_DIR/wandb/ (or
WANDB_DIR); and reading W&B's local transaction logs, to know which steps a resumed
offline run holds already."""

import contextlib
import os
import struct
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

from src.core.tracking.common import run_names


class WandbTracker:
    """A W&B run; its files go into RUN_DIR/wandb/ (or WANDB_DIR), online or offline."""

    name = "wandb"

    def __init__(self, run_directory: Path, config: dict, provenance: dict, resume: dict | None):
        import wandb

        self.wandb = wandb
        settings = config.get("wandb") or {}
        project, run_name = run_names(config, run_directory)
        resume = resume or {}
        self.directory = resume.get("dir") or os.environ.get("WANDB_DIR") or str(Path(run_directory).resolve())
        for variable, folder in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
            # W&B's service keeps its logs and staging files in ~/.cache/wandb otherwise; it reads
            # these when it starts (once a process), so the first run of a process names them.
            os.environ.setdefault(variable, str(Path(self.directory) / "wandb" / folder))
        run_id = resume.get("id") or uuid.uuid4().hex[:16]
        self.last_step = max(local_history_steps(self.directory, run_id), default=-1)
        git = provenance.get("git") or {}
        remotes = git.get("remotes") or {}
        self.run = wandb.init(
            id=run_id,
            project=resume.get("project") or settings.get("project") or project,
            entity=resume.get("entity") or settings.get("entity"),
            mode=settings.get("mode"),
            name=run_name,
            notes=config.get("description"),
            dir=self.directory,
            config={**config, **provenance, "run_directory": str(Path(run_directory).resolve())},
            tags=[f"commit:{git['commit']}"] if git.get("commit") else None,
            resume="allow" if resume else None,
            reinit="create_new",
            allow_val_change=True,  # a resume may extend `epochs`
            settings=wandb.Settings(
                git_commit=git.get("commit"),
                git_remote_url=next(iter(remotes.values()), None) if isinstance(remotes, dict) else None,
            ),
        )
        # W&B drops steps below its last one: an online run knows where it stands, an offline one
        # is read back from its local transaction logs (every earlier segment of this id).
        self.last_step = max(self.last_step, self.run.starting_step - 1)

    def holds(self, step: int, key: str) -> bool:
        return step <= self.last_step

    def holds_image(self, step: int, tag: str) -> bool:
        return step <= self.last_step

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_image(self, step: int, tag: str, png: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="figure-") as scratch:  # W&B copies the file as it is
            local = Path(scratch) / f"{tag.rpartition('/')[2]}.png"
            local.write_bytes(png)
            self.run.log({tag: self.wandb.Image(str(local))}, step=step)

    def flush(self) -> None:  # W&B's service process sends on its own
        pass

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)

    def abandon(self) -> None:
        """After a failure: end W&B's service now, or its exit hook prints the same error again."""
        for end in (lambda: self.run.finish(exit_code=1), self.wandb.teardown):
            with contextlib.suppress(Exception):
                end()

    def ids(self) -> dict:
        return {
            "id": self.run.id,
            "project": self.run.project,
            "entity": self.run.entity or None,
            "dir": self.directory,
        }


WANDB_BLOCK = 32768


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a W&B transaction log (run-<id>.wandb: a LevelDB-style log of 32 KiB
    blocks), up to the first torn or incomplete one, which a killed process leaves behind."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        return
    position, pieces = 7, b""
    while True:
        left = WANDB_BLOCK - position % WANDB_BLOCK
        if left < 7:  # the block's tail is padding
            position += left
            continue
        if position + 7 > len(data):
            return
        checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        payload = data[position + 7 : position + 7 + length]
        if kind == 0 or len(payload) < length or zlib.crc32(payload, zlib.crc32(bytes([kind]))) != checksum:
            return
        position += 7 + length
        if kind == 1:  # a whole record
            yield payload
        elif kind == 2:  # first, middle and last pieces of a record
            pieces = payload
        elif kind == 3:
            pieces += payload
        elif kind == 4:
            yield pieces + payload
            pieces = b""


def local_history_steps(wandb_dir: str, run_id: str) -> Iterator[int]:
    """The history steps that this machine's W&B files hold for run `run_id`."""
    from wandb.proto import wandb_internal_pb2

    for path in Path(wandb_dir).glob(f"wandb/*-{run_id}/run-{run_id}.wandb"):
        for payload in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "history":
                yield record.history.step.num
