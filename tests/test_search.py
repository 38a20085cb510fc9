"""Hyperparameter search (Optuna): the search form's checks, a real search on the example with
trials complete and pruned, a search killed with kill -9 and started again, and --reproduce
of a trial."""

import csv
import re

import pytest
import yaml
from helpers import DATA
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from src.core.commands.search_spec import check_search
from src.core.config.loader import parse_yaml
from src.core.config.schema import project_schema
from src.core.errors import UserError

pytest.importorskip("optuna")  # requirements-search.txt (in requirements-dev.txt)

BASE = f"""\
description: search
data_directory: {DATA}
model_type: PendulumModel
model_parameters: {{hidden_size: 16}}
loss_function: F.mse_loss
train_data_loader_type: PendulumSteps
epochs: 1
batch_size: 8
"""
LONG = 1200  # seconds: a search of several trials on a loaded machine
GOOD_PARAMETERS = "{optimizer.lr: {log_uniform: [1.0e-4, 1.0e-2]}, model_parameters.hidden_size: {choice: [16, 32]}}"


def document(search: str = "{}", parameters: str = GOOD_PARAMETERS) -> dict:
    return {**parse_yaml(BASE, "base"), "sweep": parse_yaml(f"{{search: {search}, parameters: {parameters}}}", "s")}


def test_a_good_search_is_read_with_its_defaults():
    spec = check_search(document("{trials: 12, parallel: 2}"), project_schema())
    assert (spec.sampler, spec.trials, spec.parallel, spec.pruner) == ("tpe", 12, 2, {"type": "median"})
    assert [(p.key, p.kind, p.values) for p in spec.parameters] == [
        ("optimizer.lr", "log_uniform", [1e-4, 1e-2]),
        ("model_parameters.hidden_size", "choice", [16, 32]),
    ]


@pytest.mark.parametrize(
    ("search", "parameters", "message"),
    [
        ("{}", "{optimizer.lr: {uniform: [0.1, 0.01]}}", "low 0.1 is greater than high 0.01"),
        ("{}", "{optimizer.lr: {log_uniform: [0, 0.01]}}", "a log scale needs low > 0"),
        ("{}", "{optimizer.lr: {normal: [0, 1]}}", "expected one distribution"),
        ("{}", "{model_parameters.hidden_size: {int: [8, 16.5]}}", "expected [low, high] (integers)"),
        ("{sampler: cmaes}", GOOD_PARAMETERS, "sweep.search.sampler': expected one of tpe, random, grid"),
        ("{pruner: {type: patient}}", GOOD_PARAMETERS, "expected one of median, successive_halving, hyperband"),
        ("{pruner: {type: median, min_resource: 1}}", GOOD_PARAMETERS, "not an option of the median pruner"),
        ("{trails: 3}", GOOD_PARAMETERS, "not a search option; did you mean 'trials'"),
        ("{trials: 0}", GOOD_PARAMETERS, "expected an integer >= 1"),
        ("{sampler: grid}", GOOD_PARAMETERS, "the grid sampler needs every parameter as a choice list"),
        ("{}", "{optimizer.lrr: {uniform: [0.1, 0.2]}}", "no such key in the config or the schema"),
        ("{}", "{optimizer.lr: {choice: [fast, slow]}}", "a search trial with {'optimizer.lr': 'fast'}"),
        ("{}", "{slurm.time: {choice: ['1:00:00']}}", "a search cannot vary this key"),
    ],
)
def test_bad_searches_are_one_message(search, parameters, message):
    with pytest.raises(UserError, match=re.escape(message)):
        check_search(document(search, parameters), project_schema())


def write_search(project, name: str, epochs: int, **search) -> str:
    config = yaml.safe_load((project.root / "sample_runconfig.yaml").read_text())
    config.update(epochs=epochs, batch_size=32, run_name=name.removesuffix(".yaml"))
    config["sweep"] = {
        "search": search,
        "parameters": {
            "optimizer.lr": {"log_uniform": [1.0e-5, 1.0e-2]},
            "model_parameters.hidden_size": {"choice": [16, 32]},
        },
    }
    (project.root / name).write_text(yaml.safe_dump(config, sort_keys=False))
    project.commit("a search")
    return name


def test_a_bad_search_exits_2_and_writes_nothing(project):
    name = write_search(project, "bad.yaml", 1, sampler="tpe", pruner={"type": "median", "n_warmup": 1})
    result = project.run(name, "--mini", "--cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: config key 'sweep.search.pruner.n_warmup': not an option of the median pruner "
        "(its options: n_startup_trials, n_warmup_steps, interval_steps) (docs/search.md)"
    ]
    assert project.written_files() == []


