"""Experiment trackers (Weights & Biases, MLflow) beside metrics.jsonl and TensorBoard.

Config `loggers: [tensorboard, jsonl, wandb, mlflow]` names them; each is an optional
install (requirements-trackers.txt), imported only when named. A tracker run gets the
resolved config, the git commit, the data fingerprint, the environment and the run
directory's path, so it links back to the exact code; metrics keep their TensorBoard
names (`<phase>/<name>`), figures their tags (`rollout/trajectory`).

Integration API (rank 0 only; the other ranks never call it):

    check_trackers(config.loggers)           # before training: a missing install is a UserError
    trackers = Trackers.open(config.loggers, run_directory, config_dict, provenance,
                             resume=metadata.get("trackers"))   # after MetricLogger cut metrics.jsonl
    update_metadata(run_directory, trackers=trackers.ids())     # so a resume continues the same runs
    trackers.log_metrics(step, {"val/loss": 0.1})               # beside every MetricLogger.log
    trackers.log_image(step, "rollout/trajectory", png_bytes)   # beside every saved figure
    trackers.flush()                                            # beside MetricLogger.flush(durable=True)
    trackers.close("finished")                                  # or "failed" / "killed"

`provenance` is what config.yaml holds beside the config (git, flags, environment,
data_fingerprint). `open` replays into each tracker run whatever of metrics.jsonl and
RUN_DIR/figures/ it lacks (nothing for a new run): on resume that fills what a killed
process had not handed over, and what the tracker already holds is never sent twice.
`python run.py --export RUN_DIR --to wandb|mlflow` is the same replay after the fact.

Logging never slows the step: calls only queue values, and one background thread hands
them to the trackers (MLflow in batches; W&B to its own service process). A tracker that
fails is warned about once and dropped; training goes on, and `--export` can fill it in.
"""

import contextlib
import os
import queue
import re
import struct
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from src.core import errors
from src.core.errors import UserError

TRACKERS = ("wandb", "mlflow")
INSTALL = "pip install -r requirements-trackers.txt"
FLUSH_SECONDS = 10.0  # MLflow receives buffered values at least this often
FLUSH_TIMEOUT_SECONDS = 60.0  # flush() and close() wait at most this long for a slow tracker
MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch call
FIGURE_FILE = re.compile(r"(\d+)-(.+)\.png")
MLFLOW_UNSAFE = re.compile(r"[^\w./ -]")  # characters MLflow refuses in param and tag names


def warn(message: str) -> None:
    errors.warn(f"warning: {message}")


def check_trackers(names: list[str] | tuple[str, ...]) -> None:
    """Refuse, before anything is trained, a tracker that is named but not installed."""
    import importlib.util

    for name in names:
        if name in TRACKERS and importlib.util.find_spec(name) is None:
            raise UserError(f"loggers: {name} is not installed; {INSTALL}")


# ---------------------------------------------------------------------------------------
# The two trackers: each says which (step, key) it holds already, and logs the rest.


def _names(config: dict, run_directory: Path) -> tuple[str, str]:
    """The tracker's project (or experiment) and run names, as the run directory's."""
    return config.get("project_name") or config["model_type"], config.get("run_name") or Path(run_directory).name


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Nested sections as dotted MLflow keys (in the characters MLflow allows) and text values."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(inner, prefix + MLFLOW_UNSAFE.sub("_", str(key)) + ".")
    else:
        yield prefix[:-1], str(value)


class WandbTracker:
    """A W&B run; its files go into RUN_DIR/wandb/ (or WANDB_DIR), online or offline."""

    name = "wandb"

    def __init__(self, run_directory: Path, config: dict, provenance: dict, resume: dict | None):
        import wandb

        self.wandb = wandb
        settings = config.get("wandb") or {}
        project, run_name = _names(config, run_directory)
        resume = resume or {}
        self.directory = resume.get("dir") or os.environ.get("WANDB_DIR") or str(Path(run_directory).resolve())
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


