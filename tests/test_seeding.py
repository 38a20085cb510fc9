"""Seeding and how torch computes: DataLoader workers die with their training process, even
one killed by `kill -9`; the `torch_threads` key."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import DELETE, MINIMAL

from src.core.config.loader import parse_yaml
from src.core.config.schema import project_schema
from src.core.config.validation import config_hash, finalize
from src.core.errors import UserError
from src.core.seeding import apply_torch_threads

SCHEMA = project_schema()


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


@pytest.mark.parametrize(("value", "expected"), [("0", "min value is 1"), ("two", "must be of integer type")])
def test_torch_threads_must_be_a_positive_integer(value, expected):
    with pytest.raises(UserError) as caught:
        finalize(parse_yaml(MINIMAL + f"torch_threads: {value}\n", "x"), SCHEMA)
    assert "torch_threads" in str(caught.value) and expected in str(caught.value)


def test_torch_threads_defaults_to_torchs_choice_and_counts_as_affecting_results():
    """Another thread count sums in another order (torch.sum of 4M floats differs in its last
    bits between 1 and 2 threads), so a resume may not change it."""
    default = finalize(parse_yaml(MINIMAL, "x"), SCHEMA)
    one = finalize(parse_yaml(MINIMAL + "torch_threads: 1\n", "x"), SCHEMA)
    assert default.torch_threads is None and one.torch_threads == 1
    assert config_hash(default, SCHEMA) != config_hash(one, SCHEMA)


def test_apply_torch_threads_sets_them_and_none_leaves_them():
    before = torch.get_num_threads()
    try:
        apply_torch_threads(None)
        assert torch.get_num_threads() == before
        apply_torch_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
