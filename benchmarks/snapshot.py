"""10. `--snapshot`'s gate on the gate benchmark's repository of 50,000 tracked files (100
directories of 500), against a bare `git status --porcelain --ignore-submodules=none` of the
same repository (target: 2x).

Clean, the snapshot gate is the gate (no commit is made). With a few changed files (10 edited in
2 directories, 5 new), it hashes them and writes their directories' trees again. With 1,000
changed files (500 edited across all 100 directories, 500 new) every tree of the repository is
written again: first for a tree never snapshotted before (each repetition gives the 1,000 files
new content: what a run with --snapshot meets after an edit), then for the same tree again (a
sweep's next member: a ref holds its commit, and nothing new is written). The last row measures plain
git's own way to the same commit (`git add -A`, `write-tree` and `commit-tree` on a copy of the
index). Every side is started from Python the same way (subprocesses), alternately. `--steps`
also times each git command of a new 1,000-file snapshot (the median over the repetitions), to
show where its time goes.

python benchmarks/snapshot.py [--repetitions N] [--steps]
"""

import argparse
import itertools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, Comparison, alternate
from git_gate import bare_status, make_repository, timed

sys.path.insert(0, str(REPO))
from src.core.record import commit_builder as builder_module
from src.core.record import git as git_module
from src.core.record import snapshot as snapshot_module
from src.core.record.snapshot import snapshot_gate

CHANGED = 1_000


def change_few_files(root: Path, version: int = 0) -> None:
    """10 tracked files edited in 2 directories, 5 new untracked files."""
    for index in range(10):
        path = root / f"d{index % 2:03d}" / f"f{index % 2 * 500 + index:05d}.txt"
        path.write_text(f"{index} edited, version {version}\n")
    (root / "new").mkdir(exist_ok=True)
    for index in range(5):
        (root / "new" / f"n{index}.txt").write_text(f"new {index}, version {version}\n")


def change_files(root: Path, version: int = 0) -> None:
    """Half of CHANGED tracked files edited (5 in every directory), half new untracked files;
    another `version` gives every one of them other content."""
    for index in range(CHANGED // 2):
        path = root / f"d{index // 5:03d}" / f"f{index // 5 * 500 + index % 5:05d}.txt"
        path.write_text(f"{index} edited, version {version}\n")
    untracked = root / "untracked"
    untracked.mkdir(exist_ok=True)
    for index in range(CHANGED - CHANGED // 2):
        (untracked / f"u{index:04d}.txt").write_text(f"new {index}, version {version}\n")


VERSIONS = itertools.count(1)


def on_a_new_tree(root: Path, change, measured):
    """A function timing `measured` on a tree never committed before: `change` gives the changed
    files new content first (not timed), and git status's stat cache is warmed, as in every
    other row."""

    def time_it() -> float:
        change(root, next(VERSIONS))
        bare_status(root)
        return timed(measured)

    return time_it


def snapshot(root: Path, changed: int) -> None:
    provenance = snapshot_gate(root, max_file_mb=10)
    assert len((provenance.get("snapshot") or {}).get("files", [])) == changed


def plain_git_commit(root: Path) -> None:
    """The same commit by hand: a copy of the index, `git add -A`, `write-tree`, `commit-tree`."""
    index = root / ".git" / "bench-index"
    shutil.copyfile(root / ".git" / "index", index)
    env = {**os.environ, "GIT_INDEX_FILE": str(index)}
    subprocess.run(["git", "add", "-A"], cwd=root, env=env, check=True)
    tree = subprocess.run(["git", "write-tree"], cwd=root, env=env, check=True, capture_output=True, text=True)
    commit = ["git", "commit-tree", tree.stdout.strip(), "-p", "HEAD", "-m", "snapshot"]
    subprocess.run(commit, cwd=root, env=env, check=True, capture_output=True)


def run(repetitions: int, scratch: Path) -> list[Comparison]:
    root = make_repository(scratch)

    def compare(name: str, measured) -> Comparison:
        bare_status(root)  # the index's stat cache, as the user's own git status leaves it
        status = lambda: timed(lambda: bare_status(root))  # noqa: E731
        return alternate(f"{name} / git status", lambda: timed(measured), status, repetitions)

    def compare_new(name: str, change, measured) -> Comparison:
        status = lambda: timed(lambda: bare_status(root))  # noqa: E731
        return alternate(
            f"{name}, a new tree each time / git status", on_a_new_tree(root, change, measured), status, repetitions
        )

    rows = [compare("snapshot gate, clean (no snapshot needed)", lambda: snapshot(root, 0))]
    rows.append(
        compare_new("snapshot gate, 15 changed files in 3 directories", change_few_files, lambda: snapshot(root, 15))
    )
    rows.append(compare("snapshot gate, the same 15 changed files again", lambda: snapshot(root, 15)))
    subprocess.run(["git", "stash", "-q", "--include-untracked"], cwd=root, check=True)
    name = "snapshot gate, 1,000 changed files in 101 directories"
    rows.append(compare_new(name, change_files, lambda: snapshot(root, CHANGED)))
    rows.append(compare("snapshot gate, the same 1,000 changed files again", lambda: snapshot(root, CHANGED)))
    plain_git = lambda: (bare_status(root), plain_git_commit(root))  # noqa: E731
    rows.append(
        compare_new("plain git (status, add -A, write-tree, commit-tree), 1,000 files", change_files, plain_git)
    )
    return rows


def steps(repetitions: int, scratch: Path) -> list[str]:
    """Each git command of the 1,000-file snapshot timed from its start to its end (a command
    started early and read later, the base's date, counts its wait), and the whole gate."""
    root = make_repository(scratch)
    first_snapshot = on_a_new_tree(root, change_files, lambda: snapshot(root, CHANGED))
    timings: dict[str, list[float]] = {}
    started: dict[int, tuple[float, str]] = {}
    start_git, finish_git = git_module.start_git, git_module.finish_git

    def timed_start(args, *rest, **options):
        process = start_git(args, *rest, **options)
        shown = [argument for argument in args if not argument.startswith("--literal")][:3]
        name = " ".join(re.sub(r"[0-9a-f]{40}", "<commit>", argument) for argument in shown)
        started[id(process)] = (time.perf_counter(), name)
        return process

    def timed_finish(process, *rest, **options):
        result = finish_git(process, *rest, **options)
        began, name = started.pop(id(process))
        timings.setdefault(name, []).append(time.perf_counter() - began)
        return result

    for module in (git_module, snapshot_module, builder_module):  # run_git calls start_git and finish_git of git_module
        module.start_git, module.finish_git = timed_start, timed_finish
    try:
        for _ in range(repetitions):
            timings.setdefault("the whole snapshot gate", []).append(first_snapshot())
            timings.setdefault("a bare git status, for scale", []).append(timed(lambda: bare_status(root)))
    finally:
        for module in (git_module, snapshot_module, builder_module):
            module.start_git, module.finish_git = start_git, finish_git
    return [f"| {name} | {statistics.median(values):.4f} s |" for name, values in timings.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--steps", action="store_true", help="also time each git command of the 1,000-file snapshot")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as scratch:
        rows = [comparison.row() for comparison in run(args.repetitions, Path(scratch))]
    print("| measurement | A | B | A / B (median) | spread (min–max) |\n|---|---|---|---|---|")
    print("\n".join(rows))
    if args.steps:
        with tempfile.TemporaryDirectory(prefix="bench-snapshot-steps-") as scratch:
            lines = steps(args.repetitions, Path(scratch))
        print("\n| step of the 1,000-file snapshot (median) | time |\n|---|---|")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
