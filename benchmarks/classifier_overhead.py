"""6. What users fork: a small classifier, whole process, logged and not, against a plain loop.

The pendulum of benchmark 1 is the template's own example; what researchers write first is
more often a small classifier. Here: an MLP (16 features -> 128 -> 128 -> 3 classes, 19k
parameters) on 12,000 synthetic points of three overlapping Gaussian clusters (3,000 for
testing), batch 64, AdamW, 10 epochs (1,880 steps), each epoch followed by a validation
pass and a rollout pass (test-time augmentation: the mean of 8 shifted copies of each
input) with an accuracy metric, a confusion-matrix figure of the rollout's first batch
(matplotlib, saved as PNG) and a checkpoint. The benchmark writes the classes into a clone of the project
(`MODEL_CODE`, `DATA_CODE`: they are the user's code, not the template's) and the data
into its `data/classify`, deterministically; `plain_classifier.py` does the same work by
hand, a `torch.save` per epoch included.

Each side is a whole process (start-up included, as a user waits for it), measured in wall
time and in CPU time (user + system, from `os.wait4`), alternating plain, logged and
`--no-logging` runs; the ratios are medians of those pairs with their spread. Every side
runs with one intra-op thread (OMP_NUM_THREADS=1, what `torch_threads: 1` sets): on a
shared 2-core machine two threads made this model's epochs 3 to 90 times slower, varying
with the neighbours' load, which no ratio survives.
"""

import subprocess
from pathlib import Path

import numpy as np
import yaml
from common import Comparison, measure, python, scratch_project

MODEL_CODE = '''

class MLPClassifier(BaseModel):
    """Classes from features; rollout: the mean logits over 8 shifted copies of each input."""

    SHIFTS = (-0.2, -0.15, -0.1, -0.05, 0.05, 0.1, 0.15, 0.2)

    def __init__(self, in_features: int = 16, hidden_size: int = 128, num_classes: int = 3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.rollout_mode:
            return self.net(features)
        return torch.stack([self.net(features + shift) for shift in self.SHIFTS]).mean(dim=0)

    def metrics(self, prediction, target, batch):
        return {"accuracy": (prediction.argmax(1) == target).float()}

    def figures(self, prediction, target, batch):
        return {"confusion": confusion_figure(prediction, target)}


def confusion_figure(prediction: torch.Tensor, target: torch.Tensor):
    """The confusion matrix of a batch, as a matplotlib figure (the plain loop draws the same)."""
    import itertools

    import matplotlib.pyplot as plt

    classes = prediction.shape[1]
    counts = torch.zeros(classes, classes)
    for true, guessed in zip(target.tolist(), prediction.argmax(1).tolist()):
        counts[true, guessed] += 1
    figure, axes = plt.subplots(figsize=(4, 4))
    axes.imshow(counts.numpy(), cmap="Blues")
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for row, column in itertools.product(range(classes), range(classes)):
        axes.text(column, row, int(counts[row, column]), ha="center", va="center")
    return figure
'''

DATA_CODE = '''

class ClusterPoints(BaseDataset):
    """Points and their cluster labels, from features.npy and labels.npy of the split."""

    def __init__(self, data_directory: str, split: str):
        super().__init__(data_directory, split)
        self.features = torch.from_numpy(np.load(self.directory / "features.npy", allow_pickle=False))
        self.labels = torch.from_numpy(np.load(self.directory / "labels.npy", allow_pickle=False))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return {"features": self.features[index], "supervision": self.labels[index]}
'''

FEATURES, CLASSES, TRAIN, TEST, EPOCHS, BATCH = 16, 3, 12_000, 3_000, 10, 64
NAME = "small classifier (MLP, 19k parameters, 10 epochs)"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def write_data(directory: Path, seed: int = 0) -> None:
    """Three Gaussian clusters in 16 dimensions, close enough to overlap: the same bytes every time."""
    generator = np.random.default_rng(seed)
    centres = generator.normal(scale=1.0, size=(CLASSES, FEATURES)).astype(np.float32)
    for split, count in (("train", TRAIN), ("test", TEST)):
        labels = generator.integers(0, CLASSES, size=count)
        features = centres[labels] + generator.normal(scale=1.5, size=(count, FEATURES)).astype(np.float32)
        (directory / split).mkdir(parents=True, exist_ok=True)
        np.save(directory / split / "features.npy", features.astype(np.float32))
        np.save(directory / split / "labels.npy", labels.astype(np.int64))


def prepare(scratch: Path) -> Path:
    """A clone of the project with the classifier appended to the user's files, committed, and its data."""
    project = scratch_project(scratch / "classifier")
    with open(project / "src" / "model.py", "a") as model, open(project / "src" / "data_loader.py", "a") as data:
        model.write(MODEL_CODE)
        data.write(DATA_CODE)
    config = {
        "description": "benchmark: a small classifier",
        "data_directory": "data/classify",
        "model_type": "MLPClassifier",
        "model_parameters": {"in_features": FEATURES, "hidden_size": 128, "num_classes": CLASSES},
        "loss_function": "F.cross_entropy",
        "train_data_loader_type": "ClusterPoints",
        "test_data_loader_type": "ClusterPoints",
        "eval_data_loader_type": "ClusterPoints",
        "epochs": EPOCHS,
        "batch_size": BATCH,
        "optimizer": {"type": "AdamW", "lr": 1.0e-3},
    }
    (project / "classifier.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for args in (["add", "-A"], ["commit", "-q", "-m", "a small classifier"]):
        subprocess.run(["git", *args], cwd=project, check=True)
    write_data(project / "data" / "classify")
    return project


def commands(project: Path, checkpoints: Path) -> dict[str, list[str]]:
    plain = [python(), str(Path(__file__).with_name("plain_classifier.py")), "--data", "data/classify"]
    return {
        "plain": [*plain, "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--checkpoints", str(checkpoints)],
        "logged": [python(), "run.py", "classifier.yaml", "--cpu"],
        "logging off": [python(), "run.py", "classifier.yaml", "--cpu", "--no-logging"],
    }


def run(scratch: Path, repetitions: int) -> list[Comparison]:
    project = prepare(scratch)
    sides = commands(project, scratch / "plain-checkpoints")
    wall = {side: [] for side in sides}
    cpu = {side: [] for side in sides}
    for repetition in range(repetitions + 1):  # alternate the sides; the first round warms up
        for side, command in sides.items():
            measured = measure(command, project, env=ONE_THREAD)
            if repetition:
                wall[side].append(measured.seconds)
                cpu[side].append(measured.cpu_seconds)
    rows = []
    for a, b in (("logged", "plain"), ("logging off", "plain"), ("logged", "logging off")):
        label = "trainer" if a == "logged" else "trainer, logging off"
        versus = "plain" if b == "plain" else "trainer, logging off"
        rows.append(Comparison(f"{NAME}: {label} / {versus}, wall time", wall[a], wall[b]))
        rows.append(Comparison(f"{NAME}: {label} / {versus}, CPU time", cpu[a], cpu[b]))
    return rows
