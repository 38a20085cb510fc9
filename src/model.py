"""Your models. `model_type` in a config names a class of this file; `model_parameters`
are its keyword arguments.

A batch is a dict of tensors. Its `supervision` entry is the target; every other
entry is passed to `forward` by name (the example's batches hold `state`, and
`horizon` in the rollout phase). Inside `with model.rollout():` the Trainer's
third phase runs, and `forward` switches to the expensive behaviour.
"""

import torch
from torch import nn

from src.core.base import BaseModel


def loss_function_example(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A loss of your own: `loss_function: loss_function_example` in a config."""
    return (prediction - target).abs().mean()


class PendulumModel(BaseModel):
    """Predicts the pendulum's next state; in rollout mode, a whole trajectory from its own predictions."""

    def __init__(self, hidden_size: int = 64, num_layers: int = 2):
        super().__init__()
        layers, width = [], 2
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.Tanh()]
            width = hidden_size
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))

    def step(self, state: torch.Tensor) -> torch.Tensor:
        return state + 0.1 * self.net(state)  # a small residual: one step changes the state a little

    def forward(self, state: torch.Tensor, horizon: torch.Tensor | None = None) -> torch.Tensor:
        if not self.rollout_mode:
            return self.step(state)  # (batch, 2): the next state
        states = []
        for _ in range(int(horizon.max())):
            state = self.step(state)
            states.append(state)
        return torch.stack(states, dim=1)  # (batch, horizon, 2): the whole trajectory
