"""Your own metrics, loss terms and figures, through every path: a 3-class classifier written
only in the user's files, monitored by accuracy, stopped early, under DDP, killed and resumed."""

import csv
import io
import textwrap

import numpy as np
import pytest
import torch
import yaml
from helpers import NOISY, QUICK_RUN, assert_same_run, logged_values, run_directory
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.core.distributed import DistContext
from src.core.errors import UserError
from src.core.record.checkpoint import read_checkpoint
from src.core.tracking.metrics import read_metrics
from src.core.training.measures import SampleMeans, SplitSamples, figure_png, per_sample, split_loss

CLASSIFIER = '''

class Classifier(BaseModel):
    """Three classes of points in the plane."""

    def __init__(self, hidden_size: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 3))

    def forward(self, features):
        return self.net(features)

    def metrics(self, prediction, target, batch):
        predicted = prediction.argmax(dim=1)
        return {"accuracy": (predicted == target).float(), "_predicted": predicted, "_label": target}

    def split_metrics(self, samples):
        scores = []
        for label in range(3):
            predicted, actual = samples["_predicted"] == label, samples["_label"] == label
            true_positives = (predicted & actual).sum().item()
            scores.append(2 * true_positives / max(1, predicted.sum().item() + actual.sum().item()))
        return {"macro_f1": sum(scores) / 3}


def cross_entropy_with_terms(prediction, target):
    """A loss with named terms: what is minimised, and its parts."""
    cross_entropy = F.cross_entropy(prediction, target)
    penalty = prediction.pow(2).mean()
    return {"loss": cross_entropy + 0.001 * penalty, "cross_entropy": cross_entropy, "logit_penalty": penalty}
'''

POINTS = '''

class Points(BaseDataset):
    """points.npy (n, 2) and labels.npy (n,) of a split."""

    def __init__(self, data_directory, split):
        super().__init__(data_directory, split)
        self.points = torch.from_numpy(np.load(self.directory / "points.npy"))
        self.labels = torch.from_numpy(np.load(self.directory / "labels.npy"))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"features": self.points[index], "supervision": self.labels[index]}
'''

CONFIG = """\
description: three blobs
data_directory: data/blobs
model_type: Classifier
loss_function: cross_entropy_with_terms
train_data_loader_type: Points
test_data_loader_type: Points
eval_data_loader_type: Points
epochs: 6
batch_size: 16
eval_batch_size: 8
log_every_n_steps: 4
optimizer: {lr: 0.01}
checkpoint: {monitor: val/accuracy, mode: max, keep_recent: 10}
"""


def make_blobs(directory, train: int = 240, test: int = 61) -> None:
    """Three overlapping Gaussian blobs; 61 test points split unevenly over 2 ranks and batches of 8."""
    generator = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [1.5, 0.5], [0.5, 1.5]])
    for split, count in (("train", train), ("test", test)):
        labels = np.arange(count) % 3
        points = centres[labels] + generator.normal(scale=0.8, size=(count, 2))
        (directory / split).mkdir(parents=True)
        np.save(directory / split / "points.npy", points.astype(np.float32))
        np.save(directory / split / "labels.npy", labels.astype(np.int64))


@pytest.fixture
def classifier(project):
    """The project with the classifier in the user's files only, its data and its config, committed."""
    with open(project.root / "src" / "model.py", "a") as stream:
        stream.write("\nimport torch.nn.functional as F\n" + textwrap.dedent(CLASSIFIER))
    with open(project.root / "src" / "data_loader.py", "a") as stream:
        stream.write(textwrap.dedent(POINTS))
    (project.root / "blobs.yaml").write_text(CONFIG)
    project.commit("a classifier")
    make_blobs(project.root / "data" / "blobs")  # data/ is ignored, as for the example
    return project


def values(run, name: str) -> list[tuple[int, float]]:
    phase, _, metric = name.partition("/")
    return [(r["step"], r["value"]) for r in read_metrics(run) if (r["phase"], r["name"]) == (phase, metric)]


