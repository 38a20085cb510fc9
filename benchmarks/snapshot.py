"""8. `--snapshot`'s gate on the gate benchmark's repository of 50,000 tracked files, against a
bare `git status --porcelain --ignore-submodules=none` of the same repository (target: 2x).

Clean, the snapshot gate is the gate (no commit is made). With 1,000 changed files (500
tracked files edited, 500 untracked), it also copies the index, runs `git add -A` and
`write-tree` on the copy, lists the changed paths and writes the commit. Both sides are
started from Python the same way (subprocesses), alternately.

python benchmarks/snapshot.py [--repetitions N]
"""

import argparse
import sys
import tempfile
from pathlib import Path

from common import REPO, Comparison, alternate
from git_gate import bare_status, make_repository, timed

sys.path.insert(0, str(REPO))
from src.core.record.snapshot import snapshot_gate

CHANGED = 1_000


def change_files(root: Path) -> None:
    """Half of CHANGED tracked files edited, half new untracked files."""
    for index in range(CHANGED // 2):
        (root / f"d{index // 5:03d}" / f"f{index:05d}.txt").write_text(f"{index} edited\n")
    untracked = root / "untracked"
    untracked.mkdir()
    for index in range(CHANGED - CHANGED // 2):
        (untracked / f"u{index:04d}.txt").write_text(f"new {index}\n")


def snapshot(root: Path, expect_snapshot: bool) -> None:
    provenance = snapshot_gate(root, max_file_mb=10)
    assert ("snapshot" in provenance) == expect_snapshot
    if expect_snapshot:
        assert len(provenance["snapshot"]["files"]) == CHANGED


def run(repetitions: int, scratch: Path) -> list[Comparison]:
    root = make_repository(scratch)
    bare_status(root)  # build the index's stat cache
    clean = alternate(
        "snapshot gate / git status, clean (no snapshot needed)",
        lambda: timed(lambda: snapshot(root, expect_snapshot=False)),
        lambda: timed(lambda: bare_status(root)),
        repetitions,
    )
    change_files(root)
    bare_status(root)
    dirty = alternate(
        "snapshot gate / git status, 1,000 changed files (commits them)",
        lambda: timed(lambda: snapshot(root, expect_snapshot=True)),
        lambda: timed(lambda: bare_status(root)),
        repetitions,
    )
    return [clean, dirty]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as scratch:
        rows = [comparison.row() for comparison in run(args.repetitions, Path(scratch))]
    print("| measurement | A | B | A / B (median) | spread (min–max) |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
