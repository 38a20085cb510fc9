"""The quick check for a fork (`make check`): your config, on your model and data, through all
three phases, killed mid-run and resumed: bitwise the same as a run never interrupted.

`make check CONFIG=my_config.yaml` checks your own config (default: sample_runconfig.yaml).
"""

import os

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
