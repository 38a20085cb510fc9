"""--evaluate RUN_DIR: the validation and rollout phases on saved checkpoints, after the fact."""

import csv
import hashlib
import json
import subprocess
import sys
import time

from src.core.metrics import read_metrics

RUN = (
    "sample_runconfig.yaml",
    "--mini",
    "--cpu",
    "--epochs=3",
    "--batch_size=8",
    "--checkpoint.every_n_steps=5",
    "--checkpoint.keep_recent=50",
    "--run_name=trained",
)
RUN_DIR = "logs/PendulumModel/trained"


def fingerprint(directory) -> dict:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not str(path.relative_to(directory)).startswith("evaluation")
    }


def read_rows(run) -> list[dict]:
    with open(run / "evaluation.csv") as stream:
        return list(csv.DictReader(stream))


def test_evaluation_matches_what_training_logged_and_changes_nothing(project):
    assert project.run(*RUN).returncode == 0
    run = project.root / RUN_DIR
    before = fingerprint(run)

    result = project.run("--evaluate", RUN_DIR, "--cpu")
    assert result.returncode == 0, result.stderr
    rows = read_rows(run)
    assert [int(row["step"]) for row in rows] == [5, 10, 13, 15, 20, 25, 26, 30, 35, 39]
    rollout_metrics = ("rollout/loss", "rollout/final_angle_error", "rollout/steps_before_divergence")
    assert set(rows[0]) == {"checkpoint", "step", "epoch", "val/loss", *rollout_metrics}  # the model's own too

    logged = {(r["step"], f"{r['phase']}/{r['name']}"): r["value"] for r in read_metrics(run)}
    for row in rows:
        if int(row["step"]) in (13, 26, 39):  # epoch ends: training evaluated these very weights
            for metric in ("val/loss", *rollout_metrics):
                assert float(row[metric]) == logged[(int(row["step"]), metric)]

    details = json.loads((run / "evaluation" / "step-000000013.json").read_text())
    assert details["commit"] == project.git("rev-parse", "HEAD")
    assert sum(batch["samples"] for batch in details["batches"]["rollout"]) == 64
    assert len(details["batches"]["val"]) == 13  # 100 pairs in batches of 8
    assert fingerprint(run) == before  # the training's files are untouched


def test_named_checkpoints_only(project):
    assert project.run(*RUN).returncode == 0
    result = project.run("--evaluate", RUN_DIR, "--checkpoints", "best", "last", "13")
    assert result.returncode == 0, result.stderr
    assert [row["checkpoint"] for row in read_rows(project.root / RUN_DIR)] == [
        "best.pt",
        "last.pt",
        "step-000000013.pt",
    ]
    result = project.run("--evaluate", RUN_DIR, "--checkpoints", "step-7")
    assert result.returncode == 2 and "no checkpoint 'step-7'" in result.stderr and "available:" in result.stderr


def test_evaluation_at_another_commit_is_refused_unless_nothing_is_written(project):
    assert project.run(*RUN).returncode == 0
    (project.root / "src" / "model.py").write_text((project.root / "src" / "model.py").read_text() + "\n# later\n")
    project.commit("later")
    result = project.run("--evaluate", RUN_DIR)
    assert result.returncode == 3 and "git checkout" in result.stderr
    result = project.run("--evaluate", RUN_DIR, "--no-logging", "--checkpoints", "last")
    assert result.returncode == 0 and "rollout/loss" in result.stdout
    assert not (project.root / RUN_DIR / "evaluation.csv").exists()


def test_evaluation_while_training_continues(project):
    long_run = (*RUN[:3], "--epochs=60", *RUN[4:])
    training = subprocess.Popen(
        [sys.executable, "run.py", *long_run], cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    checkpoints = project.root / RUN_DIR / "checkpoints"
    deadline = time.monotonic() + 120
    while len(list(checkpoints.glob("step-*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    result = project.run("--evaluate", RUN_DIR)
    assert result.returncode == 0, result.stderr
    assert len(read_rows(project.root / RUN_DIR)) >= 3
    _, errors = training.communicate(timeout=600)
    assert training.returncode == 0, errors
