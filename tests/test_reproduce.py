"""--reproduce: re-make a logged run at its recorded commit, and compare."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import yaml

RUN = ("sample_runconfig.yaml", "--mini", "--cpu", "--epochs=2", "--batch_size=8", "--log_every_n_steps=2")
ORIGINAL = "logs/PendulumModel/original"


def worktrees(project) -> list[str]:
    return [line for line in project.git("worktree", "list", "--porcelain").splitlines() if line.startswith("worktree")]


def test_reproduction_at_the_recorded_commit_is_identical_despite_later_commits(project):
    assert project.run(*RUN, "--run_name=original").returncode == 0
    model = project.root / "src" / "model.py"
    model.write_text(model.read_text().replace("state + 0.1 * self.net(state)", "state + 0.2 * self.net(state)"))
    project.commit("a change that alters training")

    result = project.run("--reproduce", ORIGINAL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical (bitwise)" in result.stdout and "parameters at step 26: identical (bitwise)" in result.stdout
    (reproduction,) = (project.root / ORIGINAL / "reproductions").iterdir()
    config = yaml.safe_load((reproduction / "config.yaml").read_text())
    assert config["git"]["commit"] != project.git("rev-parse", "HEAD")  # it ran the original's commit
    assert json.loads((reproduction / "comparison.json").read_text())["identical"] is True
    assert len(worktrees(project)) == 1  # the temporary worktree is gone


def test_a_quick_check_of_the_first_epoch_keeps_the_schedule(project):
    assert project.run(*RUN, "--run_name=original", "--scheduler.type=cosine").returncode == 0
    result = project.run("--reproduce", ORIGINAL, "--epochs=1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical (bitwise)" in result.stdout and "parameters at step 13: identical" in result.stdout


def test_changed_data_is_reported_with_the_first_differing_step(project):
    assert project.run(*RUN, "--run_name=original").returncode == 0
    data = project.root / "data" / "pendulum" / "train" / "trajectories.npy"
    trajectories = np.load(data)
    trajectories[:, :, 1] *= 1.01  # same file size, other numbers
    np.save(data, trajectories)
    result = project.run("--reproduce", ORIGINAL)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "they differ" in result.stdout
    assert "train/loss: " in result.stdout and "first at step 2" in result.stdout
    assert "warning: data: file contents" in result.stdout and "changed (same names and sizes)" in result.stdout


def test_an_override_is_a_what_if_and_shows_where_the_runs_part(project):
    assert project.run(*RUN, "--run_name=original").returncode == 0
    result = project.run("--reproduce", ORIGINAL, "--optimizer.lr=0.002")
    assert result.returncode == 4 and "train/loss: " in result.stdout and "first at step 2" in result.stdout


def test_a_commit_missing_from_the_repository_is_refused(project):
    assert project.run(*RUN, "--run_name=original").returncode == 0
    config_file = project.root / ORIGINAL / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["git"]["commit"] = "0123456789abcdef0123456789abcdef01234567"
    config_file.write_text(yaml.safe_dump(config))
    result = project.run("--reproduce", ORIGINAL)
    assert result.returncode == 3 and "is not in this repository" in result.stderr and "git fetch" in result.stderr


def test_the_worktree_is_removed_after_ctrl_c(project):
    assert project.run(*RUN, "--run_name=original").returncode == 0
    config = yaml.safe_load((project.root / ORIGINAL / "config.yaml").read_text())
    process = subprocess.Popen(
        [sys.executable, "run.py", "--reproduce", ORIGINAL, "--epochs=500"],
        cwd=project.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while len(worktrees(project)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(3)  # the reproduction is training
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    process.wait(timeout=60)
    assert len(worktrees(project)) == 1
    assert config["git"]["commit"] == project.git("rev-parse", "HEAD")
