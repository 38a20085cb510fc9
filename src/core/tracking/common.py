"""What the trackers share: the names a tracker run gets, and a warning's wording."""

from pathlib import Path

from src.core import errors


def warn(message: str) -> None:
    errors.warn(f"warning: {message}")


def run_names(config: dict, run_directory: Path) -> tuple[str, str]:
    """The tracker's project (or experiment) and run names, as the run directory's."""
    return config.get("project_name") or config["model_type"], config.get("run_name") or Path(run_directory).name
