"""--reproduce: re-make a logged run at its recorded commit, and compare."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import yaml
from helpers import QUICK_RUN

RUN = (*QUICK_RUN, "--epochs=2")
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
    assert "up to step 26 of the original's 26: identical (bitwise)" in result.stdout
    assert "parameters at step 26: identical (bitwise)" in result.stdout
    (reproduction,) = (project.root / ORIGINAL / "reproductions").iterdir()
    config = yaml.safe_load((reproduction / "config.yaml").read_text())
    assert config["git"]["commit"] != project.git("rev-parse", "HEAD")  # it ran the original's commit
    assert json.loads((reproduction / "comparison.json").read_text())["identical"] is True
    assert len(worktrees(project)) == 1  # the temporary worktree is gone


def test_a_quick_check_of_the_first_epoch_keeps_the_schedule_and_says_it_is_partial(project):
    assert project.run(*RUN, "--run_name=original", "--scheduler.type=cosine").returncode == 0
    result = project.run("--reproduce", ORIGINAL, "--epochs=1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to step 13 of the original's 26: identical over the first 1 epoch(s) (the original ran 2)" in (
        result.stdout
    )
    assert "26: identical (bitwise)" not in result.stdout  # never plainly identical
    assert "parameters at step 13: identical" in result.stdout
    (reproduction,) = (project.root / ORIGINAL / "reproductions").iterdir()
    comparison = json.loads((reproduction / "comparison.json").read_text())
    assert comparison["complete"] is False and comparison["compared_up_to_step"] == 13


def test_a_run_extended_by_resume_is_reproduced_to_its_last_epoch(project):
    assert project.run(*RUN, "--run_name=original", "--scheduler.type=cosine").returncode == 0
    assert project.run("--resume", ORIGINAL, "--epochs=3").returncode == 0  # config.yaml still says 2
    assert yaml.safe_load((project.root / ORIGINAL / "config.yaml").read_text())["epochs"] == 2

    result = project.run("--reproduce", ORIGINAL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "extended to 3 epochs" in result.stdout
    assert "up to step 39 of the original's 39: identical (bitwise)" in result.stdout
    assert "parameters at step 39: identical (bitwise)" in result.stdout
    (reproduction,) = (project.root / ORIGINAL / "reproductions").iterdir()
    assert yaml.safe_load((reproduction / "config.yaml").read_text())["epochs"] == 3
    assert json.loads((reproduction / "comparison.json").read_text())["complete"] is True


def test_a_run_started_by_torchrun_is_reproduced_with_as_many_processes(project):
    original = project.torchrun(*RUN, "--run_name=original")
    assert original.returncode == 0, original.stdout + original.stderr
    config = yaml.safe_load((project.root / ORIGINAL / "config.yaml").read_text())
    assert config["environment"]["world_size"] == 2 and config["distributed"]["nproc_per_node"] == 1

    result = project.run("--reproduce", ORIGINAL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the original ran 2 processes: starting 2" in result.stdout
    assert "identical (bitwise)" in result.stdout and "world size" not in result.stdout
    (reproduction,) = (project.root / ORIGINAL / "reproductions").iterdir()
    assert yaml.safe_load((reproduction / "config.yaml").read_text())["environment"]["world_size"] == 2


def test_a_different_environment_and_world_size_are_named(project):
    assert project.run(*RUN, "--run_name=original").returncode == 0
    config_file, packages_file = project.root / ORIGINAL / "config.yaml", project.root / ORIGINAL / "packages.txt"
    config = yaml.safe_load(config_file.read_text())
    config["environment"] |= {"torch": "1.0.0", "world_size": 2}
    config_file.write_text(yaml.safe_dump(config))
    packages = [line for line in packages_file.read_text().splitlines() if not line.startswith("numpy==")]
    packages_file.write_text("\n".join([*packages, "numpy==0.0.1"]) + "\n")

    result = project.run("--reproduce", ORIGINAL, "--distributed.nproc_per_node=1")  # one process, as asked
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: torch: 1.0.0 when recorded" in result.stdout
    assert "warning: installed packages differ: numpy" in result.stdout
    assert (
        "warning: world size: the original ran 2 process(es), the reproduction 1; "
        "the results are not expected to be bitwise equal"
    ) in result.stdout
    (reproduction,) = (project.root / ORIGINAL / "reproductions").iterdir()
    warnings = json.loads((reproduction / "comparison.json").read_text())["environment_warnings"]
    assert any(warning.startswith("world size") for warning in warnings)


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


def test_the_environment_is_compared_with_the_reproductions_not_this_process(project):
    """A run with torch_threads: 1 records 1 thread; so does its reproduction. The parent
    process of --reproduce has torch's default (one per core): no warning about it."""
    assert project.run(*RUN, "--torch_threads=1", "--run_name=original").returncode == 0
    assert yaml.safe_load((project.root / ORIGINAL / "config.yaml").read_text())["environment"]["torch_threads"] == 1
    result = project.run("--reproduce", ORIGINAL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical (bitwise)" in result.stdout
    assert "torch_threads" not in result.stdout + result.stderr


def test_a_run_extended_with_max_steps_is_reproduced_to_its_recorded_step(project):
    assert project.run(*RUN, "--run_name=original", "--max_steps=10", "--scheduler.type=cosine").returncode == 0
    assert project.run("--resume", ORIGINAL, "--max_steps=20").returncode == 0  # config.yaml still says 10
    assert yaml.safe_load((project.root / ORIGINAL / "config.yaml").read_text())["max_steps"] == 10

    result = project.run("--reproduce", ORIGINAL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "extended to step 20" in result.stdout
    assert "of the original's 20: identical (bitwise)" in result.stdout
    assert "parameters at step 20: identical (bitwise)" in result.stdout
