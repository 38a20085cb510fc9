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


DIVERGED_RADIANS = 0.1  # a rollout has diverged once its angle is this far off


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

    def metrics(self, prediction, target, batch):
        """The rollout's task metrics, per trajectory (logged as rollout/<name>)."""
        if not self.rollout_mode:
            return {}
        angle_error = (prediction[..., 0] - target[..., 0]).abs()  # (batch, horizon), radians
        diverged = angle_error > DIVERGED_RADIANS
        first = torch.where(diverged.any(dim=1), diverged.float().argmax(dim=1), angle_error.shape[1])
        return {"final_angle_error": angle_error[:, -1], "steps_before_divergence": first.float()}

    def figures(self, prediction, target, batch):
        """Predicted against true angle for the rollout's first trajectories."""
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6, 3.5))
        for index in range(min(3, len(target))):
            (line,) = axes.plot(target[index, :, 0].cpu(), label=f"trajectory {index}: true")
            axes.plot(prediction[index, :, 0].cpu(), "--", color=line.get_color(), label="predicted")
        axes.set(xlabel="step (0.05 s)", ylabel="angle θ (rad)", title="rollout: predicted vs true")
        axes.legend(fontsize="x-small", ncol=3)
        # Fixed margins: tight_layout() measures every label first, 35-55 ms a figure here (the figure: 8 ms).
        figure.subplots_adjust(left=0.11, right=0.97, top=0.91, bottom=0.14)
        return {"trajectories": figure}
