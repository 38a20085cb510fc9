"""--evaluate RUN_DIR: the validation and rollout phases on saved checkpoints, after the fact."""

import csv
import hashlib
import json
import subprocess
import sys
import time

import numpy as np
import yaml

from src.core.tracking.metrics import read_metrics

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
    assert set(rows[0]) == {"evaluation", "checkpoint", "step", "epoch", "val/loss", *rollout_metrics}  # + model's
    assert {row["evaluation"] for row in rows} == {"default"}

    logged = {(r["step"], f"{r['phase']}/{r['name']}"): r["value"] for r in read_metrics(run)}
    for row in rows:
        if int(row["step"]) in (13, 26, 39):  # epoch ends: training evaluated these very weights
            for metric in ("val/loss", *rollout_metrics):
                assert float(row[metric]) == logged[(int(row["step"]), metric)]

    details = json.loads((run / "evaluation" / "default" / "step-000000013.json").read_text())
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


def batches_seen(run, name: str, checkpoint: str, phase: str) -> int:
    details = json.loads((run / "evaluation" / name / f"{checkpoint}.json").read_text())
    return sum(batch["samples"] for batch in details["batches"][phase])


def test_named_evaluations_on_other_data_merge_into_one_table(project):
    # Milestones at every epoch's end survive keep_recent=1: a finished run has a history.
    run_args = (*RUN[:-2], "--checkpoint.keep_recent=1", "--checkpoint.keep_every_n_epochs=1", RUN[-1])
    assert project.run(*run_args).returncode == 0
    run = project.root / RUN_DIR
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.pt")) == [
        "step-000000013.pt",
        "step-000000026.pt",
        "step-000000039.pt",
    ]
    other_data = project.root / "data" / "other"  # another benchmark: here a copy with half the trajectories
    for split in ("train", "test"):
        (other_data / split).mkdir(parents=True)
    for name in (project.root / "data" / "pendulum" / "train").iterdir():
        (other_data / "train" / name.name).write_bytes(name.read_bytes())
    test_set = np.load(project.root / "data" / "pendulum" / "test" / "trajectories.npy")
    np.save(other_data / "test" / "trajectories.npy", test_set[: len(test_set) // 2])

    first = project.run("--evaluate", RUN_DIR, "--cpu")
    assert first.returncode == 0, first.stderr
    first_rows = read_rows(run)
    second = project.run(
        "--evaluate", RUN_DIR, "--name", "other-half", "--subset", "0.5", "--data_directory=data/other",
        "--rollout.max_samples=1000", "--save-outputs", "--cpu",
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    rows = read_rows(run)
    assert rows[: len(first_rows)] == [{**row, **{k: "" for k in rows[0] if k not in row}} for row in first_rows]
    names = [(row["evaluation"], row["checkpoint"]) for row in rows]
    checkpoints = ["step-000000013.pt", "step-000000026.pt", "step-000000039.pt"]
    assert names == [("default", c) for c in checkpoints] + [("other-half", c) for c in checkpoints]
    other = {row["checkpoint"]: row for row in rows if row["evaluation"] == "other-half"}
    default = {row["checkpoint"]: row for row in rows if row["evaluation"] == "default"}
    assert other["step-000000039.pt"]["val/loss"] != default["step-000000039.pt"]["val/loss"]

    # The subset is the first half of the (other) data: 100 mini pairs -> 50; 32 trajectories -> 16.
    assert batches_seen(run, "default", "step-000000039", "val") == 100
    assert batches_seen(run, "other-half", "step-000000039", "val") == 50
    assert batches_seen(run, "default", "step-000000039", "rollout") == 64
    assert batches_seen(run, "other-half", "step-000000039", "rollout") == 16
    recorded = yaml.safe_load((run / "evaluation" / "other-half" / "config.yaml").read_text())
    assert recorded["data_directory"] == "data/other" and recorded["evaluation"]["subset"] == 0.5
    assert recorded["git"]["commit"] == project.git("rev-parse", "HEAD")
    assert recorded["data_fingerprint"]["content_sha256"]
    assert recorded["flags"]["overrides"]["data_directory"] == "data/other"

    # Saved outputs load with numpy alone, one row per evaluated sample.
    outputs = run / "evaluation" / "other-half" / "step-000000039.outputs.npz"
    script = (
        "import sys, numpy; f = numpy.load(sys.argv[1]); assert 'torch' not in sys.modules; "
        "print(sorted(f.files), f['val/prediction'].shape[0], f['rollout/target'].shape[0])"
    )
    loaded = project.python("-c", script, str(outputs))
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split("] ")[1].split() == ["50", "16"]
    assert "'rollout/prediction'" in loaded.stdout and "'val/target'" in loaded.stdout
    assert not list((run / "evaluation" / "default").glob("*.npz"))  # only when asked

    # Re-evaluating one (name, checkpoint) replaces that row; nothing else is dropped.
    again = project.run("--evaluate", RUN_DIR, "--checkpoints", "39", "--cpu")
    assert again.returncode == 0, again.stderr
    assert [(row["evaluation"], row["checkpoint"]) for row in read_rows(run)] == names

    # A name stands for one set of settings; a key that changes the trained model is refused.
    clash = project.run("--evaluate", RUN_DIR, "--name", "other-half", "--cpu")
    assert clash.returncode == 2 and "data_directory" in clash.stderr and "subset" in clash.stderr
    refused = project.run("--evaluate", RUN_DIR, "--name", "x", "--optimizer.lr=0.1")
    assert refused.returncode == 2 and "optimizer.lr" in refused.stderr and "eval_batch_size" in refused.stderr
    assert "Traceback" not in refused.stderr + clash.stderr
    assert [(row["evaluation"], row["checkpoint"]) for row in read_rows(run)] == names


def test_evaluation_flags_are_checked(project):
    for flags, message in (
        (("--subset", "0"), "0 < F <= 1"),
        (("--subset", "1.5"), "0 < F <= 1"),
        (("--name", "../x"), "--name '../x'"),
        (("--save-outputs", "--no-logging"), "--save-outputs"),
    ):
        result = project.run("--evaluate", RUN_DIR, *flags)
        assert result.returncode == 2 and message in result.stderr, (flags, result.stderr)
    result = project.run(*RUN, "--subset", "0.5")
    assert result.returncode == 2 and "--subset does nothing" in result.stderr
