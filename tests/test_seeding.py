"""DataLoader workers die with their training process, even one killed by `kill -9`."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import DELETE

# A dataset as slow as one on a busy network filesystem: a worker is always inside
# __getitem__, where torch's own parent check (every 5 s, between batches) never runs.
SLOW_DATASET = """

import time


class SlowPendulumSteps(PendulumSteps):
    def __getitem__(self, index):
        time.sleep(0.5)
        return super().__getitem__(index)
"""


def children(pid: int) -> list[int]:
    """The processes `pid` started that run its own program (forked DataLoader workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    command = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [child for child in found if running(child) and Path(f"/proc/{child}/cmdline").read_bytes() == command]


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever adopts it to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_dataloader_workers_do_not_outlive_a_killed_training_process(project):
    with open(project.root / "src" / "data_loader.py", "a") as source:
        source.write(SLOW_DATASET)
    config = project.write_config(
        "slow.yaml",
        train_data_loader_type="SlowPendulumSteps",
        test_data_loader_type=DELETE,
        eval_data_loader_type=DELETE,
        evaluate_before_training=False,
        epochs=1,
    )
    project.commit("a slow dataset")
    process = subprocess.Popen(
        [sys.executable, "run.py", config, "--num_workers=2"],
        cwd=project.root,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            workers = children(process.pid)
        assert len(workers) == 2, f"no two DataLoader workers appeared: {process.stderr.read().decode()[-2000:]}"
        process.send_signal(signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 5
        while any(map(running, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if running(pid)], "DataLoader workers still alive 5 s after kill -9"
    finally:
        process.kill()
        process.wait()
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        process.stderr.close()
