"""--runs: the table of logged runs; --note: the summary a user writes after analysis."""

import csv
import io
import subprocess
import sys
import time

import yaml

from src.core.commands.runs import COLUMNS, filter_rows

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


def test_runs_on_a_fresh_clone_prints_an_empty_table(project):
    assert not (project.root / "logs").exists()
    result = project.run("--runs")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[: len(COLUMNS)] == list(COLUMNS) and "0 row(s)" in result.stdout
    assert table(project) == []  # --csv: the header alone
    assert not (project.root / "logs").exists()  # listing creates nothing
    missing = project.run("--runs", "no/such/dir")  # a directory named by the user must exist
    assert missing.returncode == 2 and "no such directory" in missing.stderr


def test_note_sets_the_summary_and_keeps_the_rest(project):
    assert project.run(*RUN, "--run_name=done").returncode == 0
    run = project.root / "logs" / "PendulumModel" / "done"
    before = yaml.safe_load((run / "metadata.yaml").read_text())
    result = project.run("--note", str(run), "rollout error flat after epoch 1: try a smaller lr")
    assert result.returncode == 0
    after = yaml.safe_load((run / "metadata.yaml").read_text())
    assert after == {**before, "summary": "rollout error flat after epoch 1: try a smaller lr"}
    missing = project.run("--note", "logs/nowhere", "x")
    assert missing.returncode == 2 and "expected a run directory" in missing.stderr


def fake_run(project, name: str, commit: str, recorded_on_remote: bool | None) -> None:
    """A run directory as --runs reads it, without training one."""
    run = project.root / "logs" / "PendulumModel" / name
    run.mkdir(parents=True)
    git = {"commit": commit, "commit_on_remote": recorded_on_remote}
    (run / "config.yaml").write_text(yaml.safe_dump({"description": name, "epochs": 1, "git": git}))
    (run / "metadata.yaml").write_text(yaml.safe_dump({"status": "finished", "started": name, "epochs_done": 1}))


def test_the_no_remote_mark_is_checked_when_listing_not_when_the_run_started(project, tmp_path):
    head = project.git("rev-parse", "HEAD")
    fake_run(project, "a-head", head, recorded_on_remote=False)
    fake_run(project, "b-unknown-pushed", "0123456789abcdef0123456789abcdef01234567", recorded_on_remote=True)
    fake_run(project, "c-unknown", "fedcba9876543210fedcba9876543210fedcba98", recorded_on_remote=False)

    def marks() -> dict[str, str]:
        return {row["run"].split("/")[1]: row["commit"] for row in table(project)}

    assert marks() == {"a-head": head[:10] + "*", "b-unknown-pushed": "0123456789", "c-unknown": "fedcba9876*"}

    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "remote.git")], check=True)
    project.git("remote", "add", "origin", str(tmp_path / "remote.git"))
    project.git("push", "-q", "origin", "HEAD:refs/heads/main")
    project.git("fetch", "-q", "origin")
    # pushed since: no mark; commits git does not know keep what was recorded
    assert marks() == {"a-head": head[:10], "b-unknown-pushed": "0123456789", "c-unknown": "fedcba9876*"}


def test_filter_and_status_apply_to_sweep_member_rows_too():
    runs = [
        {"run": "P/sgd", "status": "finished (resumed 1x)", "description": "Pendulum baseline"},
        {"run": "P/big", "status": "crashed", "description": "wider model"},
    ]
    members = [
        {"member": "0-lr=1e-3", "status": "finished", "val/loss": 0.1},
        {"member": "1-lr=3e-4", "status": "not started"},
        {"member": "2-lr=1e-4", "status": "running"},
    ]
    assert filter_rows(runs, "PENDULUM") == runs[:1]
    assert filter_rows(runs, status="finished") == runs[:1]  # "(resumed 1x)" aside
    assert filter_rows(runs, "sgd", "crashed") == []
    assert filter_rows(members, "lr=3e-4") == members[1:2]
    assert filter_rows(members, status="not started") == members[1:2]
    assert filter_rows(members, status="finished") == members[:1]
    assert filter_rows(members) == members
