"""The loop a researcher would write by hand: the baseline of the training-overhead benchmark.

Same model, data, batch size, optimizer, seed, determinism, number of steps and
validation passes as the Trainer in benchmarks/training_overhead.py; no logging
beyond an epoch summary on stdout, no checkpoints.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.data_loader import PendulumSteps
from src.model import PendulumModel


def train_epoch(model, optimizer, loader, after_step=None) -> torch.Tensor:
    """One epoch, as written by hand; the sum of the batch losses."""
    total = torch.zeros(())
    for batch in loader:
        loss = F.mse_loss(model(batch["state"]), batch["supervision"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        total += loss.detach()
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--exit-after-first-step", action="store_true", help="for the start-up benchmark")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    model = PendulumModel(args.hidden_size, args.num_layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    train = DataLoader(PendulumSteps(args.data, "train"), batch_size=args.batch_size, shuffle=True, generator=generator)
    test = DataLoader(PendulumSteps(args.data, "test"), batch_size=args.batch_size)

    after_step = (lambda: os._exit(0)) if args.exit_after_first_step else None
    for epoch in range(args.epochs):
        started = time.monotonic()
        model.train()
        total = train_epoch(model, optimizer, train, after_step)
        model.eval()
        with torch.no_grad():
            val_sum, val_count = 0.0, 0
            for batch in test:
                val_sum += F.mse_loss(model(batch["state"]), batch["supervision"]).item() * len(batch["state"])
                val_count += len(batch["state"])
        seconds = time.monotonic() - started
        train_loss, val_loss = total.item() / len(train), val_sum / val_count
        print(f"epoch {epoch + 1}: train {train_loss:.4g}  val {val_loss:.4g}  ({seconds:.3f} s)")


if __name__ == "__main__":
    main()
