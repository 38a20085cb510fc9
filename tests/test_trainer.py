"""The three-phase Trainer: end to end in a real clone, and its parts in-process."""

import math
import textwrap
import threading

import pytest
import torch
import yaml
from helpers import DATA, DELETE, assert_same_run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.core.config.loader import parse_yaml
from src.core.config.schema import project_schema
from src.core.config.validation import finalize
from src.core.distributed import DistContext
from src.core.record.checkpoint import CheckpointWriteError, read_checkpoint
from src.core.seeding import seed_everything
from src.core.tracking.metrics import read_metrics
from src.core.training import output as output_module
from src.core.training.build import Task, build_datasets, build_model, resolve_loss_function
from src.core.training.output import RunOutput
from src.core.training.start import FRESH
from src.core.training.trainer import Trainer, build_trainer, rescaled_position
from src.model import PendulumModel

SCHEMA = project_schema()

QUICK = ("--mini", "--cpu")


def test_end_to_end_run_directory(project):
    edits = ("--find-replace", "Pendulum", "Pendulum", "--delete", "rollout", "--modify", "seed", "0")
    result = project.run("sample_runconfig.yaml", *QUICK, *edits, "--epochs=2", "--log_every_n_steps=1")
    assert result.returncode == 0, result.stderr
    (run,) = project.run_directories()
    assert run.parent.name == "PendulumModel"

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["git"]["commit"] == project.git("rev-parse", "HEAD")
    assert config["git"]["branch"] == "main"
    assert config["flags"] == {
        "cpu": True,
        "mini": True,
        "no_logging": False,
        "allow_dirty_repo": False,
        "snapshot": False,
        "y": False,
        "log_dir": None,
        "run_parent": None,
        "requeue": False,
        "find_replace": [["Pendulum", "Pendulum"]],
        "delete": ["rollout"],
        "modify": [["seed", "0"]],
        "overrides": {"epochs": "2", "log_every_n_steps": "1"},
    }
    assert config["command_line"] == (
        "python run.py sample_runconfig.yaml --mini --cpu --find-replace Pendulum Pendulum --delete rollout "
        "--modify seed 0 --epochs=2 --log_every_n_steps=1"
    )
    assert config["epochs"] == 2 and config["environment"]["torch"] == str(torch.__version__)
    assert config["data_fingerprint"]["files"] == 3 and config["data_fingerprint"]["content_sha256"]
    assert "torch==" in (run / "packages.txt").read_text()

    records = read_metrics(run)
    logged_names = {
        ("train", "loss"),
        ("train", "lr"),
        ("train", "grad_norm"),
        ("train", "samples_per_second"),
        ("train", "epoch_loss"),
        ("train", "epoch_seconds"),
        ("system", "peak_rss_mb"),  # what the machine did each epoch (on a GPU, peak_cuda_mb too)
        ("system", "data_wait_fraction"),
        ("val", "loss"),
        ("rollout", "loss"),
        ("rollout", "final_angle_error"),  # the example's own metrics
        ("rollout", "steps_before_divergence"),
    }
    assert {(r["phase"], r["name"]) for r in records} == logged_names
    assert all(set(r) == {"step", "epoch", "phase", "name", "value", "time"} for r in records)
    baseline = [r for r in records if r["epoch"] == 0]
    assert {r["phase"] for r in baseline} == {"val", "rollout"} and all(r["step"] == 0 for r in baseline)

    events = EventAccumulator(str(run))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {f"{phase}/{name}" for phase, name in logged_names}
    assert set(events.Tags()["images"]) == {"rollout/trajectories"}  # the example's figure, at each rollout
    assert sorted(path.name for path in (run / "figures" / "rollout").iterdir()) == [
        "000000000-trajectories.png",  # the baseline, then each epoch (rollout.every_n_epochs deleted: 1)
        "000000002-trajectories.png",
        "000000004-trajectories.png",
    ]
    for record in records:
        logged = {e.step: e.value for e in events.Scalars(f"{record['phase']}/{record['name']}")}
        assert logged[record["step"]] == pytest.approx(record["value"], rel=1e-6)

    metadata = yaml.safe_load((run / "metadata.yaml").read_text())
    assert metadata["status"] == "finished" and metadata["epochs_done"] == 2
    assert metadata["stop_reason"] == "finished all 2 epochs"
    assert metadata["commit"] == config["git"]["commit"] and metadata["summary"] == ""
    rollout = [r["value"] for r in records if (r["phase"], r["name"]) == ("rollout", "loss")]
    assert metadata["best"]["metric"] == "rollout/loss" and metadata["best"]["value"] == min(rollout[1:])
    assert metadata["last_checkpoint"] == "checkpoints/step-000000004.pt"  # 100 samples / batch 64: 2 steps an epoch

    for name in ("best.pt", "last.pt"):
        state = read_checkpoint(run / "checkpoints" / name)
        model = PendulumModel(**config["model_parameters"])
        model.load_state_dict(state["model"])
        assert state["commit"] == config["git"]["commit"]
    assert read_checkpoint(run / "checkpoints" / "last.pt")["progress"]["global_step"] == 4


