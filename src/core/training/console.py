"""What a run prints: progress bars and a line per epoch, on rank 0 only."""

import sys

from tqdm import tqdm


class Console:
    def __init__(self, enabled: bool = True, progress_bar: bool | str = False):
        """`progress_bar`: True, False, or "auto" (when standard error is a terminal)."""
        self.enabled = enabled
        self.show_progress = enabled and (progress_bar is True or (progress_bar == "auto" and sys.stderr.isatty()))

    def bar(self, total: int, initial: int, description: str, iterable=None) -> tqdm:
        return tqdm(
            iterable,
            total=total,
            initial=initial,
            desc=description,
            disable=not self.show_progress,
            leave=False,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def line(self, text: str) -> None:
        """A line above the progress bar (rank 0)."""
        if self.enabled:
            tqdm.write(text)


QUIET = Console(enabled=False)
