"""W&B and MLflow beside metrics.jsonl: real libraries, no network.

W&B runs offline (its files read back with W&B's own reader, `wandb leet inspect --json`);
MLflow writes a local file store, read back with `MlflowClient`. W&B keeps one service
process per Python process, so its runs are made in child processes (tests/tracker_driver.py),
which also lets a test kill them with SIGKILL.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from helpers import QUICK_RUN, REPO, free_port

from src.core.config.schema import project_schema
from src.core.config.validation import finalize
from src.core.errors import UserError
from src.core.tracking.metrics import read_metrics

SCHEMA = project_schema()

DRIVER = Path(__file__).with_name("tracker_driver.py")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def config_for(tmp_path: Path) -> dict:
    return {
        "description": "tracker test",
        "model_type": "PendulumModel",
        "project_name": "trackers",
        "optimizer": {"lr": 0.001},
        "wandb": {"mode": "offline"},
        "mlflow": {"tracking_uri": (tmp_path / "mlruns").as_uri()},
    }


def drive(run_directory: Path, trackers: str, first: int, last: int, checkpoint: int, mode: str, timeout=300, **env):
    """tests/tracker_driver.py: log steps first..last as the Trainer does; `mode` kill or break."""
    config = env.pop("config", None) or config_for(run_directory.parent)
    return subprocess.run(
        [sys.executable, str(DRIVER), str(run_directory), trackers, str(first), str(last), str(checkpoint), mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "WANDB_SILENT": "true",
            "DRIVER_CONFIG": json.dumps(config),
            **env,
        },
    )


def expected_value(key: str, step: int) -> float:
    """What tracker_driver.py logs: a function of the step, so that any mix-up shows."""
    return 1.0 / (step + 1) if key == "train/loss" else step * 1e-3


def mlflow_client(tmp_path: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())


def mlflow_history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def wandb_records(wandb_dir: Path, run_id: str) -> list[dict]:
    """Every record of every local segment of a W&B run, by W&B's own reader."""
    records = []
    for path in sorted(Path(wandb_dir).glob(f"wandb/*-{run_id}/run-{run_id}.wandb")):
        output = subprocess.run(
            [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        records += [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return records


def wandb_history(wandb_dir: Path, run_id: str) -> list[dict]:
    return [record["history"] for record in wandb_records(wandb_dir, run_id) if record["type"] == "history"]


def history_item(row: dict) -> dict:
    """A history row's values by key, as `wandb leet inspect --json` prints them."""
    return row["item"]


# ---------------------------------------------------------------------------------------
# The config key and the missing-install check


def test_loggers_default_to_tensorboard_and_jsonl_and_keep_jsonl():
    base = yaml.safe_load((REPO / "sample_runconfig.yaml").read_text())
    assert finalize(base, SCHEMA).loggers == ("tensorboard", "jsonl")
    assert finalize({**base, "loggers": ["tensorboard", "jsonl", "wandb", "mlflow"]}, SCHEMA).loggers[-1] == "mlflow"
    with pytest.raises(UserError, match=r"loggers.*needs 'jsonl'.*\[tensorboard, jsonl, wandb\]"):
        finalize({**base, "loggers": ["wandb"]}, SCHEMA)
    with pytest.raises(UserError, match=r"loggers.*neptune"):
        finalize({**base, "loggers": ["jsonl", "neptune"]}, SCHEMA)


def test_a_named_tracker_that_is_not_installed_is_refused_before_training():
    # -S: without site-packages, neither tracker is importable (trackers.py needs only the stdlib).
    code = (
        "from src.core.tracking.trackers import check_trackers\n"
        "check_trackers(['tensorboard', 'jsonl'])\n"
        "try:\n    check_trackers(['jsonl', 'mlflow'])\n"
        "except Exception as error:\n    print(type(error).__name__, error)\n"
    )
    output = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert (
        output.stdout.strip() == "UserError loggers: mlflow is not installed; pip install -r requirements-trackers.txt"
    )


# ---------------------------------------------------------------------------------------
# What a tracker run holds: metrics and figures by their TensorBoard names, config and commit


def test_mlflow_run_holds_metrics_figure_config_and_commit(tmp_path):
    run_directory = tmp_path / "run"
    result = drive(run_directory, "mlflow", 1, 12, 6, "figure")
    assert result.returncode == 0, result.stderr
    ids = yaml.safe_load((run_directory / "metadata.yaml").read_text())["trackers"]["mlflow"]
    client = mlflow_client(tmp_path)
    run = client.get_run(ids["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "trackers"
    assert run.data.tags["mlflow.source.git.commit"] == COMMIT
    assert run.data.tags["run_directory"] == str(run_directory.resolve())
    assert run.data.params["optimizer.lr"] == "0.001" and run.data.params["description"] == "tracker test"
    history = mlflow_history(client, ids["run_id"])
    assert history == {key: [(s, expected_value(key, s)) for s in range(1, 13)] for key in ("train/loss", "train/lr")}
    figure = Path(client.download_artifacts(ids["run_id"], "figures/rollout/000000012-trajectory.png", str(tmp_path)))
    assert figure.read_bytes() == (run_directory / "figures" / "rollout" / "000000012-trajectory.png").read_bytes()


def test_wandb_offline_run_holds_metrics_figure_config_and_commit(tmp_path):
    run_directory = tmp_path / "run"
    result = drive(run_directory, "wandb", 1, 12, 6, "figure")
    assert result.returncode == 0, result.stderr
    ids = yaml.safe_load((run_directory / "metadata.yaml").read_text())["trackers"]["wandb"]
    assert ids["dir"] == str(run_directory.resolve())  # W&B's files live in the run directory
    records = wandb_records(run_directory, ids["id"])
    run = next(record["run"] for record in records if record["type"] == "run")
    assert run["project"] == "trackers" and run["display_name"] == "run" and run["run_id"] == ids["id"]
    assert f"commit:{COMMIT}" in run["tags"]
    config = run["config"]["update"]
    assert config["git"]["commit"] == COMMIT and config["optimizer"]["lr"] == 0.001
    assert config["run_directory"] == str(run_directory.resolve())
    rows = {row["step"]["num"]: history_item(row) for row in wandb_history(run_directory, ids["id"])}
    assert sorted(rows) == list(range(1, 13))
    for step, row in rows.items():
        assert {key: row[key] for key in ("train/loss", "train/lr")} == {
            key: expected_value(key, step) for key in ("train/loss", "train/lr")
        }
    assert rows[12]["rollout/trajectory._type"] == "image-file"
    assert not any(key.startswith("rollout/") for key in rows[11])
    media = next(run_directory.glob(f"wandb/*-{ids['id']}/files/{rows[12]['rollout/trajectory.path']}"))
    assert media.read_bytes() == (run_directory / "figures" / "rollout" / "000000012-trajectory.png").read_bytes()


# ---------------------------------------------------------------------------------------
# kill -9 and resume: one history, no step twice, none missing


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
@pytest.mark.parametrize("handed_over", [True, False], ids=["tracker-ahead-of-checkpoint", "tracker-behind"])
def test_killed_and_resumed_run_continues_the_same_tracker_run(tmp_path, tracker, handed_over):
    """Checkpoint at step 100, kill -9 later; the resume logs 101..400 from that checkpoint.
    Ahead: the tracker got steps 1..300 (it holds steps beyond the checkpoint: skipped on resume);
    behind: the killed process handed over nothing of 1..120 (W&B keeps its last 32 KiB block
    in memory anyway), so the resume fills the gap from metrics.jsonl."""
    run_directory = tmp_path / "run"
    killed = drive(
        run_directory, tracker, 1, 300 if handed_over else 120, 100, "kill" if handed_over else "kill-unflushed"
    )
    assert killed.returncode == -9, killed.stderr
    resumed = drive(run_directory, tracker, 101, 400, 10_000, "resume")
    assert resumed.returncode == 0, resumed.stderr
    ids = yaml.safe_load((run_directory / "metadata.yaml").read_text())["trackers"][tracker]
    first_ids = json.loads((run_directory / "driver-first-ids.json").read_text())[tracker]
    if tracker == "mlflow":
        assert ids["run_id"] == first_ids["run_id"]
        history = mlflow_history(mlflow_client(tmp_path), ids["run_id"])
        assert history == {k: [(s, expected_value(k, s)) for s in range(1, 401)] for k in ("train/loss", "train/lr")}
    else:
        assert ids["id"] == first_ids["id"]
        rows = wandb_history(run_directory, ids["id"])
        steps = Counter(row["step"]["num"] for row in rows)
        assert sorted(steps) == list(range(1, 401)) and set(steps.values()) == {1}
        for row in rows:
            step, values = row["step"]["num"], history_item(row)
            assert values["train/loss"] == expected_value("train/loss", step)
    lines = read_metrics(run_directory)  # the run's own record: every step once
    assert [line["step"] for line in lines if line["name"] == "loss"] == list(range(1, 401))


# ---------------------------------------------------------------------------------------
# A failing tracker: one warning, training goes on


CASES = ["mlflow-unwritable-at-start", "mlflow-server-unreachable", "mlflow-store-gone-mid-run", "wandb-service-killed"]


@pytest.mark.parametrize("case", CASES)
def test_a_failing_tracker_warns_once_and_training_goes_on(tmp_path, case):
    run_directory = tmp_path / "run"
    config = config_for(tmp_path)
    env = {}
    if case == "mlflow-server-unreachable":
        config["mlflow"]["tracking_uri"] = f"http://127.0.0.1:{free_port()}"
    elif case == "mlflow-unwritable-at-start":
        (tmp_path / "a-file").write_text("not a directory\n")
        config["mlflow"]["tracking_uri"] = (tmp_path / "a-file" / "mlruns").as_uri()
    elif case == "mlflow-store-gone-mid-run":  # chmod does not stop root: replace the store by a file
        store = tmp_path / "mlruns"
        env["BREAK"] = f"replace-with-file:{store}"
    else:
        env["BREAK"] = "kill-wandb-service"
    tracker = case.split("-")[0]
    # unreachable: MLflow's own retries, unbounded, would take 4 minutes and time out here
    result = drive(run_directory, tracker, 1, 200, 50, "break", timeout=120, config=config, **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("done")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "Traceback" not in result.stderr, result.stderr
    assert warnings[0].startswith(f"warning: {tracker}") and f"--export {run_directory} --to {tracker}" in warnings[0]
    assert [line["step"] for line in read_metrics(run_directory) if line["name"] == "loss"] == list(range(1, 201))


# ---------------------------------------------------------------------------------------
# --export: a real finished run into MLflow, twice


def test_export_of_a_finished_run_into_mlflow_matches_metrics_jsonl_and_never_duplicates(project, tmp_path):
    config = project.write_config("short.yaml", epochs=1, run_name="short")
    project.commit("short config")
    trained = project.run(config, "--mini", "--cpu")
    assert trained.returncode == 0, trained.stderr
    (run_directory,) = project.run_directories()
    lines = read_metrics(run_directory)
    last_step = max(line["step"] for line in lines)
    figures = run_directory / "figures" / "rollout"  # the example model draws its rollouts
    figure = next(figures.glob(f"{last_step:09d}-*.png"))
    pictures = len(list(figures.glob("*.png")))
    env = {**os.environ, "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()}
    command = [sys.executable, "run.py", "--export", str(run_directory), "--to", "mlflow"]

    first = subprocess.run(command, cwd=project.root, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    ids = yaml.safe_load((run_directory / "metadata.yaml").read_text())["trackers"]["mlflow"]
    client = mlflow_client(tmp_path)
    expected: dict[str, list] = {}
    for line in lines:
        expected.setdefault(f"{line['phase']}/{line['name']}", []).append((line["step"], line["value"]))
    assert mlflow_history(client, ids["run_id"]) == {key: sorted(values) for key, values in expected.items()}
    run = client.get_run(ids["run_id"])
    commit = project.git("rev-parse", "HEAD")
    assert run.data.tags["mlflow.source.git.commit"] == commit and run.info.status == "FINISHED"
    assert run.info.run_name == "short"
    exported = client.download_artifacts(ids["run_id"], f"figures/rollout/{figure.name}", str(tmp_path))
    assert Path(exported).read_bytes() == figure.read_bytes()
    assert f"{len(lines) + pictures} value(s) and figure(s) sent, 0 already there" in first.stdout

    second = subprocess.run(command, cwd=project.root, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    assert yaml.safe_load((run_directory / "metadata.yaml").read_text())["trackers"]["mlflow"] == ids
    assert mlflow_history(client, ids["run_id"]) == {key: sorted(values) for key, values in expected.items()}
    assert f"0 value(s) and figure(s) sent, {len(lines) + pictures} already there" in second.stdout
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_export_refuses_bad_input_with_one_message(tmp_path, capsys):
    from run import main

    assert main(["--to", "mlflow"]) == 2
    assert "--to mlflow goes with --export RUN_DIR" in capsys.readouterr().err
    assert main(["--export", str(tmp_path)]) == 2
    assert "--export needs --to wandb or --to mlflow, but got None" in capsys.readouterr().err
    assert main(["--export", str(tmp_path), "--to", "neptune"]) == 2
    assert "invalid choice: 'neptune'" in capsys.readouterr().err
    assert main(["--export", str(tmp_path), "--to", "mlflow"]) == 2
    assert f"--export {tmp_path}: no config.yaml there" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Through the real training flow: python run.py, killed and resumed


def test_a_real_run_killed_and_resumed_has_one_continuous_history_in_each_tracker(project, tmp_path):
    """Both trackers on a logged pendulum run, kill -9 mid-epoch, --resume: each tracker run holds
    every (step, value) of metrics.jsonl once, the same run continued (ids kept in metadata.yaml)."""
    args = (*QUICK_RUN, "--epochs=2", "--checkpoint.every_n_steps=5", "--loggers=[tensorboard, jsonl, mlflow, wandb]")
    args += (f"--mlflow.tracking_uri={(tmp_path / 'mlruns').as_uri()}", "--wandb.mode=offline")
    env = {"WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true"}
    killed = project.run(*args, "--run_name=tracked", env={**env, "TEMPLATE_FAULT": "train_step:22"})
    assert killed.returncode == -9, killed.stderr
    run = project.root / "logs" / "PendulumModel" / "tracked"
    first_ids = yaml.safe_load((run / "metadata.yaml").read_text())["trackers"]
    resumed = project.run("--resume", str(run), env=env)
    assert resumed.returncode == 0, resumed.stderr
    ids = yaml.safe_load((run / "metadata.yaml").read_text())["trackers"]
    assert ids["mlflow"]["run_id"] == first_ids["mlflow"]["run_id"] and ids["wandb"]["id"] == first_ids["wandb"]["id"]

    expected: dict[str, list] = {}
    for line in read_metrics(run):
        expected.setdefault(f"{line['phase']}/{line['name']}", []).append((line["step"], line["value"]))
    assert mlflow_history(mlflow_client(tmp_path), ids["mlflow"]["run_id"]) == {
        k: sorted(v) for k, v in expected.items()
    }
    rows = wandb_history(run, ids["wandb"]["id"])
    steps = Counter(row["step"]["num"] for row in rows)
    assert set(steps.values()) == {1} and sorted(steps) == sorted({step for v in expected.values() for step, _ in v})
    logged = {(key, step): value for key, values in expected.items() for step, value in values}
    for row in rows:
        for key, value in history_item(row).items():
            if (key, row["step"]["num"]) in logged:
                assert value == pytest.approx(logged[(key, row["step"]["num"])], rel=1e-12)


def test_the_default_mlflow_store_opens_in_mlflows_own_client_without_any_variable(project):
    """No tracking URI anywhere: the run goes to logs/mlflow.db, which MlflowClient reads as it is
    (MLflow 3's file store would need MLFLOW_ALLOW_FILE_STORE); the artifacts stay under logs/."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    args = ("sample_runconfig.yaml", "--mini", "--cpu", "--epochs=1", "--batch_size=50", "--run_name=default-store")
    result = subprocess.run(
        [sys.executable, "run.py", *args, "--loggers=[tensorboard, jsonl, mlflow]"],
        cwd=project.root,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean,
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    database = project.root / "logs" / "mlflow.db"
    read = (
        "import sys; from mlflow import MlflowClient\n"
        "client = MlflowClient(tracking_uri=sys.argv[1])\n"
        "(run,) = client.search_runs([client.get_experiment_by_name('PendulumModel').experiment_id])\n"
        "steps = [m.step for m in client.get_metric_history(run.info.run_id, 'val/loss')]\n"
        "print(run.data.tags['mlflow.runName'], steps)"
    )
    history = subprocess.run(
        [sys.executable, "-c", read, f"sqlite:///{database}"], capture_output=True, text=True, env=clean, timeout=120
    )
    assert history.returncode == 0, history.stderr
    assert history.stdout.split()[0] == "default-store" and "[0, 2]" in history.stdout
    assert project.written_files() == [] or all(path.startswith("logs/") for path in project.written_files())
