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

import importlib.util
import queue
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from src.core.errors import UserError
from src.core.tracking.common import warn

TRACKERS = ("wandb", "mlflow")
INSTALL = "pip install -r requirements-trackers.txt"
FLUSH_SECONDS = 10.0  # MLflow receives buffered values at least this often
FLUSH_TIMEOUT_SECONDS = 60.0  # flush() and close() wait at most this long for a slow tracker
FIGURE_FILE = re.compile(r"(\d+)-(.+)\.png")


def check_trackers(names: list[str] | tuple[str, ...]) -> None:
    """Refuse, before anything is trained, a tracker that is named but not installed."""
    for name in names:
        if name in TRACKERS and importlib.util.find_spec(name) is None:
            raise UserError(f"loggers: {name} is not installed; {INSTALL}")


def open_tracker(name: str, run_directory: Path, config: dict, provenance: dict, resume: dict | None):
    """One tracker's run (its module is imported only here: each is an optional install)."""
    if name == "wandb":
        from src.core.tracking.wandb_run import WandbTracker

        return WandbTracker(run_directory, config, provenance, resume)
    from src.core.tracking.mlflow_run import MlflowTracker

    return MlflowTracker(run_directory, config, provenance, resume)


# ---------------------------------------------------------------------------------------
# The fan-out: one background thread, so that the training loop only queues.


class Trackers:
    """The configured trackers of one run (see the module docstring for how to call it)."""

    def __init__(self, trackers: list, run_directory: Path, ids: dict, exporting: bool = False):
        self.exporting = exporting  # --export: there is no training to go on, and a failure is told so
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
    def open(
        cls,
        names,
        run_directory: Path,
        config: dict,
        provenance: dict,
        resume: dict | None = None,
        exporting: bool = False,
    ) -> "Trackers":
        """Start (or, with the `resume` ids that `ids()` returned, continue) each named tracker's
        run, then queue what of metrics.jsonl and figures/ the tracker does not hold yet.
        `exporting` (--export): a tracker that cannot start is a UserError, not a warning."""
        resume = dict(resume or {})
        opened, ids = [], {name: value for name, value in resume.items() if value}  # kept, even if not opened
        for name in names:
            if name not in TRACKERS:
                continue
            try:
                tracker = open_tracker(name, Path(run_directory), dict(config), dict(provenance), resume.get(name))
            except Exception as error:  # unreachable, unwritable, or a run the store does not hold
                problem = f"{type(error).__name__}: {str(error)[:500]}"
                if exporting:
                    raise UserError(
                        f"--export {run_directory} --to {name}: could not start its run ({problem}); nothing was "
                        "exported. Check the tracker's address and credentials, then run the same command again"
                    ) from None
                warn(f"{name}: could not start its run ({problem}); {_going_on(name, run_directory)}")
                continue
            opened.append(tracker)
            ids[name] = tracker.ids()
        trackers = cls(opened, run_directory, ids, exporting)
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
                then = (
                    f"run the same --export again to send the rest: python run.py --export {self.run_directory} "
                    f"--to {tracker.name}"
                    if self.exporting
                    else _going_on(tracker.name, self.run_directory)
                )
                in_this_run = "" if self.exporting else " in this run"
                problem = f"{type(error).__name__}: {error}"
                warn(f"{tracker.name} failed ({problem}); nothing more goes to it{in_this_run}; {then}")

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
    from src.core.tracking.metrics import read_metrics  # here: this module needs no site-packages to import

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
