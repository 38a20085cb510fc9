"""--runs: the table of logged runs; --note: the summary a user writes after analysis."""

import csv
import io
import subprocess
import sys
import time

import yaml

RUN = ("sample_runconfig.yaml", "--mini", "--cpu", "--epochs=2", "--batch_size=8", "--checkpoint.every_n_steps=5")


def table(project, *args) -> list[dict]:
    result = project.run("--runs", *args, "--csv")
    assert result.returncode == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


def test_runs_table_shows_finished_failed_running_crashed_and_resumed_runs(project):
    assert project.run(*RUN, "--run_name=done", "--description=a finished run").returncode == 0
    failed = project.run(*RUN, "--run_name=broken", env={"TEMPLATE_FAULT": "checkpoint_write:1:enospc"})
    assert failed.returncode == 1
    killed = project.run(*RUN, "--run_name=resumed", env={"TEMPLATE_FAULT": "train_step:12"})
    assert killed.returncode == -9
    assert project.run("--resume", "logs/PendulumModel/resumed").returncode == 0
    assert project.run(*RUN, "--run_name=killed", env={"TEMPLATE_FAULT": "train_step:12"}).returncode == -9

    long_run = subprocess.Popen(
        [sys.executable, "run.py", *RUN, "--epochs=2000", "--run_name=live"],
        cwd=project.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        live = project.root / "logs" / "PendulumModel" / "live" / "metadata.yaml"
        deadline = time.monotonic() + 60
        while not live.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        rows = {row["run"]: row for row in table(project)}
    finally:
        long_run.kill()
        long_run.wait()

    assert list(rows) == [f"PendulumModel/{name}" for name in ("live", "killed", "resumed", "broken", "done")]
    statuses = {run.split("/")[1]: row["status"] for run, row in rows.items()}
    assert statuses == {
        "live": "running",
        "killed": "crashed",  # its metadata says running, but no process holds the run's lock
        "resumed": "finished (resumed 1x)",
        "broken": "failed",
        "done": "finished",
    }
    done = rows["PendulumModel/done"]
    assert done["description"] == "a finished run" and done["epochs"] == "2/2"
    assert done["commit"] == project.git("rev-parse", "HEAD")[:10] + "*"  # no remote holds it
    assert done["best"].startswith("rollout/loss=")

    assert [row["run"] for row in table(project, "--status", "failed")] == ["PendulumModel/broken"]
    assert [row["run"] for row in table(project, "--filter", "FINISHED RUN")] == ["PendulumModel/done"]
    readable = project.run("--runs")
    assert readable.returncode == 0 and "5 row(s)" in readable.stdout and "crashed" in readable.stdout


def test_note_sets_the_summary_and_keeps_the_rest(project):
    assert project.run(*RUN, "--run_name=done").returncode == 0
    run = project.root / "logs" / "PendulumModel" / "done"
    before = yaml.safe_load((run / "metadata.yaml").read_text())
    result = project.run("--note", str(run), "rollout error flat after epoch 1: try a smaller lr")
    assert result.returncode == 0
    after = yaml.safe_load((run / "metadata.yaml").read_text())
    assert after == {**before, "summary": "rollout error flat after epoch 1: try a smaller lr"}
    missing = project.run("--note", "logs/nowhere", "x")
    assert missing.returncode == 2 and "no metadata.yaml there" in missing.stderr
