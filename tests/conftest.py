"""Shared fixtures: real git repositories and real `python run.py` processes.

`project` is a temporary copy of this checkout (its tracked and untracked,
not-ignored files, as they are now) committed into a fresh git repository, with
the example data beside it; tests run `run.py` there exactly as a user would.
The helpers the tests share are in tests/helpers.py.
"""

import compileall
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import DATA, REPO, Project, committed_repository, git, project_files

# The slow tier (make test runs it, make test-quick leaves it out): real torchrun groups, the
# Slurm cluster, the object stores, the kill-and-resume matrices, the trackers' services.
SLOW_MODULES = {"test_distributed", "test_slurm", "test_archive", "test_resume", "test_trackers", "test_fuzz"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slurm"):  # one cluster: its tests run on one worker (--dist loadgroup)
            item.add_marker(pytest.mark.xdist_group("slurm"))


def checked_data_directories() -> list[str]:
    """The data directory of the config `make check CONFIG=...` checks, when it lies inside the
    project (relative to its root): a fork's own data goes into the test project beside the example's."""
    config = Path(os.environ.get("CHECK_CONFIG", "sample_runconfig.yaml"))
    path = config if config.is_absolute() else REPO / config
    try:
        directory = (yaml.safe_load(path.read_text()) or {}).get("data_directory")
    except (OSError, yaml.YAMLError, AttributeError):
        return []  # the check itself reports what is wrong with the config
    if not isinstance(directory, str) or Path(directory).is_absolute():
        return []  # an absolute data_directory is read where it is
    return [directory] if (REPO / directory).is_dir() else []


# The Ctrl-C tests need children that stop on SIGINT. A runner that starts the tests in the
# background has SIGINT ignored (as non-interactive shells do for background jobs), and an
# ignored signal stays ignored in every child; a handled one is reset to the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def project_snapshot(tmp_path_factory) -> Path:
    """The checkout's files, copied once per session."""
    if not (DATA / "train" / "trajectories.npy").exists():
        subprocess.run([sys.executable, str(REPO / "data" / "generate_pendulum.py")], check=True)
    snapshot = tmp_path_factory.mktemp("snapshot") / "project"
    for name in project_files():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    shutil.copytree(DATA, snapshot / "data" / "pendulum")
    for directory in checked_data_directories():  # the checked config's own data (ignored by git)
        shutil.copytree(REPO / directory, snapshot / directory, dirs_exist_ok=True)
    # Compiled once here, not by the first run.py of every test (a source a test edits is
    # compiled again: its time stamp no longer matches).
    compileall.compile_dir(snapshot / "src", quiet=1)
    return snapshot


@pytest.fixture
def project(project_snapshot, tmp_path) -> Project:
    """A fresh git repository holding the project, committed and clean."""
    root = tmp_path / "project"
    shutil.copytree(project_snapshot, root)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "initial")
    return Project(root)


@pytest.fixture
def repo(tmp_path) -> Path:
    """A small git repository with one commit, for the gate's cases."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "a.txt").write_text("a\n")
    (root / "b.txt").write_text("b\n")
    (root / ".gitignore").write_text("ignored/\n*.log\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "initial")
    return root


@pytest.fixture
def with_submodule(repo, tmp_path):
    """`repo` with a submodule `lib` (its own repository, one commit), committed."""
    library = committed_repository(tmp_path / "library", {"lib.py": "x = 1\n"})
    git(repo, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(library), "lib")
    git(repo, "commit", "-q", "-m", "add submodule")
    return repo
