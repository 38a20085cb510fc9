"""The quick check for a fork (`make check`): your config, on your model and data, through all
three phases, killed mid-run and resumed: bitwise the same as a run never interrupted.

`make check CONFIG=my_config.yaml` checks your own config (default: sample_runconfig.yaml).
"""

import os
import shutil
import subprocess
import sys

import pytest
from helpers import assert_same_run

CONFIG = os.environ.get("CHECK_CONFIG", "sample_runconfig.yaml")
# A few steps of a small subset: --mini, batches of 16, a checkpoint every 2 steps, a
# baseline evaluation and both evaluation phases every epoch.
SHORT = (
    CONFIG,
    "--mini",
    "--cpu",
    "--epochs=2",
    "--batch_size=16",
    "--log_every_n_steps=1",
    "--checkpoint.every_n_steps=2",
    "--rollout.every_n_epochs=1",
    "--evaluate_before_training=true",
)


@pytest.mark.check
def test_your_config_trains_through_every_phase_and_resumes_exactly(project):
    reference = project.run(*SHORT, "--run_name=reference")
    assert reference.returncode == 0, reference.stderr
    killed = project.run(*SHORT, "--run_name=killed", env={"TEMPLATE_FAULT": "train_step:5"})
    assert killed.returncode == -9, killed.stderr  # killed after step 5, a checkpoint at step 4
    run = project.root / "logs"
    (reference_run,) = run.glob("*/reference")
    (killed_run,) = run.glob("*/killed")
    resumed = project.run("--resume", str(killed_run))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(reference_run, killed_run)


@pytest.mark.slow
def test_make_check_runs_on_a_forks_own_data(project):
    """A fork whose config names its own data directory (under data/, which git ignores) passes
    the check: the check's test project gets that data beside the example's."""
    shutil.copytree(project.root / "data" / "pendulum", project.root / "data" / "my-data")
    project.write_config("mine.yaml", data_directory="data/my-data", description="a fork's own data")
    project.commit("a fork with its own data")
    checked = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "check", "tests/test_fork_check.py"],
        cwd=project.root,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CHECK_CONFIG": "mine.yaml"},
    )
    assert checked.returncode == 0, checked.stdout[-3000:]
    assert "1 passed" in checked.stdout
