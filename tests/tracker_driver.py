"""A stand-in for the Trainer's logging, for tests/test_trackers.py: logs steps FIRST..LAST
to metrics.jsonl (the real MetricLogger) and to the trackers, checkpoints at CHECKPOINT
(recording what metrics.jsonl covers), and then, by MODE:

  figure          also saves and logs a figure at the last step, then closes
  kill            hands everything to the trackers, then SIGKILLs itself (no close)
  kill-unflushed  SIGKILLs itself without handing anything over
  resume          continues from the recorded checkpoint, as `--resume` does, then closes
  break           breaks a tracker halfway as $BREAK names, then closes:
                  replace-with-file:PATH (a store replaced by a file), kill-wandb-service

python tests/tracker_driver.py RUN_DIR TRACKERS FIRST LAST CHECKPOINT MODE  (config: $DRIVER_CONFIG)
"""

import io
import json
import os
import shutil
import signal
import sys
from pathlib import Path

from src.core.record.rundir import read_yaml, update_metadata
from src.core.tracking.metrics import MetricLogger
from src.core.tracking.trackers import Trackers

run_directory, names = Path(sys.argv[1]), sys.argv[2].split(",")
first, last, checkpoint, mode = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
config = json.loads(os.environ["DRIVER_CONFIG"])
provenance = {"git": {"commit": "0123456789abcdef0123456789abcdef01234567", "branch": "main"}}
saved = run_directory / "driver-checkpoint.json"

if mode == "resume":
    state = json.loads(saved.read_text())
    logger = MetricLogger(run_directory, resume_from_byte=state["bytes"], resume_step=state["step"])
    resume = read_yaml(run_directory / "metadata.yaml")["trackers"]
else:
    run_directory.mkdir(parents=True)
    logger, resume = MetricLogger(run_directory), None
trackers = Trackers.open(names, run_directory, config, provenance, resume)
update_metadata(run_directory, trackers=trackers.ids())
if mode != "resume":
    (run_directory / "driver-first-ids.json").write_text(json.dumps(trackers.ids()))


def break_tracker(how: str) -> None:
    """Make a tracker fail mid-run, as $BREAK names it (empty: nothing more breaks)."""
    if not how:
        return
    if how.startswith("replace-with-file:"):  # chmod does not stop root: replace the store by a file
        store = how.partition(":")[2]
        shutil.rmtree(store)
        open(store, "w").close()
    elif how == "kill-wandb-service":  # only this process's own W&B service
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
            except (OSError, ValueError):
                continue
            if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and "wandb-core" in stat:
                os.kill(int(entry.name), signal.SIGKILL)
    else:
        raise ValueError(f"BREAK={how!r}: expected replace-with-file:PATH or kill-wandb-service")


for step in range(first, last + 1):
    values = {"loss": 1.0 / (step + 1), "lr": step * 1e-3}
    logger.log(step, 1, "train", values)
    trackers.log_metrics(step, {f"train/{key}": value for key, value in values.items()})
    if step == checkpoint:
        saved.write_text(json.dumps({"bytes": logger.flush(), "step": step}))
        if mode != "kill-unflushed":
            trackers.flush()
    if mode == "break" and step == (first + last) // 2:
        trackers.flush()
        break_tracker(os.environ.get("BREAK", ""))

if mode == "figure":
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (16, 12), (10, 120, 200)).save(png, format="PNG")
    (run_directory / "figures" / "rollout").mkdir(parents=True)
    (run_directory / "figures" / "rollout" / f"{last:09d}-trajectory.png").write_bytes(png.getvalue())
    trackers.log_image(last, "rollout/trajectory", png.getvalue())
if mode.startswith("kill"):
    logger.flush()
    if mode == "kill":
        trackers.flush()
    os.kill(os.getpid(), signal.SIGKILL)
logger.close()
trackers.close("finished")
print("done")
