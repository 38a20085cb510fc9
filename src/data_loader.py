"""Your datasets. The `*_data_loader_type` keys of a config name classes of this file;
`data_loader_parameters` (`all`, then `train`, `test` or `eval`) are their keyword arguments.

Each item is a dict of tensors with a `supervision` entry (the target); the other
entries go to the model's `forward` by name. `data_directory` holds `train/` and
`test/`; the `train` phase reads `train/`, the validation and rollout phases `test/`.
A constructor with a `mini` parameter learns of --mini before it loads anything.
"""

import math
from pathlib import Path

import numpy as np
import torch

from src.core.base import MINI_ITEMS, BaseDataset


def load_trajectories(directory: Path, items_per_trajectory: int | None = None) -> torch.Tensor:
    """(trajectories, steps + 1, 2) states written by data/generate_pendulum.py. With
    `items_per_trajectory` (under --mini), only the trajectories of the first MINI_ITEMS items
    are read from disk (a memory map reads nothing else)."""
    array = np.load(directory / "trajectories.npy", allow_pickle=False, mmap_mode="r")
    if items_per_trajectory is not None:
        array = array[: math.ceil(MINI_ITEMS / items_per_trajectory)]
    return torch.from_numpy(np.array(array))


class PendulumSteps(BaseDataset):
    """One-step pairs (state, next state): training, and the cheap validation phase."""

    def __init__(self, data_directory: str, split: str, input_noise: float = 0.0, mini: bool = False):
        super().__init__(data_directory, split)
        steps = np.load(self.directory / "trajectories.npy", mmap_mode="r").shape[1] - 1  # items per trajectory
        trajectories = load_trajectories(self.directory, steps if mini else None)
        self.states = trajectories[:, :-1].reshape(-1, 2)
        self.next_states = trajectories[:, 1:].reshape(-1, 2)
        self.input_noise = input_noise  # an augmentation: random, so resume must replay it exactly

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index: int) -> dict:
        state = self.states[index]
        if self.input_noise:
            state = state + self.input_noise * torch.randn(2)
        return {"state": state, "supervision": self.next_states[index]}


class PendulumTrajectories(BaseDataset):
    """Whole trajectories from their first state: the expensive rollout phase."""

    def __init__(self, data_directory: str, split: str, mini: bool = False):
        super().__init__(data_directory, split)
        self.trajectories = load_trajectories(self.directory, 1 if mini else None)

    def __len__(self) -> int:
        return len(self.trajectories)

    def __getitem__(self, index: int) -> dict:
        trajectory = self.trajectories[index]
        return {
            "state": trajectory[0],
            "horizon": torch.tensor(len(trajectory) - 1),
            "supervision": trajectory[1:],
        }
