"""Exact resume: kill -9 a real training process at exact points, resume it, and compare
bitwise with a run that was never interrupted."""

import pytest
import yaml
from helpers import NOISY, QUICK_RUN, assert_same_run, logged_values, run_directory

from src.core.record.checkpoint import read_checkpoint

# 100 training pairs in batches of 8: 13 steps an epoch, 39 in all; a checkpoint every 5 steps
# and at each epoch's end. Per pass, validation reads 13 batches and the rollout 8.
RUN = (*QUICK_RUN, "--epochs=3", "--checkpoint.every_n_steps=5", *NOISY)

# point: (TEMPLATE_FAULT, extra flags, the step of the newest complete checkpoint at the kill)
KILL_POINTS = {
    "mid-epoch": ("train_step:22", (), 20),  # epoch 2 (steps 14 to 26), two steps after a checkpoint
    "checkpoint-write": ("checkpoint_write:4", (), 13),  # inside writing step 15's checkpoint (5, 10, 13, 15)
    "validation": ("val:30", (), 25),  # epoch 2's validation pass (13 batches a pass, after a baseline)
    "rollout": ("rollout:21", (), 25),  # epoch 2's rollout pass (8 batches a pass, after a baseline)
    # 13 batches in groups of 3: 5 optimizer steps an epoch; the step-6 checkpoint is 3 batches into epoch 2.
    "accumulation": ("train_step:8", ("--gradient_accumulation_steps=3", "--checkpoint.every_n_steps=3"), 6),
}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_and_resumed_run_equals_an_uninterrupted_one(project, point, workers):
    fault, extra, from_step = KILL_POINTS[point]
    args = (*RUN, f"--num_workers={workers}", *extra)
    assert project.run(*args, "--run_name=reference").returncode == 0

    killed = project.run(*args, "--run_name=killed", env={"TEMPLATE_FAULT": fault})
    assert killed.returncode == -9, killed.stderr  # SIGKILL: no cleanup of any kind
    run = project.root / "logs" / "PendulumModel" / "killed"
    assert yaml.safe_load((run / "metadata.yaml").read_text())["status"] == "running"
    partial = list((run / "checkpoints").glob(".*.tmp"))
    if point == "checkpoint-write":  # the killed write left part of a file, which the resume removes
        assert [path.name for path in partial] == [".step-000000015.pt.tmp"] and partial[0].stat().st_size > 0

    resumed = project.run("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(project.root / "logs" / "PendulumModel" / "reference", run)
    assert not list((run / "checkpoints").glob(".*.tmp"))
    metadata = yaml.safe_load((run / "metadata.yaml").read_text())
    assert metadata["status"] == "finished"
    (entry,) = metadata["resumes"]
    # The newest complete checkpoint (a write in flight at the kill does not count).
    assert (entry["from_step"], entry["from_checkpoint"]) == (from_step, f"step-{from_step:09d}.pt")


def test_damaged_newest_checkpoint_falls_back_and_still_ends_equal(project):
    assert project.run(*RUN, "--run_name=reference").returncode == 0
    assert project.run(*RUN, "--run_name=killed", env={"TEMPLATE_FAULT": "train_step:22"}).returncode == -9
    run = project.root / "logs" / "PendulumModel" / "killed"
    # The two newest complete checkpoints (a write in flight at the kill has no manifest).
    previous, newest = [path.with_suffix(".pt") for path in sorted((run / "checkpoints").glob("step-*.json"))[-2:]]
    data = bytearray(newest.read_bytes())
    data[-100] ^= 0xFF
    newest.write_bytes(bytes(data))
    resumed = project.run("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipping checkpoint {newest.name}" in resumed.stderr
    assert f"from {previous.name}" in resumed.stdout
    assert_same_run(project.root / "logs" / "PendulumModel" / "reference", run)


def test_resume_at_another_commit_is_refused_naming_both(project):
    assert project.run(*RUN, "--run_name=first").returncode == 0
    recorded = project.git("rev-parse", "HEAD")
    (project.root / "src" / "model.py").write_text((project.root / "src" / "model.py").read_text() + "\n# later\n")
    head = project.commit("later")
    result = project.run("--resume", "logs/PendulumModel/first")
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert recorded[:12] in result.stderr and head[:12] in result.stderr and "git checkout" in result.stderr


def test_resume_with_a_dirty_tree_is_refused(project):
    assert project.run(*RUN, "--run_name=first").returncode == 0
    (project.root / "scratch.py").write_text("")
    result = project.run("--resume", "logs/PendulumModel/first")
    assert result.returncode == 3 and "untracked: scratch.py" in result.stderr


def test_resume_refuses_changes_that_alter_results_but_extends_epochs(project):
    assert project.run(*RUN, "--run_name=first").returncode == 0
    run = "logs/PendulumModel/first"
    result = project.run("--resume", run, "--optimizer.lr=0.1", "--batch_size=4")
    assert result.returncode == 2 and "cannot change batch_size, optimizer.lr" in result.stderr
    metrics_before = logged_values(project.root / run)

    result = project.run("--resume", run, "--epochs=4", "--description=longer")
    assert result.returncode == 0, result.stderr
    metadata = yaml.safe_load((project.root / run / "metadata.yaml").read_text())
    assert metadata["epochs_done"] == 4 and metadata["resumes"][0]["from_step"] == 39
    assert logged_values(project.root / run)[: len(metrics_before)] == metrics_before
    assert max(r[1] for r in logged_values(project.root / run)) == 4


def test_resume_needs_a_run_directory(project):
    result = project.run("--resume", "logs/nothing")
    assert result.returncode == 2 and "expected a run directory" in result.stderr


def test_disk_full_during_a_checkpoint_stops_cleanly_and_loses_nothing(project):
    result = project.run(*RUN, "--run_name=full", env={"TEMPLATE_FAULT": "checkpoint_write:3:enospc"})
    assert result.returncode == 1
    message = "error: the run stopped: No space left on device (writing checkpoint step-000000013.pt)"
    assert message in result.stderr and f"--resume {project.root / 'logs' / 'PendulumModel' / 'full'}" in result.stderr
    assert "Traceback" not in result.stderr
    run = project.root / "logs" / "PendulumModel" / "full"
    assert yaml.safe_load((run / "metadata.yaml").read_text())["status"] == "failed"
    assert [p.name for p in sorted((run / "checkpoints").glob("step-*.pt"))] == [
        "step-000000005.pt",
        "step-000000010.pt",
    ]
    assert read_checkpoint(run / "checkpoints" / "step-000000010.pt")["progress"]["global_step"] == 10
    resumed = project.run("--resume", str(run))  # space freed: carry on
    assert resumed.returncode == 0, resumed.stderr


def test_resume_refuses_a_hand_edited_config_and_changed_data(project):
    assert project.run(*RUN, "--epochs=1", "--run_name=first", env={"TEMPLATE_FAULT": "train_step:7"}).returncode == -9
    run = project.root / "logs" / "PendulumModel" / "first"
    saved = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(saved.replace("lr: 0.003", "lr: 0.1"))
    result = project.run("--resume", str(run))
    assert result.returncode == 2 and "was made with another config than the run's config.yaml" in result.stderr
    (run / "config.yaml").write_text(saved)

    trajectories = project.root / "data" / "pendulum" / "train" / "trajectories.npy"
    data = bytearray(trajectories.read_bytes())
    data[-1] ^= 0xFF
    trajectories.write_bytes(bytes(data))
    result = project.run("--resume", str(run))
    assert result.returncode == 2 and "file contents changed since it started" in result.stderr
    assert "Traceback" not in result.stderr
    metadata = yaml.safe_load((run / "metadata.yaml").read_text())
    assert (metadata["status"], metadata["resumes"]) == ("running", [])  # nothing recorded


# A run killed before its first checkpoint restarts from step 0 in the same directory.
# point: (TEMPLATE_FAULT, extra flags)
EARLY_KILL_POINTS = {
    "right after the run directory exists": ("run_directory:1", ()),
    "during the baseline evaluation": ("val:3", ()),
    "before the first checkpoint": ("train_step:3", ()),  # the first is at step 5
    "mid-epoch, before any checkpoint, with workers": ("train_step:4", ("--num_workers=2",)),
}


@pytest.mark.parametrize("point", list(EARLY_KILL_POINTS))
def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(project, point):
    fault, extra = EARLY_KILL_POINTS[point]
    args = (*RUN, *extra)
    assert project.run(*args, "--run_name=reference").returncode == 0
    killed = project.run(*args, "--run_name=killed", env={"TEMPLATE_FAULT": fault})
    assert killed.returncode == -9, killed.stderr
    run = run_directory(project, "killed")
    assert not list((run / "checkpoints").glob("step-*.json"))  # no checkpoint to resume from
    (run / ".metadata.yaml.tmp-999999").write_text("")  # what a process killed while writing leaves
    resumed = project.run("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert "from the start (no valid checkpoint)" in resumed.stdout
    assert_same_run(run_directory(project, "reference"), run)
    assert not list(run.glob(".*.tmp-*"))  # leftovers of the killed process are removed


def test_auto_resume_makes_a_job_script_safe_to_resubmit(project):
    job = (*RUN, "--run_name=job", "--auto-resume")
    assert project.run(*RUN, "--run_name=reference").returncode == 0
    killed = project.run(*job, env={"TEMPLATE_FAULT": "train_step:22"})
    assert killed.returncode == -9, killed.stderr

    again = project.run(*job)  # the same command, re-submitted
    assert again.returncode == 0, again.stderr
    assert "continuing it" in again.stdout
    run, reference = run_directory(project, "job"), run_directory(project, "reference")
    assert_same_run(reference, run)
    (entry,) = yaml.safe_load((run / "metadata.yaml").read_text())["resumes"]
    assert entry["from_step"] == 20

    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    done = project.run(*job)
    assert done.returncode == 0 and "finished already" in done.stdout, done.stderr
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before

    other_config = project.run(*job, "--optimizer.lr=0.1")
    assert other_config.returncode == 3 and "optimizer.lr" in other_config.stderr, other_config.stderr
    (project.root / "notes.txt").write_text("a later commit\n")
    project.commit("later")
    other_commit = project.run(*job)
    assert other_commit.returncode == 3 and "commit" in other_commit.stderr, other_commit.stderr
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before
    assert [path.name for path in project.run_directories()] == ["job", "reference"]  # never forked

    unnamed = project.run(*RUN, "--auto-resume")
    assert unnamed.returncode == 2 and "run_name" in unnamed.stderr