def _file_store(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri


class MlflowTracker:
    """An MLflow run, in a tracking server or a local store; values go in batches."""

    name = "mlflow"

    def __init__(self, run_directory: Path, config: dict, provenance: dict, resume: dict | None):
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag

        self.Metric = Metric
        settings = config.get("mlflow") or {}
        experiment, run_name = _names(config, run_directory)
        resume = resume or {}
        self.tracking_uri = (
            resume.get("tracking_uri")
            or settings.get("tracking_uri")
            or os.environ.get("MLFLOW_TRACKING_URI")
            or default_mlflow_uri()
        )
        if _file_store(self.tracking_uri):  # MLflow 3 keeps the file store behind this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.pending: list = []
        if resume.get("run_id"):
            self.run_id = resume["run_id"]
            run = self.client.get_run(self.run_id)  # raises when the store does not hold it
            self.experiment_id = run.info.experiment_id
            self.history = {
                key: {metric.step for metric in self.client.get_metric_history(self.run_id, key)}
                for key in run.data.metrics
            }
            self.figures = self._figures()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = settings.get("experiment") or experiment
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                self.experiment_id = self.client.create_experiment(name)
            except Exception:  # another run created it meanwhile
                self.experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            self.experiment_id = found.experiment_id
        git = provenance.get("git") or {}
        tags = {
            "mlflow.source.git.commit": git.get("commit"),
            "mlflow.source.git.branch": git.get("branch"),
            "mlflow.note.content": config.get("description"),
            "run_directory": str(Path(run_directory).resolve()),
        }
        tags.update(
            _flatten({key: provenance[key] for key in ("git", "data_fingerprint", "environment") if key in provenance})
        )
        run = self.client.create_run(
            self.experiment_id, run_name=run_name, tags={k: v[:8000] for k, v in tags.items() if v is not None}
        )
        self.run_id, self.history, self.figures = run.info.run_id, {}, set()
        params = [Param(key, value[:6000]) for key, value in _flatten(config) if key]
        for start in range(0, len(params), 100):  # MLflow takes 100 params per call
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_batch(self.run_id, tags=[RunTag("command_line", str(provenance.get("command_line", "")))])
        if (Path(run_directory) / "config.yaml").is_file():  # the exact provenance, as saved
            self.client.log_artifact(self.run_id, str(Path(run_directory) / "config.yaml"))

    def _figures(self) -> set[str]:
        return {
            figure.path
            for phase in self.client.list_artifacts(self.run_id, "figures")
            if phase.is_dir
            for figure in self.client.list_artifacts(self.run_id, phase.path)
        }

    def holds(self, step: int, key: str) -> bool:
        return step in self.history.get(key, ())

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        milliseconds = int(time.time() * 1000)
        self.pending.extend(self.Metric(key, value, milliseconds, step) for key, value in values.items())
        if len(self.pending) >= MLFLOW_BATCH:
            self.flush()

    def holds_image(self, step: int, tag: str) -> bool:
        return _figure_path(step, tag) in self.figures

    def log_image(self, step: int, tag: str, png: bytes) -> None:
        path = _figure_path(step, tag)
        with tempfile.TemporaryDirectory(prefix="figure-") as scratch:
            local = Path(scratch) / Path(path).name
            local.write_bytes(png)
            self.client.log_artifact(self.run_id, str(local), str(Path(path).parent))
        self.figures.add(path)

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:MLFLOW_BATCH], self.pending[MLFLOW_BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "failed": "FAILED"}.get(status, "KILLED"))

    def ids(self) -> dict:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.tracking_uri}


def _figure_path(step: int, tag: str) -> str:
    """`rollout/trajectory` at step 400 -> figures/rollout/000000400-trajectory.png, as in the run directory."""
    phase, _, name = tag.rpartition("/")
    from src.core.metrics import FIGURES_DIRECTORY, figure_file_name  # the run directory's own naming

    return f"{FIGURES_DIRECTORY}/{phase or 'figures'}/{figure_file_name(step, name)}"


def default_mlflow_uri() -> str:
    from src.core.provenance import PROJECT_ROOT

    return (PROJECT_ROOT / "logs" / "mlruns").resolve().as_uri()


OPENERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}


# ---------------------------------------------------------------------------------------
# The fan-out: one background thread, so that the training loop only queues.


