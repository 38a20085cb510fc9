"""Where training starts, decided once (src/core/commands/resume.py) and handed down as a value:
from step 0, continuing a run from its own checkpoint, or branching a new run from another
run's checkpoint (--from-step)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Fresh:
    """A new run, from step 0 (also a resumed run that had no valid checkpoint yet)."""

    log_position = (0, -1)  # metrics.jsonl from its first byte; TensorBoard hides every earlier step

    def restore(self, trainer) -> None:
        pass


@dataclass(frozen=True)
class Continue:
    """A run continued from its own checkpoint, exactly as if it had never stopped."""

    state: dict

    @property
    def log_position(self) -> tuple[int, int]:
        """metrics.jsonl is cut back to what the checkpoint covers; later TensorBoard steps are hidden."""
        return self.state["logging"]["metrics_bytes"], self.state["progress"]["global_step"]

    def restore(self, trainer) -> None:
        trainer.load_state_dict(self.state)


@dataclass(frozen=True)
class Branch:
    """A new run from another run's checkpoint: its weights, optimizer moments, position and
    random streams, with this run's own optimizer settings, schedule, best and patience; its
    log starts empty, at the next step."""

    state: dict
    log_position = (0, -1)

    def restore(self, trainer) -> None:
        trainer.load_branch(self.state)


Start = Fresh | Continue | Branch
FRESH = Fresh()