def test_rollout_figures_false_draws_none_and_changes_no_result(project):
    """rollout.figures: false skips the model's `figures` hook (and its PNGs); every logged value
    and the final weights are those of the same run with its figures."""
    common = ("sample_runconfig.yaml", *QUICK, "--epochs=2", "--log_every_n_steps=1")
    for name, figures in (("drawn", "true"), ("not-drawn", "false")):
        result = project.run(*common, f"--run_name={name}", f"--rollout.figures={figures}")
        assert result.returncode == 0, result.stderr
    drawn, not_drawn = (project.root / "logs" / "PendulumModel" / name for name in ("drawn", "not-drawn"))
    assert len(list((drawn / "figures" / "rollout").glob("*.png"))) == 3  # the baseline and 2 epochs
    assert not (not_drawn / "figures").exists()
    events = EventAccumulator(str(not_drawn))
    events.Reload()
    assert events.Tags()["images"] == []
    assert_same_run(drawn, not_drawn)


def test_project_name_and_run_name_choose_the_directory(project):
    result = project.run("sample_runconfig.yaml", *QUICK, "--epochs=1", "--project_name=demo", "--run_name=first")
    assert result.returncode == 0, result.stderr
    result = project.run("sample_runconfig.yaml", *QUICK, "--epochs=1", "--project_name=demo", "--run_name=first")
    assert result.returncode == 0, result.stderr  # never reused: the second gets a suffix
    assert [path.name for path in project.run_directories()] == ["first", "first-2"]


def test_a_forking_user_adds_a_model_and_a_dataset(project):
    """Exactly what the README's "Add your own model" section says to do."""
    with open(project.root / "src" / "model.py", "a") as stream:
        stream.write(
            textwrap.dedent(
                '''

                class LinearDynamics(BaseModel):
                    """A linear next-state model."""

                    def __init__(self, bias: bool = True):
                        super().__init__()
                        self.linear = nn.Linear(2, 2, bias=bias)

                    def forward(self, position, velocity):
                        return self.linear(torch.stack([position, velocity], dim=-1))
                '''
            )
        )
    with open(project.root / "src" / "data_loader.py", "a") as stream:
        stream.write(
            textwrap.dedent(
                '''

                class SplitStates(BaseDataset):
                    """Angle and velocity as separate batch entries."""

                    def __init__(self, data_directory, split, scale: float = 1.0):
                        super().__init__(data_directory, split)
                        trajectories = load_trajectories(self.directory)
                        self.states = scale * trajectories[:, :-1].reshape(-1, 2)
                        self.targets = scale * trajectories[:, 1:].reshape(-1, 2)

                    def __len__(self):
                        return len(self.states)

                    def __getitem__(self, index):
                        state = self.states[index]
                        return {"position": state[0], "velocity": state[1], "supervision": self.targets[index]}
                '''
            )
        )
    project.write_config(
        "linear.yaml",
        model_type="LinearDynamics",
        model_parameters={"bias": False},
        train_data_loader_type="SplitStates",
        test_data_loader_type="SplitStates",
        eval_data_loader_type=DELETE,
        data_loader_parameters={"all": {"scale": 0.5}},
        loss_function="F.l1_loss",
    )
    project.commit("my model")
    result = project.run("linear.yaml", *QUICK, "--epochs=2")
    assert result.returncode == 0, result.stderr
    (run,) = project.run_directories()
    assert run.parent.name == "LinearDynamics"
    assert {r["phase"] for r in read_metrics(run)} == {"train", "val", "system"}  # system: the machine's values
    assert yaml.safe_load((run / "metadata.yaml").read_text())["best"]["metric"] == "val/loss"


