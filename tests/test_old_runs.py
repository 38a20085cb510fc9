"""A run logged by an earlier version of the template still resumes, evaluates and reproduces.

tests/fixtures/logged-before/ is a run directory written before the core moved into packages
(config.yaml, metadata.yaml, metrics.jsonl, its checkpoints and their manifests): the example
with `hidden_size: 8`, `--mini --cpu`, two epochs. Its files are read as they were written;
only the commit it recorded and the place of its data are this test repository's, since the
fixture was made in another one."""

import csv
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from helpers import REPO, assert_same_tensors, final_state, logged_values

from src.core.tracking.metrics import read_metrics

FIXTURE = REPO / "tests" / "fixtures" / "logged-before"


def adopt(project) -> Path:
    """The fixture, copied into the project's logs/ as if the project's HEAD had made it."""
    run = project.root / "logs" / "fixture" / "logged-before"
    shutil.copytree(FIXTURE, run)
    commit = project.git("rev-parse", "HEAD")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["git"]["commit"] = commit
    config["data_fingerprint"]["directory"] = str(project.root / "data" / "pendulum")
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    metadata = yaml.safe_load((run / "metadata.yaml").read_text())
    (run / "metadata.yaml").write_text(yaml.safe_dump({**metadata, "commit": commit}, sort_keys=False))
    checkpoints = run / "checkpoints"
    for manifest_file in sorted(checkpoints.glob("step-*.json")):  # the commit each checkpoint records
        path = manifest_file.with_suffix(".pt")
        state = torch.load(path, weights_only=True)
        buffer = io.BytesIO()
        torch.save({**state, "commit": commit}, buffer)
        path.write_bytes(buffer.getvalue())
        manifest = json.loads(manifest_file.read_text())
        digest = hashlib.sha256(buffer.getvalue()).hexdigest()
        manifest_file.write_text(json.dumps({**manifest, "sha256": digest, "bytes": len(buffer.getvalue())}))
    for name in ("best", "last"):  # hard links to step files, as a run leaves them
        pointer = json.loads((checkpoints / f"{name}.json").read_text())
        os.link(checkpoints / pointer["links_to"], checkpoints / f"{name}.pt")
        step_manifest = json.loads((checkpoints / pointer["links_to"]).with_suffix(".json").read_text())
        link_manifest = {**step_manifest, "file": f"{name}.pt", "links_to": pointer["links_to"]}
        (checkpoints / f"{name}.json").write_text(json.dumps(link_manifest))
    return run


def saved_config(run: Path, tmp_path: Path) -> Path:
    """The run's config as a file outside the repository (the tree stays clean)."""
    document = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("git", "flags", "command_line", "environment", "data_fingerprint"):
        document.pop(key)
    path = tmp_path / "logged-before.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_a_run_logged_before_reproduces_bitwise_with_todays_code(project):
    run = adopt(project)
    result = project.run("--reproduce", str(run), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical (bitwise)" in result.stdout
    (reproduction,) = (run / "reproductions").iterdir()
    assert logged_values(reproduction) == logged_values(run)


def test_a_run_logged_before_resumes_exactly(project, tmp_path):
    run = adopt(project)
    extended = project.run("--resume", str(run), "--epochs=3")
    assert extended.returncode == 0, extended.stderr
    config = saved_config(run, tmp_path)  # the same three epochs, never stopped (the schedule kept its length)
    flags = ("--mini", "--cpu", "--epochs=3", "--scheduler.total_steps=14", "--run_name=ref")
    reference = project.run(str(config), *flags)
    assert reference.returncode == 0, reference.stderr
    uninterrupted = project.root / "logs" / "fixture" / "ref"
    a, b = final_state(uninterrupted), final_state(run)
    for part in ("model", "optimizer", "schedule_steps", "progress", "per_rank", "monitor"):
        assert_same_tensors(a[part], b[part], part)
    assert logged_values(run) == logged_values(uninterrupted)


def test_a_run_logged_before_evaluates_to_its_own_numbers(project):
    run = adopt(project)
    result = project.run("--evaluate", str(run))
    assert result.returncode == 0, result.stderr
    with open(run / "evaluation.csv", newline="") as stream:
        rows = {row["checkpoint"]: row for row in csv.DictReader(stream)}
    logged = {(r["step"], f"{r['phase']}/{r['name']}"): r["value"] for r in read_metrics(run)}
    assert set(rows) == {"step-000000007.pt", "step-000000014.pt"}
    for row in rows.values():
        step = int(row["step"])
        for key in ("val/loss", "rollout/loss", "rollout/final_angle_error"):
            assert float(row[key]) == logged[(step, key)], (step, key)
