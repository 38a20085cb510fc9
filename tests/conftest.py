"""Shared fixtures: real git repositories and real `python run.py` processes.

`project` is a temporary copy of this checkout (its tracked and untracked,
not-ignored files, as they are now) committed into a fresh git repository, with
the example data beside it; tests run `run.py` there exactly as a user would.
The helpers the tests share are in tests/helpers.py.
"""

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DATA, REPO, Project, git, project_files

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
    return snapshot


@pytest.fixture
def project(project_snapshot, tmp_path) -> Project:
    """A fresh git repository holding the project, committed and clean."""
    root = tmp_path / "project"
    shutil.copytree(project_snapshot, root, ignore=shutil.ignore_patterns("__pycache__"))
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
