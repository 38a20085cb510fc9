"""Branching a new run from an earlier checkpoint (--resume RUN_DIR --from-step N), and
extending or limiting a run by optimizer steps (max_steps)."""

import json

import pytest
import yaml
from helpers import NOISY, QUICK_RUN, assert_same_tensors, final_state, logged_values, run_directory

from src.core.record.checkpoint import read_checkpoint
from src.core.tracking.metrics import read_metrics

# 13 steps an epoch, 39 in all; checkpoints every 5 steps, kept at multiples of 5.
RUN = (*QUICK_RUN, "--epochs=3", "--checkpoint.every_n_steps=5", "--checkpoint.keep_every_n_steps=5", *NOISY)


def files(directory) -> dict:
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def test_branch_from_a_step_of_a_finished_run(project):
    assert project.run(*RUN, "--run_name=parent").returncode == 0
    parent = run_directory(project, "parent")
    before = files(parent)

    # Without changes, the branch continues exactly: it ends where the parent ended.
    same = project.run("--resume", str(parent), "--from-step", "20", "--run_name=same")
    assert same.returncode == 0, same.stderr
    a, b = final_state(parent), final_state(run_directory(project, "same"))
    for part in ("model", "optimizer", "progress"):
        assert_same_tensors(a[part], b[part], part)
    assert logged_values(run_directory(project, "same")) == [v for v in logged_values(parent) if v[0] > 20]

    # With a lower learning rate: a new run next to the parent, named after it.
    lower = project.run("--resume", str(parent), "--from-step", "20", "--optimizer.lr=1e-3", "--log_every_n_steps=1")
    assert lower.returncode == 0, lower.stderr
    child = run_directory(project, "parent-from-20")
    assert min(record["step"] for record in read_metrics(child)) == 21
    config = yaml.safe_load((child / "config.yaml").read_text())
    manifest = json.loads((parent / "checkpoints" / "step-000000020.json").read_text())
    assert config["parent"] == {
        "run": str(parent.resolve()),
        "step": 20,
        "checkpoint": "step-000000020.pt",
        "checkpoint_sha256": manifest["sha256"],
    }
    assert yaml.safe_load((child / "metadata.yaml").read_text())["parent"] == config["parent"]
    assert config["optimizer"]["lr"] == 1e-3 and config["flags"]["overrides"]["optimizer.lr"] == "1e-3"
    lr = {r["step"]: r["value"] for r in read_metrics(child) if (r["phase"], r["name"]) == ("train", "lr")}
    parent_lr = {r["step"]: r["value"] for r in read_metrics(parent) if (r["phase"], r["name"]) == ("train", "lr")}
    assert lr[22] == pytest.approx(parent_lr[22] / 3, rel=1e-6)  # the same schedule, a third of the rate
    last = read_checkpoint(child / "checkpoints" / "last.pt")
    assert last["config_hash"] != final_state(parent)["config_hash"]  # the child's own config
    assert files(parent) == before  # the parent is untouched, byte for byte

    shown = project.run("--runs")
    assert shown.returncode == 0 and "parent@20" in shown.stdout

    missing = project.run("--resume", str(parent), "--from-step", "21")
    assert missing.returncode == 2 and "steps kept: 5, 10, 15, 20, 25, 30, 35" in missing.stderr, missing.stderr
    reproduced = project.run("--reproduce", str(child))
    # A branch is re-made from its parent's checkpoint (it was refused, pointing to the parent, before).
    assert reproduced.returncode == 0 and "of the original's 39: identical (bitwise)" in reproduced.stdout
    assert files(parent) == before


def test_max_steps_limits_and_extends_a_run(project):
    schedule = ("--scheduler.warmup_steps=0", "--scheduler.total_steps=13", "--epochs=1")
    assert project.run(*QUICK_RUN, *NOISY, *schedule, "--run_name=whole").returncode == 0
    limited = project.run(*QUICK_RUN, *NOISY, *schedule, "--max_steps=7", "--run_name=limited")
    assert limited.returncode == 0, limited.stderr
    run = run_directory(project, "limited")
    metadata = yaml.safe_load((run / "metadata.yaml").read_text())
    assert (metadata["global_step"], metadata["epochs_done"]) == (7, 0)  # stopped mid-epoch
    assert metadata["stop_reason"] == "reached max_steps 7"

    # Extended to the epoch's end: the same weights as the run that was never stopped.
    resumed = project.run("--resume", str(run), "--max_steps=13")
    assert resumed.returncode == 0, resumed.stderr
    assert "lr 0" not in resumed.stderr
    a, b = final_state(run_directory(project, "whole")), final_state(run)
    for part in ("model", "optimizer", "progress"):
        assert_same_tensors(a[part], b[part], part)

    # Past a schedule that decayed to 0 (cosine to final_lr_fraction 0 at step 13): a warning.
    extended = project.run("--resume", str(run), "--max_steps=20")
    assert extended.returncode == 0, extended.stderr
    assert "the 7 steps after it train at lr 0" in extended.stderr and "--from-step" in extended.stderr
    assert yaml.safe_load((run / "metadata.yaml").read_text())["global_step"] == 20


def test_a_branch_is_reproduced_from_its_parents_verified_checkpoint(project, tmp_path):
    run = (*QUICK_RUN, "--epochs=2", *NOISY)  # checkpoints at steps 13 and 26
    assert project.run(*run, "--run_name=parent").returncode == 0
    parent = run_directory(project, "parent")
    branch = project.run("--resume", str(parent), "--from-step", "13", "--optimizer.lr=1e-3", "--epochs=3")
    assert branch.returncode == 0, branch.stderr
    child = run_directory(project, "parent-from-13")
    before = files(parent)

    reproduced = project.run("--reproduce", str(child))
    assert reproduced.returncode == 0, reproduced.stdout + reproduced.stderr
    assert "up to step 39 of the original's 39: identical (bitwise)" in reproduced.stdout
    assert "parameters at step 39: identical (bitwise)" in reproduced.stdout
    (reproduction,) = (child / "reproductions").iterdir()
    assert yaml.safe_load((reproduction / "config.yaml").read_text())["parent"]["step"] == 13
    assert files(parent) == before  # the parent is read, never written

    # The parent archived, its step files deleted: the branch's checkpoint comes back from the archive.
    checkpoint = parent / "checkpoints" / "step-000000013.pt"
    archived = project.run("--archive", str(parent), f"file://{tmp_path / 'archive'}", "--delete-local-checkpoints")
    assert archived.returncode == 0 and not checkpoint.exists(), archived.stdout + archived.stderr
    again = project.run("--reproduce", str(child))
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"fetched {checkpoint.name} from file://" in again.stdout and "(SHA-256 verified)" in again.stdout
    assert "parameters at step 39: identical (bitwise)" in again.stdout

    data = bytearray(checkpoint.read_bytes())
    data[-100] ^= 0xFF  # not the checkpoint the branch started from
    checkpoint.write_bytes(bytes(data))
    refused = project.run("--reproduce", str(child))
    assert refused.returncode == 2 and "SHA-256 differs" in refused.stderr and "Traceback" not in refused.stderr