# --- in-process ----------------------------------------------------------------------

BASE = f"""\
description: unit
data_directory: {DATA}
model_type: PendulumModel
model_parameters: {{hidden_size: 16}}
loss_function: F.mse_loss
train_data_loader_type: PendulumSteps
test_data_loader_type: PendulumSteps
eval_data_loader_type: PendulumTrajectories
epochs: 2
batch_size: 32
"""


def make_trainer(extra: str = "", mini: bool = True, run_directory=None) -> Trainer:
    config = finalize({**parse_yaml(BASE, "base"), **(parse_yaml(extra, "extra") or {})}, SCHEMA)
    seed_everything(config.seed)
    datasets = build_datasets(config, str(DATA), mini=mini)
    task = Task(build_model(config), resolve_loss_function(config.loss_function), datasets)
    output = None
    if run_directory is not None:  # logged as a new run there
        output = RunOutput.open(run_directory, config, FRESH.log_position, {"commit": None, "config_hash": None}, {})
    return build_trainer(config, task, DistContext(), output)


def test_rollout_mode_is_entered_for_the_rollout_phase_only_and_left():
    trainer = make_trainer()
    modes = []
    original = PendulumModel.forward

    def spy(self, state, horizon=None):
        modes.append(("rollout" if self.rollout_mode else "step", horizon is not None))
        return original(self, state, horizon)

    trainer.model.forward = spy.__get__(trainer.model)
    metrics, _ = trainer.evaluator.evaluate("val")
    assert set(modes) == {("step", False)} and set(metrics) == {"val/loss"}
    modes.clear()
    metrics, details = trainer.evaluator.evaluate("rollout")
    assert set(modes) == {("rollout", True)} and trainer.model.rollout_mode is False
    assert sum(item["samples"] for item in details) == 64  # the 64 test trajectories


def test_rollout_mode_is_left_even_when_the_rollout_fails():
    trainer = make_trainer()

    def broken(self, state, horizon=None):
        raise RuntimeError("boom")

    trainer.model.forward = broken.__get__(trainer.model)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.evaluator.evaluate("rollout")
    assert trainer.model.rollout_mode is False


@pytest.mark.parametrize(
    ("extra", "phases", "monitor"),
    [
        ("", {"train", "val", "rollout"}, "rollout/loss"),
        ("eval_data_loader_type: null\n", {"train", "val"}, "val/loss"),
        ("test_data_loader_type: null\n", {"train", "rollout"}, "rollout/loss"),
        ("test_data_loader_type: null\neval_data_loader_type: null\n", {"train"}, "train/epoch_loss"),
    ],
)
def test_each_evaluation_phase_can_be_switched_off(tmp_path, extra, phases, monitor):
    trainer = make_trainer(extra, run_directory=tmp_path)
    trainer.fit()
    assert {r["phase"] for r in read_metrics(tmp_path)} == phases | {"system"}  # system: the machine's values
    assert trainer.monitor.metric == monitor and trainer.monitor.best["value"] is not None


def test_rollout_every_n_epochs_and_always_after_the_last(tmp_path):
    trainer = make_trainer("epochs: 5\nrollout: {every_n_epochs: 2}\n", run_directory=tmp_path)
    trainer.fit()
    assert [r["epoch"] for r in read_metrics(tmp_path) if (r["phase"], r["name"]) == ("rollout", "loss")] == [2, 4, 5]


def test_rollout_max_samples_bounds_the_expensive_phase():
    _, details = make_trainer("rollout: {max_samples: 10}\n").evaluator.evaluate("rollout")
    assert sum(item["samples"] for item in details) == 10


