"""The learning-rate schedule: a pure function of the optimizer step, as in nanoGPT,
so a checkpoint needs no scheduler state and a resumed run continues it exactly."""

import math

from src.core.config.validation import Config


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


def zero_lr_extension(scheduler: Config, schedule_steps: int, planned_steps: int) -> str | None:
    """A warning when a run extended beyond its schedule (`--resume --epochs=N`) would take steps
    at learning rate 0: the schedule keeps its length, so after it ends the rate stays at
    `final_lr_fraction`, and at 0 those steps change nothing. None when they would not."""
    ended = max(schedule_steps, scheduler.warmup_steps + 1)  # from here on the rate is final_lr_fraction
    if planned_steps <= ended or lr_factor(ended, scheduler, schedule_steps) > 0:
        return None
    return (
        f"warning: this run now lasts {planned_steps} optimizer steps, but its learning-rate schedule "
        f"({scheduler.type}, down to final_lr_fraction {scheduler.final_lr_fraction}) ended at step "
        f"{ended}: the {planned_steps - ended} steps after it train at lr 0 and change "
        "nothing. Start a new run with a longer schedule instead (e.g. its epochs, or scheduler.total_steps), "
        "or branch one from a checkpoint: --resume RUN_DIR --from-step N --scheduler.total_steps=M."
    )