def test_a_classifier_logs_accuracy_and_f1_and_keeps_the_most_accurate_checkpoint(classifier):
    result = classifier.run("blobs.yaml", "--cpu", "--run_name=accuracy")
    assert result.returncode == 0, result.stderr
    run = classifier.root / "logs" / "Classifier" / "accuracy"
    logged = {(r["phase"], r["name"]) for r in read_metrics(run)}
    for phase in ("val", "rollout"):
        for name in ("loss", "accuracy", "macro_f1", "cross_entropy", "logit_penalty"):
            assert (phase, name) in logged
        assert (phase, "_predicted") not in logged  # values named _... only feed split_metrics
    assert {("train", "cross_entropy"), ("train", "logit_penalty"), ("train", "grad_norm")} <= logged
    accuracy = values(run, "val/accuracy")
    assert len(accuracy) == 6 and all(0 <= value <= 1 for _, value in accuracy)
    best_step, best_value = max(accuracy, key=lambda item: (item[1], -item[0]))  # the first of the highest
    best = read_checkpoint(run / "checkpoints" / "best.pt")
    assert best["progress"]["global_step"] == best_step
    metadata = yaml.safe_load((run / "metadata.yaml").read_text())
    assert metadata["best"]["metric"] == "val/accuracy" and metadata["best"]["value"] == best_value
    assert f"val/accuracy={best_value:.4g}" in classifier.run("--runs").stdout  # the table's best is the monitor

    evaluated = classifier.run("--evaluate", str(run), "--cpu", "--checkpoints", "best")
    assert evaluated.returncode == 0, evaluated.stderr
    (row,) = csv.DictReader(io.StringIO((run / "evaluation.csv").read_text()))
    assert float(row["val/accuracy"]) == best_value and "rollout/macro_f1" in row  # a column each


def test_early_stopping_stops_after_patience_evaluations_without_improvement(classifier):
    # min_delta 0.5: after the first evaluation nothing counts as better, so it stops after 2 more.
    args = ("blobs.yaml", "--cpu", "--early_stopping.patience=2", "--early_stopping.min_delta=0.5")
    result = classifier.run(*args, "--run_name=stopped")
    assert result.returncode == 0, result.stderr
    run = classifier.root / "logs" / "Classifier" / "stopped"
    metadata = yaml.safe_load((run / "metadata.yaml").read_text())
    assert metadata["status"] == "finished" and metadata["epochs_done"] == 3
    assert metadata["stop_reason"].startswith("early stopping: val/accuracy did not improve by more than 0.5")
    assert sorted({r["epoch"] for r in read_metrics(run)}) == [1, 2, 3]
    assert read_checkpoint(run / "checkpoints" / "last.pt")["monitor"]["evaluations_without_improvement"] == 2


def test_a_misspelled_monitor_fails_before_anything_is_written(classifier):
    result = classifier.run("blobs.yaml", "--cpu", "--checkpoint.monitor=val/acuracy")
    assert result.returncode == 2
    assert "did you mean 'val/accuracy'" in result.stderr and "Traceback" not in result.stderr
    assert not (classifier.root / "logs").exists()  # no run directory, no step trained
    result = classifier.run("blobs.yaml", "--cpu", "--checkpoint.monitor=vall/accuracy")
    assert result.returncode == 2 and "'<phase>/<name>'" in result.stderr  # a phase this run lacks: at once