def test_evaluation_does_not_disturb_training(tmp_path):
    """The evaluation phases run on their own random streams: training is the same with or without them."""
    noisy = "data_loader_parameters: {train: {input_noise: 0.01}}\n"
    with_evaluation = make_trainer(noisy)
    with_evaluation.fit()
    without = make_trainer(noisy + "test_data_loader_type: null\neval_data_loader_type: null\n")
    without.fit()
    for a, b in zip(with_evaluation.model.parameters(), without.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_gradient_accumulation_matches_a_larger_batch():
    """Two accumulated batches of 16 take the same step as one batch of 32 (up to float rounding)."""
    accumulated = make_trainer("batch_size: 16\ngradient_accumulation_steps: 2\nepochs: 1\n")
    whole = make_trainer("batch_size: 32\nepochs: 1\n")
    assert accumulated.steps_per_epoch == whole.steps_per_epoch == 4
    accumulated.train_one_epoch()
    whole.train_one_epoch()
    assert accumulated.progress.global_step == whole.progress.global_step == 4
    for a, b in zip(accumulated.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_gradient_clipping_bounds_the_update():
    trainer = make_trainer("gradient_clip_norm: 1.0e-6\noptimizer: {type: SGD, lr: 1.0}\nepochs: 1\n")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_one_epoch()
    moved = math.sqrt(sum(((p - q) ** 2).sum().item() for p, q in zip(trainer.model.parameters(), before, strict=True)))
    assert moved <= trainer.steps_per_epoch * 1e-6 * 1.01


def test_the_example_really_learns(tmp_path):
    trainer = make_trainer("epochs: 3\nevaluate_before_training: true\n", mini=False, run_directory=tmp_path)
    trainer.fit()
    rollout = [r["value"] for r in read_metrics(tmp_path) if (r["phase"], r["name"]) == ("rollout", "loss")]
    assert rollout[-1] < rollout[0] / 10


def test_determinism_setting_reaches_torch_and_torch_compile():
    import os
    import subprocess
    import sys

    from src.core.seeding import configure_determinism

    configure_determinism(True, torch.device("cpu"))
    assert torch.are_deterministic_algorithms_enabled()
    # torch.compile's flag, whether its config is imported before or after.
    script = (
        "import torch, sys; from src.core.seeding import configure_determinism;"
        "configure_determinism(True, torch.device('cpu'));"
        "import torch._inductor.config as c; sys.exit(0 if c.deterministic else 1)"
    )
    assert subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": "."}).returncode == 0
    configure_determinism("auto", torch.device("cpu"))
    assert torch.are_deterministic_algorithms_enabled()
    configure_determinism(False, torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled()
    configure_determinism(True, torch.device("cpu"))


def test_a_position_saved_with_another_world_size_keeps_the_share_of_the_epoch():
    assert rescaled_position(9, saved_world_size=1, world_size=2, accumulation=1, batches=7) == 4
    assert rescaled_position(4, saved_world_size=2, world_size=1, accumulation=1, batches=13) == 8
    assert rescaled_position(5, saved_world_size=2, world_size=1, accumulation=4, batches=13) == 8
    assert rescaled_position(12, saved_world_size=4, world_size=1, accumulation=1, batches=40) == 40


def test_checkpoint_interval_in_seconds_saves_mid_epoch(tmp_path):
    extra = "epochs: 1\nlog_every_n_steps: 1\ncheckpoint: {keep_recent: 100}\n"
    (tmp_path / "often").mkdir()
    (tmp_path / "never").mkdir()
    make_trainer(extra + "checkpoint_interval: 1.0e-6\n", run_directory=tmp_path / "often").fit()
    steps = sorted(int(path.stem[5:]) for path in (tmp_path / "often" / "checkpoints").glob("step-*.pt"))
    assert steps == [1, 2, 3, 4]  # 100 mini items in batches of 32: three mid-epoch, one at the end
    make_trainer(extra + "checkpoint_interval: 0\n", run_directory=tmp_path / "never").fit()
    assert [path.name for path in (tmp_path / "never" / "checkpoints").glob("step-*.pt")] == ["step-000000004.pt"]


@pytest.mark.parametrize(("mode", "best_epoch"), [("min", 3), ("max", 1)])
def test_the_monitored_metric_and_mode_choose_the_best_checkpoint(tmp_path, mode, best_epoch):
    extra = f"epochs: 3\ncheckpoint: {{monitor: train/epoch_loss, mode: {mode}}}\n"
    trainer = make_trainer(extra, run_directory=tmp_path)
    trainer.fit()  # the training loss falls epoch after epoch
    losses = [r["value"] for r in read_metrics(tmp_path) if r["name"] == "epoch_loss"]
    assert losses == sorted(losses, reverse=True)
    assert (trainer.monitor.best["metric"], trainer.monitor.best["epoch"]) == ("train/epoch_loss", best_epoch)
    best = read_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["progress"]["epoch"] == best_epoch


def test_a_finished_run_says_what_to_do_next(project):
    result = project.run("sample_runconfig.yaml", "--mini", "--cpu", "--epochs=1", "--run_name=done")
    assert result.returncode == 0, result.stderr
    run = project.root / "logs" / "PendulumModel" / "done"
    after = result.stdout.split(f"finished: {run}")[1]
    assert f"-m tensorboard.main --logdir {run.parent}" in after
    assert f"{run / 'checkpoints' / 'best.pt'}  (rollout/loss " in after
    assert f"run.py --evaluate {run}" in after and "run.py --runs" in after


@pytest.mark.parametrize("released_first", ["tensorboard", "figures"])
def test_a_checkpoint_shows_only_once_tensorboard_and_the_figures_hold_what_was_logged_before_it(
    tmp_path, monkeypatch, released_first
):
    """A resume from a checkpoint does not log its steps again, so the checkpoint's writer waits
    for TensorBoard's thread and the figures' before the checkpoint shows. Here both are held
    back, as a loaded machine holds them, and let go one after the other; what the run directory
    holds once the checkpoint shows is what a kill -9 at that moment would leave."""
    from src.core.tracking.tensorboard import EventFile

    release = {"tensorboard": threading.Event(), "figures": threading.Event()}
    write_event = EventFile.write

    def held_back(self, event):
        if event.HasField("summary"):
            release["tensorboard"].wait()
        write_event(self, event)

    monkeypatch.setattr(EventFile, "write", held_back)
    png = tiny_png()
    trainer = make_trainer(run_directory=tmp_path)
    trainer.output.log(0, 1, {"train/loss": 0.5})
    trainer.output.figures.put(0, "rollout", "picture", lambda encoder: (release["figures"].wait(), png)[1])
    trainer.save_checkpoint(links=("last",))
    writing = trainer.output.checkpoints._thread
    for name in (released_first, *(set(release) - {released_first})):
        writing.join(timeout=1.0)
        assert writing.is_alive() and not list((tmp_path / "checkpoints").glob("step-*.pt")), f"{name} still held"
        release[name].set()
    writing.join()
    assert (tmp_path / "checkpoints" / "step-000000000.pt").exists()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("train/loss")] == [(0, 0.5)]
    assert [image.encoded_image_string for image in events.Images("rollout/picture")] == [png]
    trainer.output.close()


def tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_checkpoint_whose_figure_was_not_written_fails_and_does_not_show(tmp_path):
    """A figure lost to a full disk would be missing from every resume from that checkpoint: the
    checkpoint fails as its own write would, naming the disk's error."""

    def full_disk(encoder):
        raise OSError(28, "No space left on device")

    trainer = make_trainer(run_directory=tmp_path)
    trainer.output.figures.put(0, "rollout", "picture", full_disk)
    trainer.save_checkpoint(links=("last",))
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        trainer.output.wait()
    assert not list((tmp_path / "checkpoints").glob("*.pt"))


def test_a_checkpoint_waits_for_its_figures_only_so_long_then_shows_with_a_warning(tmp_path, monkeypatch, capsys):
    """A figure that takes longer than FIGURE_WAIT_SECONDS (a heavy plot, a stuck helper) must not
    cost a preempted run its checkpoint."""
    monkeypatch.setattr(output_module, "FIGURE_WAIT_SECONDS", 0.5)
    release = threading.Event()
    trainer = make_trainer(run_directory=tmp_path)
    trainer.output.figures.put(0, "rollout", "picture", lambda encoder: (release.wait(), tiny_png())[1])
    trainer.save_checkpoint(links=("last",))
    trainer.output.wait()
    assert (tmp_path / "checkpoints" / "step-000000000.pt").exists()
    assert "were not written within 0.5 s" in capsys.readouterr().err
    release.set()
    trainer.output.close()
