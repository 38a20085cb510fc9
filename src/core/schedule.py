"""The learning-rate schedule: a pure function of the optimizer step, as in nanoGPT,
so a checkpoint needs no scheduler state and a resumed run continues it exactly."""

import math

from src.core.config import Config


def lr_factor(step: int, scheduler: Config, total_steps: int) -> float:
    """The learning rate at optimizer step `step`, as a fraction of `optimizer.lr`:
    linear warmup over `warmup_steps`, then `scheduler.type` down to `final_lr_fraction`
    at `total_steps` (constant: 1 after the warmup)."""
    if step < scheduler.warmup_steps:
        return (step + 1) / scheduler.warmup_steps
    done = min(1.0, (step - scheduler.warmup_steps) / max(1, total_steps - scheduler.warmup_steps))
    final = scheduler.final_lr_fraction
    if scheduler.type == "cosine":
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * done))
    if scheduler.type == "linear":
        return 1 - (1 - final) * done
    return 1.0