def test_a_misspelled_monitor_of_a_distributed_run_is_refused_once_before_torchrun_starts(classifier):
    """`python run.py` starting torchrun checks the name first: a worker's exit 2 would be
    retried `max_restarts` times, each saying the same."""
    result = classifier.run(
        "blobs.yaml",
        "--cpu",
        "--checkpoint.monitor=val/acuracy",
        "--distributed.nproc_per_node=2",
        "--distributed.max_restarts=2",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("did you mean 'val/accuracy'") == 1
    assert "starting 2 processes" not in result.stdout  # refused before torchrun
    assert not (classifier.root / "logs").exists()


def test_two_processes_log_the_same_metrics_as_one(classifier):
    """61 test points over 2 ranks in batches of 8 (31 and 30): nothing lost, nothing counted twice."""
    common = ("blobs.yaml", "--cpu", "--epochs=2")
    assert classifier.torchrun(*common, "--run_name=ddp").returncode == 0
    single = classifier.run(*common, "--batch_size=32", "--run_name=single")  # the same global batch
    assert single.returncode == 0, single.stderr
    ddp, one = (classifier.root / "logs" / "Classifier" / name for name in ("ddp", "single"))
    for name in ("val/accuracy", "val/macro_f1", "rollout/accuracy", "rollout/macro_f1", "val/cross_entropy"):
        for (step_a, a), (step_b, b) in zip(values(ddp, name), values(one, name), strict=True):
            assert step_a == step_b and a == pytest.approx(b, rel=2e-4, abs=1e-9), name
    assert len(values(ddp, "val/macro_f1")) == 2


def test_a_run_with_metrics_figures_and_early_stopping_resumes_exactly(project):
    """The example's rollout metrics and figure, monitored with early stopping, killed mid-epoch."""
    args = (*QUICK_RUN, "--epochs=4", "--checkpoint.every_n_steps=5", "--rollout.figures=true", *NOISY)
    args += ("--checkpoint.monitor=rollout/final_angle_error", "--early_stopping.patience=3")
    assert project.run(*args, "--run_name=reference").returncode == 0
    killed = project.run(*args, "--run_name=killed", env={"TEMPLATE_FAULT": "train_step:22"})
    assert killed.returncode == -9, killed.stderr
    resumed = project.run("--resume", str(run_directory(project, "killed")))
    assert resumed.returncode == 0, resumed.stderr
    reference, run = run_directory(project, "reference"), run_directory(project, "killed")
    assert_same_run(reference, run)  # weights, every logged value (custom metrics included), TensorBoard
    assert any(name == "final_angle_error" for _, _, _, name, _ in logged_values(run))
    figures = sorted(path.name for path in (reference / "figures" / "rollout").iterdir())
    assert figures == sorted(path.name for path in (run / "figures" / "rollout").iterdir()) and len(figures) == 5
    assert (
        read_checkpoint(run / "checkpoints" / "last.pt")["monitor"]
        == read_checkpoint(reference / "checkpoints" / "last.pt")["monitor"]
    )


def test_the_example_draws_its_rollouts_into_files_and_tensorboard(project):
    result = project.run(*QUICK_RUN, "--epochs=1", "--rollout.figures=true", "--run_name=figures")
    assert result.returncode == 0, result.stderr
    run = run_directory(project, "figures")
    files = sorted((run / "figures" / "rollout").iterdir())
    assert [path.name for path in files] == ["000000000-trajectories.png", "000000013-trajectories.png"]
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("rollout/trajectories")
    assert [image.step for image in images] == [0, 13]
    for image, path in zip(images, files, strict=True):
        assert image.encoded_image_string == path.read_bytes()  # the same PNG in both places
        with Image.open(path) as picture:
            assert picture.size == (image.width, image.height) == (600, 350)


# The pieces, alone -------------------------------------------------------------------------


def test_a_loss_may_return_terms_and_must_name_what_is_minimised():
    terms = split_loss({"loss": torch.tensor(1.0), "kl": 0.5})
    assert set(terms) == {"loss", "kl"} and float(terms["kl"]) == 0.5
    assert set(split_loss(torch.tensor(2.0))) == {"loss"}
    with pytest.raises(UserError, match="expected a tensor, or a dict with a tensor 'loss'"):
        split_loss({"total": torch.tensor(1.0)})


def test_metrics_are_one_value_per_sample_and_sample_weighted():
    with pytest.raises(UserError, match=r"expected one value per sample, shape \(4,\)"):
        per_sample("accuracy", torch.ones(4, 2), 4)
    means = SampleMeans(torch.device("cpu"))
    means.add("accuracy", per_sample("accuracy", torch.tensor([1.0, 1.0, 1.0]), 3).sum(), 3)
    means.add("accuracy", per_sample("accuracy", torch.tensor(0.0), 1).sum(), 1)  # a batch mean, of 1
    assert means.reduce(DistContext()) == {"accuracy": 0.75}  # not the mean of batch means (0.5)


def test_split_samples_keep_the_dataset_order():
    split = SplitSamples()
    split.add({"label": torch.tensor([0, 1])})
    split.add({"label": torch.tensor([2])})
    assert split.gather(DistContext())["label"].tolist() == [0, 1, 2]


def test_image_tensors_become_pngs():
    png = figure_png("ramp", torch.linspace(0, 1, 12).reshape(1, 3, 4))
    with Image.open(io.BytesIO(png)) as picture:
        assert picture.size == (4, 3) and picture.getpixel((3, 2)) == 255
    with pytest.raises(UserError, match="expected \\(C, H, W\\)"):
        figure_png("bad", torch.zeros(2, 3, 4))


def test_a_misspelled_monitor_lists_every_phases_own_metrics(project):
    """Monitoring a validation name the model logs only in its rollout phase: the message names
    the rollout's own metrics too, so the user sees what exists."""
    result = project.run(*QUICK_RUN, "--checkpoint.monitor=val/final_angle_error")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    listed = result.stderr.split("it can monitor: ")[1]
    assert "rollout/final_angle_error" in listed and "rollout/steps_before_divergence" in listed
    assert not (project.root / "logs").exists()
