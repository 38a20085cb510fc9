"""A run's end, however it comes: here, a disk that fills up mid-run (a real, small tmpfs)."""

import subprocess

import pytest
import yaml
from helpers import QUICK_RUN


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB tmpfs: a few hundred KiB of logs and checkpoints fill it (mounting needs root)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_stops_the_run_with_one_message_and_records_it(project, small_disk):
    figures = "--rollout.figures=true"  # the figures fill the disk
    result = project.run(*QUICK_RUN, "--epochs=3", figures, "--log-dir", str(small_disk), "--run_name=full")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Exception in thread" not in result.stderr
    (line,) = result.stderr.strip().splitlines()  # one message
    run = small_disk / "PendulumModel" / "full"
    assert line.startswith("error: the run stopped: No space left on device") and f"--resume {run}" in line
    metadata = yaml.safe_load((run / "metadata.yaml").read_text())
    assert metadata["status"] == "failed" and "No space left on device" in metadata["error"]
    assert not list(run.glob(".*.tmp-*"))  # nothing half-written left behind

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    resumed = project.run("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert yaml.safe_load((run / "metadata.yaml").read_text())["status"] == "finished"
