"""The MLflow tracker: an MLflow run in a tracking server or a local store; values go in batches."""

import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from src.core.record.git import PROJECT_ROOT
from src.core.tracking.common import run_names
from src.core.tracking.metrics import FIGURES_DIRECTORY, figure_file_name

MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch call
MLFLOW_UNSAFE = re.compile(r"[^\w./ -]")  # characters MLflow refuses in param and tag names
# MLflow retries an unreachable server 7 times with growing pauses, up to 120 s a request: a
# run would wait minutes before training. Unless you set them, 2 retries of at most 20 s each,
# then the tracker is dropped with a warning (`--export` fills it in later).
BOUNDED_REQUESTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Nested sections as dotted MLflow keys (in the characters MLflow allows) and text values."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(inner, prefix + MLFLOW_UNSAFE.sub("_", str(key)) + ".")
    else:
        yield prefix[:-1], str(value)


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
        experiment, run_name = run_names(config, run_directory)
        resume = resume or {}
        self.tracking_uri = (
            resume.get("tracking_uri")
            or settings.get("tracking_uri")
            or os.environ.get("MLFLOW_TRACKING_URI")
            or default_mlflow_uri()
        )
        if _file_store(self.tracking_uri):  # MLflow 3 keeps the file store behind this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        for variable, value in BOUNDED_REQUESTS.items():  # MLflow reads them at each request
            os.environ.setdefault(variable, value)
        if self.tracking_uri.startswith("sqlite:///"):  # SQLite creates the file, not its directory
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
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
        self.experiment_id = self._experiment(settings.get("experiment") or experiment)
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

    def _experiment(self, name: str) -> str:
        """The id of the experiment called `name`, created when it does not exist yet."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_root(self.tracking_uri))
        except Exception:  # another run created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

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
    return f"{FIGURES_DIRECTORY}/{phase or 'figures'}/{figure_file_name(step, name)}"


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment of a local SQLite store keeps figures and config.yaml: beside the
    database (MLflow's default, ./mlruns, would land in the working tree and make it dirty)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a server or a file store decides
    return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlflow-artifacts").resolve().as_uri()


def default_mlflow_uri() -> str:
    """An SQLite store in logs/mlflow.db: MLflow 3's client and UI open it as it is (its file store
    needs MLFLOW_ALLOW_FILE_STORE)."""
    return f"sqlite:///{(PROJECT_ROOT / 'logs' / 'mlflow.db').resolve()}"