class Trackers:
    """The configured trackers of one run (see the module docstring for how to call it)."""

    def __init__(self, trackers: list, run_directory: Path, ids: dict):
        self.live = list(trackers)
        self.run_directory = Path(run_directory)
        self._ids = ids
        self.sent = {tracker.name: 0 for tracker in trackers}  # values and figures handed over
        self.skipped = {tracker.name: 0 for tracker in trackers}  # already held by the tracker
        self.failed: list[str] = []
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="trackers", daemon=True)
        if self.live:
            self._thread.start()

    @classmethod
    def open(cls, names, run_directory: Path, config: dict, provenance: dict, resume: dict | None = None) -> "Trackers":
        """Start (or, with the `resume` ids that `ids()` returned, continue) each named tracker's
        run, then queue what of metrics.jsonl and figures/ the tracker does not hold yet."""
        resume = dict(resume or {})
        opened, ids = [], {name: value for name, value in resume.items() if value}  # kept, even if not opened
        for name in names:
            if name not in TRACKERS:
                continue
            try:
                tracker = OPENERS[name](Path(run_directory), dict(config), dict(provenance), resume.get(name))
            except Exception as error:  # unreachable, unwritable, or a run the store does not hold
                problem = f"{type(error).__name__}: {error}"
                warn(f"{name}: could not start its run ({problem}); {_going_on(name, run_directory)}")
                continue
            opened.append(tracker)
            ids[name] = tracker.ids()
        trackers = cls(opened, run_directory, ids)
        if opened:
            for item in replay_items(Path(run_directory)):
                trackers._queue.put(item)
        return trackers

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        """Queue values named `<phase>/<name>`, as in TensorBoard."""
        if self.live:
            self._queue.put(("metrics", step, {key: float(value) for key, value in values.items()}))

    def log_image(self, step: int, tag: str, png: bytes) -> None:
        """Queue a PNG figure, tagged like `rollout/trajectory`."""
        if self.live:
            self._queue.put(("image", step, tag, png))

    def flush(self, timeout: float = FLUSH_TIMEOUT_SECONDS) -> None:
        """Hand everything queued so far to the trackers (waits at most `timeout` seconds)."""
        if self.live and self._thread.is_alive():
            done = threading.Event()
            self._queue.put(("flush", done))
            done.wait(timeout)

    def ids(self) -> dict:
        """Each tracker's run, for metadata.yaml `trackers:`; pass it back to `open` on resume."""
        return {name: dict(value) for name, value in self._ids.items()}

    def close(self, status: str = "finished", timeout: float = FLUSH_TIMEOUT_SECONDS) -> None:
        """Send what is queued and end each tracker run as finished, failed or killed."""
        if self._thread.is_alive():
            self._queue.put(("close", status))
            self._thread.join(timeout)
            if self._thread.is_alive():
                warn(f"{', '.join(t.name for t in self.live)}: still sending after {timeout:.0f} s; not waiting longer")

    # The background thread ------------------------------------------------------------

    def _work(self) -> None:
        last_flush = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=FLUSH_SECONDS)
            except queue.Empty:
                item = ("flush", None)
            kind = item[0]
            if kind == "metrics":
                self._each(self._log_metrics, *item[1:])
            elif kind == "image":
                self._each(self._log_image, *item[1:])
            if kind in ("flush", "close") or time.monotonic() - last_flush > FLUSH_SECONDS:
                self._each(lambda tracker: tracker.flush())
                last_flush = time.monotonic()
            if kind == "flush" and item[1] is not None:
                item[1].set()
            if kind == "close":
                self._each(lambda tracker, status: tracker.close(status), item[1])
                return

    def _each(self, action, *args) -> None:
        """`action(tracker, *args)` for each live tracker; one that fails is warned about and dropped."""
        for tracker in list(self.live):
            try:
                action(tracker, *args)
            except Exception as error:
                self.live.remove(tracker)
                self.failed.append(tracker.name)
                if hasattr(tracker, "abandon"):
                    tracker.abandon()
                warn(
                    f"{tracker.name} failed ({type(error).__name__}: {error}); nothing more goes to it in "
                    f"this run; {_going_on(tracker.name, self.run_directory)}"
                )

    def _log_metrics(self, tracker, step: int, values: dict[str, float]) -> None:
        new = {key: value for key, value in values.items() if not tracker.holds(step, key)}
        self.skipped[tracker.name] += len(values) - len(new)
        if new:
            tracker.log_metrics(step, new)
            self.sent[tracker.name] += len(new)

    def _log_image(self, tracker, step: int, tag: str, png: bytes) -> None:
        if tracker.holds_image(step, tag):
            self.skipped[tracker.name] += 1
            return
        tracker.log_image(step, tag, png)
        self.sent[tracker.name] += 1


def _going_on(name: str, run_directory: Path) -> str:
    return f"training goes on without it; fill it in later with: python run.py --export {run_directory} --to {name}"


# ---------------------------------------------------------------------------------------
# Replaying a run directory: for resume and --export.


def replay_items(run_directory: Path) -> Iterator[tuple]:
    """metrics.jsonl and figures/<phase>/<step>-<name>.png as queue items, in step order
    (W&B takes steps only in increasing order); a step's values go in one call."""
    from src.core.metrics import read_metrics

    by_step: dict[int, dict[str, float]] = {}
    for record in read_metrics(run_directory):
        by_step.setdefault(int(record["step"]), {})[f"{record['phase']}/{record['name']}"] = float(record["value"])
    figures: dict[int, list[tuple[str, Path]]] = {}
    for path in sorted((run_directory / "figures").glob("*/*.png")):
        match = FIGURE_FILE.fullmatch(path.name)
        if match:
            figures.setdefault(int(match.group(1)), []).append((f"{path.parent.name}/{match.group(2)}", path))
    for step in sorted(by_step.keys() | figures.keys()):
        if step in by_step:
            yield ("metrics", step, by_step[step])
        for tag, path in figures.get(step, []):
            yield ("image", step, tag, path.read_bytes())


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


# ---------------------------------------------------------------------------------------
# --export RUN_DIR --to wandb|mlflow


def export_run(run_directory: Path, to: str | None) -> int:
    """Replay a finished (or crashed) run into a tracker; again later, only what is missing.

    The tracker run's id is kept in metadata.yaml `trackers:`, so a second export, or an
    export of a run that logged live, continues the same tracker run.
    """
    from src.core.rundir import CONFIG_FILE, METADATA_FILE, lock_run_directory, read_yaml, update_metadata

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
        from src.core.config import split_provenance

        config, provenance = split_provenance(saved)
        known = metadata.get("trackers") or {}
        trackers = Trackers.open([to], run_directory, config, provenance, known)
        if not trackers.live:
            return 1
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
