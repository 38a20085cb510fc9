"""The same task under PyTorch Lightning (logger, checkpointing, progress bar and model summary
off), as a third column of the training-overhead benchmark when Lightning is installed
(benchmarks/requirements-lightning.txt)."""

import argparse
import sys
from pathlib import Path

import lightning
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.data_loader import PendulumSteps
from src.model import PendulumModel


class Module(lightning.LightningModule):
    def __init__(self, hidden_size: int, num_layers: int):
        super().__init__()
        self.model = PendulumModel(hidden_size, num_layers)

    def training_step(self, batch, index):
        return F.mse_loss(self.model(batch["state"]), batch["supervision"])

    def validation_step(self, batch, index):
        return F.mse_loss(self.model(batch["state"]), batch["supervision"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    train = DataLoader(PendulumSteps(args.data, "train"), batch_size=args.batch_size, shuffle=True, generator=generator)
    test = DataLoader(PendulumSteps(args.data, "test"), batch_size=args.batch_size)
    trainer = lightning.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Module(args.hidden_size, args.num_layers), train, test)


if __name__ == "__main__":
    main()
