"""What the tests share: real git repositories, real `python run.py` and `torchrun`
processes, the short runs they train, and bitwise comparisons of runs. Tests import
from here, never from each other."""

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import warm_start
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.core.phases import WALL_CLOCK_METRICS
from src.core.record.checkpoint import read_checkpoint
from src.core.record.snapshot import snapshot_gate
from src.core.tracking.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "pendulum"

# Commits in temporary repositories need an identity, whatever the machine's git config.
os.environ.update(
    GIT_AUTHOR_NAME="Test",
    GIT_AUTHOR_EMAIL="test@example.invalid",
    GIT_COMMITTER_NAME="Test",
    GIT_COMMITTER_EMAIL="test@example.invalid",
)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def committed_repository(root: Path, files: dict[str, str]) -> Path:
    """A new git repository at `root` (made if need be) with `files` (path -> text) in one commit."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "-b", "main")
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "initial")
    return root


def working_tree(root: Path) -> dict[str, tuple]:
    """Every file and link outside .git: its mode bits and bytes (a link: its target)."""
    files = {}
    for directory, names, filenames in os.walk(root):
        names[:] = [name for name in names if name != ".git"]
        for name in filenames + [name for name in names if (Path(directory) / name).is_symlink()]:
            path = Path(directory) / name
            relative = str(path.relative_to(root))
            if path.is_symlink():
                files[relative] = ("link", os.readlink(path))
            else:
                files[relative] = (stat.S_IMODE(path.lstat().st_mode), path.read_bytes())
    return files


def repository_view(root: Path) -> dict:
    """What the user sees of a repository: status, staged diff, HEAD, branch, marks, stash, files."""
    return {
        "status": git(root, "status", "--porcelain=v2", "--branch", "--untracked-files=all"),
        "staged": git(root, "diff", "--cached", "--binary"),
        "head": git(root, "rev-parse", "--verify", "-q", "HEAD") if _has_commits(root) else None,
        "branch": git(root, "symbolic-ref", "HEAD"),
        "index": git(root, "ls-files", "-s", "-v"),  # stages, blobs, assume-unchanged/skip-worktree tags
        "stash": git(root, "stash", "list"),
        "tree": working_tree(root),
    }


def _has_commits(root: Path) -> bool:
    return subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD"], cwd=root, capture_output=True).returncode == 0


def snapshot_as_git_add_all(root: Path, tmp_path: Path) -> dict:
    """The snapshot gate's provenance for `root`, checked: the repository is left as it was, and
    the snapshot's tree is the one `git add -A` and `git write-tree` make of a copy."""
    before = repository_view(root)
    provenance = snapshot_gate(root, max_file_mb=10)
    assert repository_view(root) == before
    reference = tmp_path / "reference"
    shutil.copytree(root, reference, symlinks=True)
    git(reference, "add", "-A")
    assert git(root, "rev-parse", f"{provenance['commit']}^{{tree}}") == git(reference, "write-tree")
    return provenance


def project_files() -> list[str]:
    listed = git(REPO, "ls-files", "--cached", "--others", "--exclude-standard", "-z")
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


