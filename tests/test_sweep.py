"""Sweeps: expansion, naming, local sequential runs pinned to their commit, failures."""

import csv
import subprocess
import sys
import time

import pytest
import yaml
from conftest import DATA

from src.core.config import parse_yaml
from src.core.errors import UserError
from src.core.sweep import expand, format_value, member_name
from src.schema import SCHEMA

BASE = f"""\
description: sweep
data_directory: {DATA}
model_type: PendulumModel
model_parameters: {{hidden_size: 16, layer_sizes_unused: null}}
loss_function: F.mse_loss
train_data_loader_type: PendulumSteps
epochs: 1
batch_size: 8
"""


def document(extra: str) -> dict:
    text = BASE.replace(", layer_sizes_unused: null", "")
    return {**parse_yaml(text, "base"), **parse_yaml(extra, "extra")}


def test_cartesian_product_in_order_and_plain_lists_stay_plain():
    members = expand(
        document(
            "sweep: {optimizer.lr: [1.0e-3, 3.0e-4], model_parameters.hidden_size: [16, 32, 64]}\n"
            "data_loader_parameters: {train: {}}\n"
            "slurm: {extra_sbatch: ['--constraint=a100', '--exclusive']}\n"
        ),
        SCHEMA,
    )
    assert [(m.config["optimizer"]["lr"], m.config["model_parameters"]["hidden_size"]) for m in members] == [
        (1e-3, 16),
        (1e-3, 32),
        (1e-3, 64),
        (3e-4, 16),
        (3e-4, 32),
        (3e-4, 64),
    ]
    assert all(m.config["slurm"]["extra_sbatch"] == ["--constraint=a100", "--exclusive"] for m in members)
    assert all("sweep" not in m.config or m.config["sweep"] is None for m in members)


def test_a_list_value_can_itself_be_swept():
    members = expand(document("sweep: {slurm.extra_sbatch: [['--exclusive'], []]}\n"), SCHEMA)
    assert [m.config["slurm"]["extra_sbatch"] for m in members] == [["--exclusive"], []]


def test_member_names_are_short_and_readable():
    assert member_name(3, 12, {"optimizer.lr": 3e-4, "model_parameters.hidden": 64}) == "03-lr=3e-4,hidden=64"
    assert member_name(0, 2, {"a.size": 1, "b.size": 2}) == "0-a.size=1,b.size=2"  # same last part: whole keys
    assert member_name(1, 2, {"x": [1, 2], "name": "a/b c"}) == "1-x=_1,2_,name=a_b_c"
    assert [format_value(v) for v in (1e-3, 0.5, 0.01, 2.5e6, 0.0, True)] == [
        "1e-3",
        "0.5",
        "0.01",
        "2.5e6",
        "0",
        "True",
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("sweep: {optimizer.lrr: [0.1]}\n", "did you mean 'optimizer.lr'"),
        ("sweep: {optimizer.lr: []}\n", "expected a non-empty list of values"),
        ("sweep: {optimizer.lr: 0.1}\n", "expected a non-empty list of values"),
        ("sweep: {optimizer.lr: [fast]}\n", "sweep member 0-lr=fast: invalid config"),
        ("sweep: {model_type: [PendulumModel, Nope]}\n", "sweep member 1-model_type=Nope"),
    ],
)
def test_bad_sweeps_are_errors(extra, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        expand(document(extra), SCHEMA)


def write_sweep(project, name="sweep.yaml", **sweep):
    config = yaml.safe_load((project.root / "sample_runconfig.yaml").read_text())
    config.update(epochs=1, batch_size=8, sweep=sweep)
    (project.root / name).write_text(yaml.safe_dump(config, sort_keys=False))
    project.commit("a sweep")
    return name


def test_local_sweep_runs_every_member_in_its_own_run_directory(project):
    name = write_sweep(project, **{"optimizer.lr": [1.0e-3, 3.0e-4], "model_parameters.hidden_size": [16, 32]})
    result = project.run(name, "--mini", "--cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    (sweep,) = (project.root / "logs" / "PendulumModel").glob("sweep-*")
    members = [
        "0-lr=1e-3,hidden_size=16",
        "1-lr=1e-3,hidden_size=32",
        "2-lr=3e-4,hidden_size=16",
        "3-lr=3e-4,hidden_size=32",
    ]
    assert sorted(p.name for p in sweep.iterdir() if (p / "metadata.yaml").exists()) == members
    commit = project.git("rev-parse", "HEAD")
    for member in members:
        config = yaml.safe_load((sweep / member / "config.yaml").read_text())
        assert config["git"]["commit"] == commit and config["run_name"] == member
    assert yaml.safe_load((sweep / members[2] / "config.yaml").read_text())["optimizer"]["lr"] == 3e-4
    with open(sweep / "sweep.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["member"] for row in rows] == members and {row["status"] for row in rows} == {"finished"}
    assert all(float(row["rollout/loss"]) > 0 for row in rows)
    assert yaml.safe_load((sweep / "sweep.yaml").read_text())["sweep"]["optimizer.lr"] == [1e-3, 3e-4]
    assert not (sweep / "code").exists() and len(project.git("worktree", "list").splitlines()) == 1


def test_a_failing_member_does_not_stop_the_others(project):
    name = write_sweep(project, **{"loss_function": ["F.mse_loss", "F.binary_cross_entropy", "F.l1_loss"]})
    result = project.run(name, "--mini", "--cpu")
    assert result.returncode == 1
    assert "2 of 3 finished" in result.stdout and "failed: 1-loss_function=F.binary_cross_entropy" in result.stdout
    (sweep,) = (project.root / "logs" / "PendulumModel").glob("sweep-*")
    with open(sweep / "sweep.csv") as stream:
        statuses = [row["status"] for row in csv.DictReader(stream)]
    assert statuses == ["finished", "failed", "finished"]


def test_a_bad_sweep_exits_2_and_writes_nothing(project):
    name = write_sweep(project, **{"optimizer.lrr": [0.1]})
    result = project.run(name, "--mini", "--cpu")
    assert result.returncode == 2 and "did you mean 'optimizer.lr'" in result.stderr
    assert project.written_files() == []


def test_a_local_sweep_keeps_running_its_commit_while_the_tree_changes(project):
    name = write_sweep(project, **{"seed": [0, 1, 2]})
    process = subprocess.Popen(
        [sys.executable, "run.py", name, "--mini", "--cpu"], cwd=project.root, stdout=subprocess.PIPE, text=True
    )
    started = project.git("rev-parse", "HEAD")
    time.sleep(2)
    model = project.root / "src" / "model.py"
    model.write_text(model.read_text().replace("0.1 * self.net(state)", "0.3 * self.net(state)"))
    project.commit("edited while the sweep runs")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    (sweep,) = (project.root / "logs" / "PendulumModel").glob("sweep-*")
    commits = {yaml.safe_load(p.read_text())["git"]["commit"] for p in sweep.glob("*/config.yaml")}
    assert commits == {started}