def test_a_search_without_optuna_is_exit_2_naming_the_requirements(project, tmp_path):
    blocker = tmp_path / "no_optuna" / "optuna"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named optuna')\n")
    name = write_search(project, "search.yaml", 1, trials=2)
    result = project.run(name, "--mini", "--cpu", env={"PYTHONPATH": str(blocker.parent)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "needs Optuna, which is not installed; pip install -r requirements-search.txt" in result.stderr
    assert project.written_files() == []


def trial_rows(search_directory) -> list[dict]:
    with open(search_directory / "sweep.csv") as stream:
        return list(csv.DictReader(stream))


@pytest.mark.slow  # a real search of 4 trials
def test_a_search_prunes_and_lists_its_trials_best_first(project):
    name = write_search(
        project, "search.yaml", 2, trials=4, parallel=1, seed=0, pruner={"type": "median", "n_startup_trials": 1}
    )
    result = project.run(name, "--mini", "--cpu", timeout=LONG)
    assert result.returncode == 0, result.stdout + result.stderr
    directory = project.root / "logs" / "PendulumModel" / "search-search"
    rows = trial_rows(directory)
    states = [row["state"] for row in rows]
    assert len(rows) == 4 and "complete" in states and "pruned" in states, rows
    complete = [float(row["objective"]) for row in rows if row["state"] == "complete"]
    assert complete == sorted(complete) and states.index("pruned") > states.index("complete")  # best first
    for row in rows:
        config = yaml.safe_load((directory / row["member"] / "config.yaml").read_text())
        assert config["optimizer"]["lr"] == float(row["optimizer.lr"])  # concrete values, the sweep's commit
        assert config["git"]["commit"] == project.git("rev-parse", "HEAD")
        metadata = yaml.safe_load((directory / row["member"] / "metadata.yaml").read_text())
        if row["state"] == "pruned":
            assert metadata["stop_reason"].startswith("pruned at step ") and metadata["epochs_done"] == 1
        else:
            assert metadata["stop_reason"] == "finished all 2 epochs"
    listing = project.run("--runs", str(directory), "--status", "pruned")
    assert listing.returncode == 0 and "pruned" in listing.stdout and "complete" not in listing.stdout
    best = EventAccumulator(str(directory / rows[0]["member"]))  # TensorBoard's HParams tab
    best.Reload()
    session = best.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    values = HParamsPluginData.FromString(session).session_start_info.hparams
    assert values["optimizer.lr"].number_value == pytest.approx(float(rows[0]["optimizer.lr"]))
    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(directory / "study.journal"))
    )
    study = optuna.load_study(study_name="search", storage=storage)
    assert sorted(t.state.name for t in study.trials) == sorted(s.upper() for s in states)
    assert study.best_trial.user_attrs["run"] == rows[0]["member"]
    again = project.run(name, "--mini", "--cpu")  # the same command: nothing left to run
    assert again.returncode == 0 and "continuing a search of 4 trial(s)" in again.stdout
    assert "started" not in again.stdout and trial_rows(directory) == rows


@pytest.mark.slow  # a real search killed, continued, and a trial reproduced
def test_a_killed_search_continues_with_the_trials_asked_and_resumes_the_one_in_flight(project):
    name = write_search(project, "search.yaml", 3, trials=4, parallel=2, pruner={"type": "none"})
    killed = project.run(name, "--mini", "--cpu", env={"TEMPLATE_FAULT": "search_trial_checkpointed:1"}, timeout=LONG)
    assert killed.returncode == -9, killed.stdout + killed.stderr  # kill -9 of the driver: its trials die too
    directory = project.root / "logs" / "PendulumModel" / "search-search"
    in_flight = [p.parent.parent.name for p in directory.glob("*/checkpoints/last.pt")]
    assert in_flight and len(list((directory / "configs").glob("*.yaml"))) == 2
    result = project.run(name, "--mini", "--cpu", timeout=LONG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming trial {in_flight[0]}" in result.stdout and f"trial {in_flight[0]}: resumed" in result.stdout
    rows = trial_rows(directory)
    assert len(rows) == 4 and {row["state"] for row in rows} == {"complete"}
    assert len({(row["optimizer.lr"], row["model_parameters.hidden_size"]) for row in rows}) == 4  # none repeated
    assert sorted(p.stem for p in (directory / "configs").glob("*.yaml")) == sorted(row["member"] for row in rows)
    resumed = directory / in_flight[0]
    records = [yaml.safe_load(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if (r["phase"], r["name"]) == ("rollout", "loss")] == [
        0,
        1,
        2,
        3,
    ]  # before training, then after each of the 3 epochs: none lost, none twice
    # Bitwise what a run never interrupted gives: its reproduction, from scratch, at the search's commit.
    reproduced = project.run("--reproduce", str(resumed), "--cpu", timeout=LONG)
    assert reproduced.returncode == 0, reproduced.stdout + reproduced.stderr
    assert "identical (bitwise)" in reproduced.stdout and "parameters at step" in reproduced.stdout