def conflicting_branch(repo: Path) -> None:
    """`other` changes a.txt one way, main another: any operation bringing `other` in conflicts."""
    (repo / "a.txt").write_text("base\n")
    git(repo, "add", "a.txt")
    git(repo, "commit", "-q", "--allow-empty", "-m", "base")
    git(repo, "checkout", "-q", "-b", "other")
    (repo / "a.txt").write_text("theirs\n")
    git(repo, "commit", "-q", "-am", "theirs")
    git(repo, "checkout", "-q", "main")
    (repo / "a.txt").write_text("ours\n")
    git(repo, "commit", "-q", "-am", "ours")


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
        return self.python("run.py", *args, env=env, timeout=timeout, stdin=stdin)

    def python(self, *args: str, env: dict | None = None, timeout: float = 300, stdin=subprocess.DEVNULL) -> Result:
        """`python ARGS` in the project; `python run.py ...` warm where it can (tests/warm_start.py)."""
        environment = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
        completed = None
        if args and args[0] == "run.py" and warm_start.available(env or {}, stdin):
            completed = warm_start.run(list(args), str(self.root), environment, timeout)
        if completed is None:
            completed = subprocess.run(
                [sys.executable, *args],
                cwd=self.root,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=stdin,
                env=environment,
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


# A short logged run of the example: 100 training pairs (--mini) in batches of 8 (13 steps an
# epoch), a training-loss line every 2 steps. Validation reads 13 batches a pass, the rollout 8.
# Figures off (rollout.figures): drawing them is half of a quick run's CPU; the tests of figures turn them on.
QUICK_RUN = (
    "sample_runconfig.yaml",
    "--mini",
    "--cpu",
    "--batch_size=8",
    "--log_every_n_steps=2",
    "--rollout.figures=false",
)
# A random augmentation: its random stream must resume exactly too.
NOISY = ("--modify", "data_loader_parameters.train", "{input_noise: 0.01}")

MINIMAL = """\
description: test
data_directory: data/pendulum
model_type: PendulumModel
loss_function: F.mse_loss
train_data_loader_type: PendulumSteps
epochs: 2
batch_size: 8
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_directory(project: Project, name: str) -> Path:
    return project.root / "logs" / "PendulumModel" / name


def final_state(run) -> dict:
    return read_checkpoint(run / "checkpoints" / "last.pt")


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def logged_values(run) -> list[tuple]:
    """Every logged value of a run but those that measure the machine (throughput, seconds)."""
    records = read_metrics(run)
    return [
        (r["step"], r["epoch"], r["phase"], r["name"], r["value"])
        for r in records
        if f"{r['phase']}/{r['name']}" not in WALL_CLOCK_METRICS
    ]


def tensorboard_values(run) -> dict:
    events = EventAccumulator(str(run))
    events.Reload()
    tags = [tag for tag in events.Tags()["scalars"] if tag not in WALL_CLOCK_METRICS]
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags}


def assert_same_run(reference, resumed):
    """Bitwise the same final training state, logged values and TensorBoard scalars."""
    a, b = final_state(reference), final_state(resumed)
    for part in ("model", "optimizer", "schedule_steps", "progress", "per_rank", "best", "monitor"):
        assert_same_tensors(a[part], b[part], part)
    assert logged_values(resumed) == logged_values(reference)
    assert tensorboard_values(resumed) == tensorboard_values(reference)


# moto's standalone S3 server on localhost, for the archive's tests and benchmark: a real S3 API
# in a process of its own, which a test can stop mid-run. s3fs reaches it through
# AWS_ENDPOINT_URL with the dummy CREDENTIALS in the environment.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class LocalServer:
    """A store's server on a free localhost port, as a process a test can stop mid-run."""

    def __init__(self, name: str, command: list[str], health_path: str, env: dict | None = None):
        """`command` is started with the port appended; the server is up once `health_path` answers."""
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [*command, str(self.port)],
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(600):  # up to a minute on a busy machine
            try:
                urllib.request.urlopen(f"{self.endpoint}{health_path}", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{name} did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


class MotoServer(LocalServer):
    """moto's S3 server, in memory."""

    def __init__(self, env: dict | None = None):
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p"]
        super().__init__("moto server", command, "/moto-api/", env)


# The GCS emulator on localhost (gcp-storage-emulator), for the archive's gs:// tests: the GCS
# JSON API in a process of its own, storage in memory. gcsfs reaches it through
# STORAGE_EMULATOR_HOST (see `GcsEmulator.environment`), and src/core/archive/store.py then sends no
# credentials. The emulator speaks only HTTP, while gcsfs's experimental zonal/hierarchical bucket
# support (on by default) asks for the bucket's layout over gRPC on every call, and retries for
# 60 s against a port that does not speak gRPC: off for the tests. gcsfs reads the switch once,
# when it is first imported, so here, before any test can import it (children inherit it).
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


class GcsEmulator(LocalServer):
    """The GCS emulator, in memory."""

    def __init__(self):
        command = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--in-memory"]
        super().__init__("GCS emulator", [*command, "--quiet", "--port"], "/")  # its health check: "OK"
        self.environment = {"STORAGE_EMULATOR_HOST": self.endpoint}
