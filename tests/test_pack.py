"""The snapshot's own pack writer (record/pack.py): the trees it writes are the ones `git add -A`
and `write-tree` make, wherever a change falls in git's order of a tree's entries, and the pack
and its index are ones git itself reads, checks and repacks."""

import os
import subprocess
from pathlib import Path

import pytest
from helpers import committed_repository, git, snapshot_as_git_add_all

from src.core.record.snapshot import snapshot_gate

# Names around a directory `a` in git's order: "a-b" and "a.txt" come before "a/" (a directory
# sorts as if its name ended in a slash), "a0" after it.
AROUND = {"a-b": "1\n", "a.txt": "2\n", "a/x": "3\n", "a0": "4\n", "b": "5\n"}


def modify_around(root: Path) -> None:
    """Every name changes: a deletion before the directory shifts every entry after it."""
    (root / "a.txt").unlink()
    for path in ("a-b", "a/x", "a0", "b"):
        (root / path).write_text("edited\n")


def directory_becomes_a_file(root: Path) -> None:
    (root / "a" / "x").unlink()
    (root / "a").rmdir()
    (root / "a").write_text("a file now\n")
    (root / "a-b").write_text("edited\n")


def file_becomes_a_directory(root: Path) -> None:
    (root / "a0").unlink()
    (root / "a0").mkdir()
    (root / "a0" / "inside").write_text("now a directory\n")
    (root / "a.txt").write_text("edited\n")


def new_names_between(root: Path) -> None:
    for path in ("a+", "a-a", "a/w", "a1", "0"):
        (root / path).write_text("new\n")
    (root / "a-b").write_text("edited\n")


@pytest.mark.parametrize(
    "change", [modify_around, directory_becomes_a_file, file_becomes_a_directory, new_names_between]
)
def test_changes_anywhere_in_a_trees_order_give_the_tree_git_add_all_makes(tmp_path, change):
    root = committed_repository(tmp_path / "repo", AROUND)
    change(root)
    provenance = snapshot_as_git_add_all(root, tmp_path)
    git(root, "fsck", "--strict", "--no-progress")
    assert provenance["snapshot"]["files"]


def test_an_entry_whose_bytes_occur_inside_another_name_is_found_where_it_is(tmp_path):
    """A name may hold what looks like another entry, and come before it ("a 100644 b" with the same
    content as "b", "c 40000 d" before the directory "d"): such a tree is read whole, not searched."""
    files = {"b": "same\n", "a 100644 b": "same\n", "d/inside": "1\n", "c 40000 d": "2\n"}
    root = committed_repository(tmp_path / "repo", files)
    (root / "b").write_text("edited\n")
    (root / "d" / "inside").write_text("edited\n")
    provenance = snapshot_as_git_add_all(root, tmp_path)
    assert provenance["snapshot"]["files"] == ["b", "d/inside"]
    assert git(root, "show", f"{provenance['commit']}:a 100644 b") == "same"


def test_the_pack_is_one_git_verifies_and_repacks_and_holds_large_files_compressed(tmp_path):
    source = "".join(f"value_{index} = {index} * 2\n" for index in range(400))  # 8 KB of text
    root = committed_repository(tmp_path / "repo", {"model.py": "x = 1\n", "small.txt": "s\n"})
    (root / "model.py").write_text(source)
    (root / "small.txt").write_text("edited\n")
    packs = root / ".git" / "objects" / "pack"
    before = set(packs.glob("*.pack"))
    commit = snapshot_as_git_add_all(root, tmp_path)["commit"]
    (written,) = set(packs.glob("*.pack")) - before
    listing = git(root, "verify-pack", "-v", str(written.with_suffix(".idx")))  # checks every object's CRC and id
    sizes = {line.split()[0]: line.split() for line in listing.splitlines() if " blob " in line}
    blob = git(root, "rev-parse", f"{commit}:model.py")
    assert int(sizes[blob][3]) < len(source) // 2  # size in the pack, compressed
    git(root, "gc", "-q", "--prune=now")
    git(root, "fsck", "--strict", "--no-progress")
    assert git(root, "show", f"{commit}:model.py") == source.rstrip("\n")


def test_the_same_tree_again_writes_nothing(tmp_path):
    root = committed_repository(tmp_path / "repo", {"a.txt": "a\n"})
    (root / "a.txt").write_text("edited\n")
    first = snapshot_gate(root, max_file_mb=10)["commit"]
    files = lambda: sorted((path.name, path.stat().st_ino) for path in (root / ".git" / "objects").rglob("*"))  # noqa: E731
    written = files()
    assert snapshot_gate(root, max_file_mb=10)["commit"] == first
    assert files() == written


def test_a_sha256_repository_gets_sha256_objects(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    if subprocess.run(["git", "init", "-q", "--object-format=sha256", str(root)], capture_output=True).returncode:
        pytest.skip("this git makes no SHA-256 repositories")
    (root / "kept.txt").write_text("kept\n")
    (root / "d").mkdir()
    (root / "d" / "edited.txt").write_text("before\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "initial")
    (root / "d" / "edited.txt").write_text("after\n")
    (root / "new.bin").write_bytes(os.urandom(4096))
    commit = snapshot_as_git_add_all(root, tmp_path)["commit"]
    assert len(commit) == 64
    git(root, "fsck", "--strict", "--no-progress")
    assert git(root, "show", f"{commit}:d/edited.txt") == "after"
