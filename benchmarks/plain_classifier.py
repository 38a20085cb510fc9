"""The small classifier trained by hand: the baseline of benchmarks/classifier_overhead.py.

Runs in the benchmark's clone of the project, whose src/ holds MLPClassifier and
ClusterPoints. Same model, data, batch size, optimizer, seed, determinism and steps as
the Trainer's run; after each epoch a validation pass, a rollout pass and a bare
`torch.save` of the model and optimizer; the validation and rollout passes compute the
accuracy, and the rollout's first batch is drawn as a confusion matrix (the model's own
`confusion_figure`) and saved as PNG, as the Trainer's figures are.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

os.environ.setdefault("MPLBACKEND", "Agg")  # figures without a display, as run.py draws them
sys.path.insert(0, os.getcwd())  # the clone holding the classifier (the benchmark runs this there)
from src.data_loader import ClusterPoints
from src.model import MLPClassifier, confusion_figure


@torch.no_grad()
def evaluate(model, loader, figure_file: Path | None = None) -> tuple[float, float]:
    """The mean loss and accuracy; the first batch's confusion matrix into `figure_file`."""
    total, correct, count = 0.0, 0.0, 0
    for batch in loader:
        prediction, target = model(batch["features"]), batch["supervision"]
        total += F.cross_entropy(prediction, target).item() * len(target)
        correct += (prediction.argmax(1) == target).float().sum().item()
        count += len(target)
        if figure_file is not None:
            import matplotlib.pyplot as plt

            figure = confusion_figure(prediction, target)
            figure.savefig(figure_file, format="png", dpi=100)
            plt.close(figure)
            figure_file = None
    return total / count, correct / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--checkpoints", required=True, help="a directory for the per-epoch torch.save")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    model = MLPClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    train = DataLoader(ClusterPoints(args.data, "train"), batch_size=args.batch_size, shuffle=True, generator=generator)
    test = DataLoader(ClusterPoints(args.data, "test"), batch_size=args.batch_size)
    checkpoints = Path(args.checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)

    for epoch in range(args.epochs):
        started = time.monotonic()
        model.train()
        total = torch.zeros(())
        for batch in train:
            loss = F.cross_entropy(model(batch["features"]), batch["supervision"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        model.eval()
        val_loss, val_accuracy = evaluate(model, test)
        model.rollout_mode = True
        rollout_loss, rollout_accuracy = evaluate(model, test, checkpoints / f"confusion-{epoch + 1}.png")
        model.rollout_mode = False
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoints / "last.pt")
        seconds = time.monotonic() - started
        print(
            f"epoch {epoch + 1}: train {total.item() / len(train):.4g}  val {val_loss:.4g} "
            f"({val_accuracy:.3f})  rollout {rollout_loss:.4g} ({rollout_accuracy:.3f})  ({seconds:.3f} s)"
        )


if __name__ == "__main__":
    main()
