"""The base classes of your model and datasets: what the Trainer expects, with defaults.

Subclass `BaseModel` in `src/model.py` and `BaseDataset` in `src/data_loader.py`, and
override only what you need; each hook says in a few lines what it is for. They live
here, in the machinery, so that your files hold only your code and later fixes of the
template merge into a fork without conflicts (README, "Add your own model").
"""

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from src.core.seeding import seed_worker


class BaseModel(nn.Module):
    """A model: `forward` takes the batch's entries by name (all but `supervision`)."""

    def __init__(self):
        super().__init__()
        self.rollout_mode = False

    @contextlib.contextmanager
    def rollout(self):
        """Switch `forward` to rollout behaviour for a block, and back even on errors."""
        previous, self.rollout_mode = self.rollout_mode, True
        try:
            yield self
        finally:
            self.rollout_mode = previous

    def configure_optimizer(self, optimizer) -> torch.optim.Optimizer:
        """The config's `optimizer` section: a torch.optim class and its arguments.
        Override for parameter groups."""
        optimizer_class = getattr(torch.optim, optimizer.type)
        return optimizer_class(
            self.parameters(), lr=optimizer.lr, weight_decay=optimizer.weight_decay, **optimizer.parameters
        )

    def transform(self, supervision: torch.Tensor) -> torch.Tensor:
        """Map the batch's `supervision` to what the loss compares the prediction with."""
        return supervision

    def metrics(self, prediction, target: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Your own metrics of a validation or rollout batch, ONE VALUE PER SAMPLE:
        `{"accuracy": (prediction.argmax(1) == target).float()}`. Each is logged as
        `<phase>/<name>`, the mean over every sample of the split and every rank.
        `self.rollout_mode` says which phase. Names starting with `_` are not logged:
        they only hand per-sample values to `split_metrics`. Runs under `torch.no_grad`."""
        return {}

    def split_metrics(self, samples: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics of a whole split at once (F1, AUROC, a median), exact under DDP.
        `samples` holds what `metrics` returned for every sample of the split, gathered
        from every rank, in dataset order. Logged as `<phase>/<name>`."""
        return {}

    def figures(self, prediction, target: torch.Tensor, batch: dict) -> dict:
        """Pictures of the rollout phase's first batch: `{name: matplotlib figure or image
        tensor (C, H, W) or (H, W), values in [0, 1] or uint8}`. They go to TensorBoard's
        Images tab and to `RUN_DIR/figures/rollout/<step>-<name>.png`. Import matplotlib
        inside this method, so runs without figures start fast."""
        return {}

    def outputs(self, prediction, target: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """What `--evaluate RUN_DIR --save-outputs` keeps of a validation or rollout batch, ONE ROW
        PER SAMPLE (first dimension: the batch's samples), into
        `evaluation/<name>/<checkpoint>.outputs.npz` as `<phase>/<key>`. Default: the
        prediction and the target (when the prediction is a tensor). Return only what you
        will look at (completions as token ids, a few predicted values) when outputs are large."""
        if not isinstance(prediction, torch.Tensor):
            return {}
        return {"prediction": prediction, "target": target}


MINI_ITEMS = 100  # what --mini keeps by default


class BaseDataset(Dataset):
    """A dataset of one split, with the hooks the Trainer uses.

    `--mini` before loading: give your constructor a `mini: bool = False` parameter and it is
    passed (True under --mini), so a large dataset can read only the files of its first
    MINI_ITEMS items. `mini_subset()` is still applied to what the constructor built."""

    def __init__(self, data_directory: str, split: str):
        # `split` is "train", "test" (validation) or "eval" (rollout): the config's names.
        # Training reads train/; validation and the rollout phase read test/.
        self.directory = Path(data_directory) / ("train" if split == "train" else "test")

    def mini_subset(self) -> Dataset:
        """What `--mini` trains on: by default the first MINI_ITEMS (100) items."""
        return Subset(self, range(min(MINI_ITEMS, len(self))))

    @classmethod
    def get_dataloader(cls, dataset, *, batch_size, sampler, num_workers, generator, pin_memory) -> DataLoader:
        """Batch the dataset. Override to change batching (a `collate_fn`...), but keep
        `sampler`, `generator` and `seed_worker`: they make runs resumable exactly."""
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            generator=generator,
            worker_init_fn=seed_worker,
            pin_memory=pin_memory,
        )
