"""Sweeps on a real single-node Slurm cluster on localhost (tests/slurm/start_cluster.sh)."""

import csv
import io
import os
import shutil
import subprocess
import time

import pytest
import yaml
from helpers import REPO, assert_same_run

pytestmark = pytest.mark.slurm

LIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "COMPLETED"}  # a task's states, in order


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if shutil.which("sbatch") is None or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must install slurm-wlm and munge and run as root (see .ci/run)")
        pytest.skip("needs Debian's slurm-wlm and munge, as root (see .ci/run)")
    started = subprocess.run(
        ["bash", str(REPO / "tests" / "slurm" / "start_cluster.sh")], capture_output=True, text=True
    )
    assert started.returncode == 0, started.stdout + started.stderr


def wait_for_job(job: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not subprocess.run(["squeue", "-h", "-r", "-j", job], capture_output=True, text=True).stdout.strip():
            return
        time.sleep(1)
    raise AssertionError(f"job {job} did not finish in {timeout} s")


def submit_sweep(project, *args, **sweep) -> tuple[str, object]:
    config = yaml.safe_load((project.root / "sample_runconfig.yaml").read_text())
    config.update(epochs=2, batch_size=8, sweep=sweep, slurm={"time": "00:20:00", "cpus_per_task": 1, "parallel": 2})
    (project.root / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    project.commit("a sweep")
    result = project.run("sweep.yaml", "--mini", "--cpu", "--slurm", "--submit", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    job = result.stdout.split("submitted job ")[1].split()[0]
    (sweep_directory,) = (project.root / "logs" / "PendulumModel").glob("sweep-*")
    return job, sweep_directory


def test_submitted_sweep_runs_its_commit_although_the_tree_moves_on(project):
    job, sweep = submit_sweep(project, **{"optimizer.lr": [1.0e-3, 3.0e-4], "model_parameters.hidden_size": [16, 32]})
    submitted = project.git("rev-parse", "HEAD")  # the commit holding sweep.yaml
    model = project.root / "src" / "model.py"
    model.write_text(model.read_text().replace("0.1 * self.net(state)", "0.5 * self.net(state)"))
    project.commit("changed right after submission")

    script = (sweep / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --time=00:20:00" in script
    states = project.run("--runs", str(sweep), "--csv")
    assert states.returncode == 0, states.stderr
    rows = list(csv.DictReader(io.StringIO(states.stdout)))
    assert len(rows) == 4 and {row["slurm"] for row in rows} <= LIVE, rows  # squeue's, not a placeholder

    wait_for_job(job)
    expected = {
        "0-lr=1e-3,hidden_size=16": (1e-3, 16),
        "1-lr=1e-3,hidden_size=32": (1e-3, 32),
        "2-lr=3e-4,hidden_size=16": (3e-4, 16),
        "3-lr=3e-4,hidden_size=32": (3e-4, 32),
    }
    for name, (lr, hidden) in expected.items():
        run = sweep / name
        assert yaml.safe_load((run / "metadata.yaml").read_text())["status"] == "finished", (sweep / "slurm").iterdir()
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["git"]["commit"] == submitted
        assert (config["optimizer"]["lr"], config["model_parameters"]["hidden_size"]) == (lr, hidden)
        assert config["flags"]["mini"] and config["flags"]["cpu"]
    table = project.run("--runs", str(sweep), "--csv").stdout
    assert table.count(",finished,COMPLETED") == 4, table  # the tasks that ended, while Slurm remembers them
    with open(sweep / "sweep.csv") as stream:  # each task rewrote the table as it ended
        assert [row["status"] for row in csv.DictReader(stream)] == ["finished"] * 4


@pytest.mark.parametrize("processes", [1, 2])
def test_a_preempted_task_requeues_and_ends_like_an_uninterrupted_one(project, processes):
    """With 2 processes, Slurm signals the launcher (the batch shell's exec), which passes
    the warning on to its workers."""
    job, sweep = submit_sweep(
        project,
        "--requeue",
        "--epochs=20",
        f"--distributed.nproc_per_node={processes}",
        "--modify",
        "data_loader_parameters.train",
        "{input_noise: 0.01}",
        seed=[7, 7],  # two identical members: one is preempted, the other is the reference
    )
    preempted = sweep / "1-seed=7"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until task 1 is well into training
        metadata = preempted / "metadata.yaml"
        if metadata.exists() and (yaml.safe_load(metadata.read_text()).get("global_step") or 0) >= 13:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("task 1 did not start training")
    signalled = subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_1"], capture_output=True, text=True)
    assert signalled.returncode == 0, signalled.stderr
    wait_for_job(job)

    metadata = yaml.safe_load((preempted / "metadata.yaml").read_text())
    assert metadata["status"] == "finished"
    (resume,) = metadata["resumes"]
    assert resume["from_step"] > 0
    output = "".join(path.read_text() for path in (sweep / "slurm").glob(f"{job}_1.out"))
    assert "stopped for preemption" in output and f"requeued Slurm job {job}_1" in output
    if processes > 1:
        assert "SIGUSR1: passing it on to the workers" in output
        assert metadata["resumes"][0]["world_size"] == 2
    reference = yaml.safe_load((sweep / "0-seed=7" / "metadata.yaml").read_text())
    assert reference["status"] == "finished" and reference["resumes"] == []  # the requeue left task 0 alone
    assert_same_run(sweep / "0-seed=7", preempted)
    with open(sweep / "sweep.csv") as stream:
        assert [row["status"] for row in csv.DictReader(stream)] == ["finished", "finished"]


def test_a_snapshot_sweep_runs_its_snapshot_although_the_work_is_thrown_away(project):
    model = project.root / "src" / "model.py"
    model.write_text(model.read_text().replace("0.1 * self.net(state)", "0.3 * self.net(state)"))
    config = yaml.safe_load((project.root / "sample_runconfig.yaml").read_text())
    config.update(epochs=1, batch_size=8, sweep={"optimizer.lr": [1.0e-3, 3.0e-4]}, slurm={"time": "00:20:00"})
    (project.root / "wip.yaml").write_text(yaml.safe_dump(config, sort_keys=False))  # untracked: in the snapshot
    result = project.run("wip.yaml", "--mini", "--cpu", "--slurm", "--submit", "--snapshot")
    assert result.returncode == 0, result.stdout + result.stderr
    job = result.stdout.split("submitted job ")[1].split()[0]
    (sweep,) = (project.root / "logs" / "PendulumModel").glob("sweep-*")
    project.git("checkout", "--", ".")  # the work in progress is thrown away at once
    project.git("clean", "-fdq")

    wait_for_job(job)
    recorded = yaml.safe_load((sweep / "sweep.yaml").read_text())["git"]
    assert recorded["snapshot"]["files"] == ["src/model.py", "wip.yaml"]
    assert recorded["commit"] == project.git("rev-parse", f"refs/runs/PendulumModel/{sweep.name}")
    for name in ("0-lr=1e-3", "1-lr=3e-4"):
        assert yaml.safe_load((sweep / name / "metadata.yaml").read_text())["status"] == "finished"
        member = yaml.safe_load((sweep / name / "config.yaml").read_text())["git"]
        assert member["commit"] == recorded["commit"] and member["snapshot"] == recorded["snapshot"]


def test_a_search_runs_in_workers_sharing_its_study_and_a_killed_workers_trial_is_taken_over(project):
    """A 6-trial search as an array of 2 workers (each `run.py --resume SEARCH_DIR`); worker 1 is
    cancelled while its trial is in flight, and worker 0 resumes that trial from its checkpoint."""
    pytest.importorskip("optuna")
    config = yaml.safe_load((project.root / "sample_runconfig.yaml").read_text())
    config.update(epochs=5, batch_size=32, run_name="on-slurm", slurm={"time": "00:20:00", "cpus_per_task": 1})
    # A checkpoint every 2 steps, and 5 epochs: worker 1's trial has one early, and is cancelled long
    # before it ends, on a loaded machine too.
    config["checkpoint"] = {**config.get("checkpoint", {}), "every_n_steps": 2}
    config["sweep"] = {
        "search": {"trials": 6, "parallel": 2, "seed": 0, "pruner": {"type": "median", "n_startup_trials": 2}},
        "parameters": {
            "optimizer.lr": {"log_uniform": [1.0e-4, 1.0e-2]},
            "model_parameters.hidden_size": {"choice": [16, 32]},
        },
    }
    (project.root / "search.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    commit = project.commit("a search")
    result = project.run("search.yaml", "--mini", "--cpu", "--slurm", "--submit")
    assert result.returncode == 0, result.stdout + result.stderr
    job = result.stdout.split("submitted job ")[1].split()[0]
    search = project.root / "logs" / "PendulumModel" / "search-on-slurm"
    assert "#SBATCH --array=0-1\n" in (search / "search.sbatch").read_text()  # both workers at once

    deadline, orphan = time.monotonic() + 300, None
    while orphan is None and time.monotonic() < deadline:  # worker 1's first trial, once it has a checkpoint
        output = search / "slurm" / f"{job}_1.out"
        lines = output.read_text().splitlines() if output.exists() else []
        started = [line.split()[1][:-1] for line in lines if line.endswith(": started")]
        if started and (search / started[0] / "checkpoints" / "last.pt").exists():
            orphan = started[0]
        queued = subprocess.run(["squeue", "-h", "-r", "-j", f"{job}_1"], capture_output=True, text=True).stdout
        assert orphan or queued.strip() or not lines, "".join(p.read_text() for p in (search / "slurm").glob("*.out"))
        time.sleep(0.05)
    assert orphan is not None, "worker 1 started no trial"
    cancelled = subprocess.run(["scancel", f"{job}_1"], capture_output=True, text=True)
    assert cancelled.returncode == 0, cancelled.stderr
    wait_for_job(job)

    with open(search / "sweep.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 6 and {row["state"] for row in rows} <= {"complete", "pruned"}, rows
    assert len({(row["optimizer.lr"], row["model_parameters.hidden_size"]) for row in rows}) == 6  # none repeated
    worker_0 = (search / "slurm" / f"{job}_0.out").read_text()
    assert f"resuming trial {orphan}" in worker_0 and f"trial {orphan}: resumed" in worker_0, worker_0
    metadata = yaml.safe_load((search / orphan / "metadata.yaml").read_text())
    assert metadata["status"] == "finished" and metadata["resumes"][0]["from_step"] > 0
    for row in rows:
        run_config = yaml.safe_load((search / row["member"] / "config.yaml").read_text())
        assert run_config["git"]["commit"] == commit and run_config["flags"]["mini"]
    again = project.run("--resume", str(search))  # continuing a finished search: nothing to run
    assert again.returncode == 0 and "started" not in again.stdout, again.stdout + again.stderr
