"""3. The git gate on a repository of 50,000 tracked files and 1,000 untracked ones,
against a bare `git status --porcelain --ignore-submodules=none` of the same repository.

Both are started from Python the same way (a subprocess), alternately. With the
untracked files the gate refuses (that is its answer); without them it passes and
also reads the remotes and whether the commit is on one.
"""

import subprocess
import sys
import time
from pathlib import Path

from common import REPO, Comparison, alternate

sys.path.insert(0, str(REPO))
from src.core.errors import Refusal
from src.core.record.git import gate

TRACKED, UNTRACKED = 50_000, 1_000


def make_repository(scratch: Path) -> Path:
    """50,000 tracked files in 100 directories, committed and packed as a clone's objects are.
    Git's automatic gc is off: the commit of 50,000 loose objects would start one in the
    background, repacking on the benchmark's cores while it measures."""
    root = scratch / "gate-repository"
    for index in range(TRACKED):
        directory = root / f"d{index // 500:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{index:05d}.txt").write_text(f"{index}\n")
    env = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@x"}
    commands = (["init", "-q", "-b", "main"], ["config", "gc.auto", "0"], ["add", "-A"], ["commit", "-q", "-m", "x"])
    for args in (*commands, ["gc", "-q"]):
        subprocess.run(["git", *args], cwd=root, check=True, env={**env, "PATH": "/usr/bin:/bin"})
    return root


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def gate_refusing(root: Path) -> None:
    try:
        gate(root)
    except Refusal:
        return
    raise AssertionError("the gate should refuse the untracked files")


def bare_status(root: Path) -> None:
    subprocess.run(
        ["git", "status", "--porcelain", "--ignore-submodules=none"], cwd=root, check=True, capture_output=True
    )


def run(repetitions: int, scratch: Path) -> list[Comparison]:
    root = make_repository(scratch)
    subprocess.run(["git", "status"], cwd=root, check=True, capture_output=True)  # build the index's stat cache
    untracked = root / "untracked"
    untracked.mkdir()
    for index in range(UNTRACKED):
        (untracked / f"u{index:04d}.txt").write_text("x")
    dirty = alternate(
        "gate / git status, 1,000 untracked (refuses)",
        lambda: timed(lambda: gate_refusing(root)),
        lambda: timed(lambda: bare_status(root)),
        repetitions,
    )
    subprocess.run(["rm", "-rf", str(untracked)], check=True)
    clean = alternate(
        "gate / git status, clean (passes, reads remotes)",
        lambda: timed(lambda: gate(root)),
        lambda: timed(lambda: bare_status(root)),
        repetitions,
    )
    return [dirty, clean]
