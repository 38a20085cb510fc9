"""Shared fixtures: real git repositories and real `python run.py` processes.

`project` is a temporary copy of this checkout (its tracked and untracked,
not-ignored files, as they are now) committed into a fresh git repository, with
the example data beside it; tests run `run.py` there exactly as a user would.
"""

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "pendulum"

# The Ctrl-C tests need children that stop on SIGINT. A runner that starts the tests in the
# background has SIGINT ignored (as non-interactive shells do for background jobs), and an
# ignored signal stays ignored in every child; a handled one is reset to the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Commits in temporary repositories need an identity, whatever the machine's git config.
os.environ.update(
    GIT_AUTHOR_NAME="Test",
    GIT_AUTHOR_EMAIL="test@example.invalid",
    GIT_COMMITTER_NAME="Test",
    GIT_COMMITTER_EMAIL="test@example.invalid",
)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def project_files() -> list[str]:
    listed = git(REPO, "ls-files", "--cached", "--others", "--exclude-standard", "-z")
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Project:
    root: Path

    def run(self, *args: str, env: dict | None = None, timeout: float = 300, stdin=subprocess.DEVNULL) -> Result:
        """`python run.py ARGS` in the project, as a user would type it (no terminal)."""
        completed = subprocess.run(
            [sys.executable, "run.py", *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=stdin,
            env={**os.environ, "PYTHONHASHSEED": "0", **(env or {})},
        )
        return Result(completed.returncode, completed.stdout, completed.stderr)

    def torchrun(
        self, *args: str, nproc: int = 2, launcher=("--standalone",), env: dict | None = None, timeout: float = 600
    ) -> Result:
        """`torchrun ... run.py ARGS` in the project: real worker processes over gloo."""
        command = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc-per-node={nproc}", "run.py"]
        completed = subprocess.run(
            [*command, *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONHASHSEED": "0", **(env or {})},
        )
        return Result(completed.returncode, completed.stdout, completed.stderr)

    def git(self, *args: str) -> str:
        return git(self.root, *args)

    def commit(self, message: str = "change") -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")

    def write_config(self, name: str, **changes) -> str:
        """A copy of the sample config with `changes` (dotted keys allowed), committed."""
        config = yaml.safe_load((self.root / "sample_runconfig.yaml").read_text())
        for dotted, value in changes.items():
            node = config
            *parents, last = dotted.split(".")
            for parent in parents:
                node = node.setdefault(parent, {})
            if value is DELETE:
                node.pop(last, None)
            else:
                node[last] = value
        (self.root / name).write_text(yaml.safe_dump(config, sort_keys=False))
        return name

    def run_directories(self) -> list[Path]:
        return sorted(path.parent for path in (self.root / "logs").glob("*/*/config.yaml"))

    def written_files(self) -> list[str]:
        """Files that are not in the last commit, ignored ones included (the example data aside)."""
        output = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
            cwd=self.root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        new = [line[3:] for line in output.splitlines() if line[:2] in ("??", "!!")]
        return [path for path in new if not path.startswith("data/") and "__pycache__" not in path]


DELETE = object()  # write_config(..., key=DELETE) removes a key


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
