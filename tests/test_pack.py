"""The snapshot's own object writer (record/commit_builder.py, record/pack.py): the trees it writes
are the ones `git add -A` and `write-tree` make, wherever a change falls in git's order of a
tree's entries, and the pack and its index are ones git itself reads, checks and repacks."""

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from helpers import REPO, committed_repository, git, snapshot_as_git_add_all

from src.core.record import pack as pack_module
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


def test_a_large_snapshot_is_one_pack_git_verifies_and_repacks_with_its_files_compressed(tmp_path):
    source = "".join(f"value_{index} = {index} * 2\n" for index in range(400))  # 8 KB of text
    files = {"model.py": "x = 1\n", **{f"d{index}/f.txt": f"{index}\n" for index in range(60)}}
    root = committed_repository(tmp_path / "repo", files)
    (root / "model.py").write_text(source)
    for index in range(60):  # 60 blobs and 60 trees: past LOOSE_BELOW
        (root / f"d{index}" / "f.txt").write_text(f"{index}, edited\n")
    packs = root / ".git" / "objects" / "pack"
    before = set(packs.glob("*.pack"))
    commit = snapshot_as_git_add_all(root, tmp_path)["commit"]
    (written,) = set(packs.glob("*.pack")) - before
    listing = git(root, "verify-pack", "-v", str(written.with_suffix(".idx")))  # checks every object's CRC and id
    sizes = {line.split()[0]: line.split() for line in listing.splitlines() if " blob " in line}
    blob = git(root, "rev-parse", f"{commit}:model.py")
    assert int(sizes[blob][3]) < len(source) // 2  # its size in the pack: compressed
    git(root, "gc", "-q", "--prune=now")
    git(root, "fsck", "--strict", "--no-progress")
    assert git(root, "show", f"{commit}:model.py") == source.rstrip("\n")


def test_a_small_snapshot_goes_in_as_loose_objects(tmp_path):
    """As `git fast-import` and `git push` do below a hundred objects: a pack for each small
    snapshot would soon make git repack the whole repository."""
    root = committed_repository(tmp_path / "repo", {"a.txt": "a\n", "d/b.txt": "b\n"})
    git(root, "gc", "-q")
    packs = sorted((root / ".git" / "objects" / "pack").iterdir())
    (root / "d" / "b.txt").write_text("edited\n")
    commit = snapshot_as_git_add_all(root, tmp_path)["commit"]
    assert sorted((root / ".git" / "objects" / "pack").iterdir()) == packs
    assert "count: 4" in git(root, "count-objects", "-v")  # the blob, two trees and the commit
    git(root, "fsck", "--strict", "--no-progress")
    assert git(root, "show", f"{commit}:d/b.txt") == "edited"


def test_a_pack_whose_index_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    root = committed_repository(tmp_path / "repo", {f"d{index}/f.txt": "x\n" for index in range(60)})
    for index in range(60):
        (root / f"d{index}" / "f.txt").write_text(f"{index}, edited\n")
    packs = sorted((root / ".git" / "objects" / "pack").iterdir())
    write_durably = pack_module._write_durably

    def full_disk(directory, path, data, mode):
        if path.suffix == ".idx":
            raise OSError(28, "No space left on device")
        write_durably(directory, path, data, mode)

    monkeypatch.setattr(pack_module, "_write_durably", full_disk)
    with pytest.raises(OSError, match="No space left"):
        snapshot_gate(root, max_file_mb=10)
    assert sorted((root / ".git" / "objects" / "pack").iterdir()) == packs
    git(root, "fsck", "--strict", "--no-progress")


def snapshot_in_a_process(root: Path, before: str = "", env: dict | None = None) -> str:
    """The snapshot gate's commit for `root`, from a Python process of its own that runs `before`
    first (it has `pack` imported); a process that waits for ever fails the test after 5 minutes."""
    script = (
        f"import fcntl, sys\nsys.path.insert(0, {str(REPO)!r})\nfrom pathlib import Path\n"
        f"from src.core.record import pack\nfrom src.core.record.snapshot import snapshot_gate\n{before}\n"
        f"print(snapshot_gate(Path({str(root)!r}), max_file_mb=10)['commit'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


SMALLEST_PIPES = """
start = pack.ObjectReader.__init__
def small_pipes(self, root):
    start(self, root)
    for pipe in (self.process.stdin, self.process.stdout):
        fcntl.fcntl(pipe.fileno(), 1031, 4096)  # F_SETPIPE_SZ: one page
pack.ObjectReader.__init__ = small_pipes
"""


def test_reading_many_trees_through_the_smallest_pipe_does_not_wait_for_ever(tmp_path):
    """Requests to git cat-file go in runs that fit a pipe of one page (what Linux gives a user
    past its quota of pipe memory): a run that did not fit would wait on cat-file, which waits to
    write its answers."""
    root = committed_repository(tmp_path / "repo", {f"d{index:03d}/f.txt": "x\n" for index in range(300)})
    for index in range(300):
        (root / f"d{index:03d}" / "f.txt").write_text("edited\n")
    commit = snapshot_in_a_process(root, before=SMALLEST_PIPES)
    assert git(root, "rev-parse", f"{commit}:d299/f.txt") == git(root, "hash-object", "d299/f.txt")


def test_a_partial_clone_fetches_nothing_for_a_snapshot(tmp_path):
    """In a clone without blobs, asking git for an object it lacks fetches it from the remote
    (which may be offline, slow, or ask for a password): a snapshot asks refs instead."""
    origin = committed_repository(tmp_path / "origin", {"a.txt": "a\n", "d/b.txt": "b\n"})
    git(origin, "config", "uploadpack.allowFilter", "true")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--filter=blob:none", f"file://{origin}", str(clone))
    (clone / "d" / "b.txt").write_text("edited\n")
    trace = tmp_path / "trace"
    commit = snapshot_in_a_process(clone, env={"GIT_TRACE": str(trace)})
    assert git(clone, "show", f"{commit}:d/b.txt") == "edited"
    commands = [
        line.split("built-in: git ")[1].split()[0]
        for line in trace.read_text().splitlines()
        if "built-in: git " in line
    ]
    assert "cat-file" in commands and "fetch" not in commands


@pytest.mark.parametrize("changed", [1, 120], ids=["loose objects", "a pack"])
def test_the_same_tree_again_writes_nothing(tmp_path, changed):
    root = committed_repository(tmp_path / "repo", {f"d{index}/f.txt": "x\n" for index in range(changed)})
    for index in range(changed):
        (root / f"d{index}" / "f.txt").write_text(f"{index}, edited\n")
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


@pytest.mark.parametrize("size", [0, 1, 1023, 65535, 65536, 200_000])
def test_objects_stored_as_they_are_are_zlib_streams_of_any_size(size):
    """Trees and small blobs go into a pack in stored deflate blocks of at most 65,535 bytes."""
    content = os.urandom(size)
    assert zlib.decompress(b"".join(pack_module._stored(content))) == content


def test_a_tree_missing_from_the_repository_stops_the_snapshot_instead_of_losing_its_files(tmp_path):
    """git status reads the index, not HEAD's trees: a damaged repository (a lost loose object,
    alternates gone, a partial clone offline) shows only when the snapshot reads them."""
    root = committed_repository(tmp_path / "repo", {"d/kept.txt": "kept\n", "d/edited.txt": "before\n"})
    tree = git(root, "rev-parse", "HEAD:d")
    (root / ".git" / "objects" / tree[:2] / tree[2:]).unlink()
    (root / "d" / "edited.txt").write_text("after\n")
    with pytest.raises(RuntimeError, match=f"missing from the repository.*{tree}"):
        snapshot_gate(root, max_file_mb=10)
    assert not git(root, "for-each-ref", "refs/runs-pending")


def test_objects_in_a_repository_shared_by_a_group_stay_writable_by_the_group(tmp_path):
    root = tmp_path / "repo"
    git(tmp_path, "init", "-q", "--shared=group", str(root))
    committed_repository(root, {"d/a.txt": "a\n"})
    git(root, "gc", "-q", "--prune=now")  # no object directories left but git's own
    (root / "d" / "a.txt").write_text("edited\n")
    commit = snapshot_gate(root, max_file_mb=10)["commit"]
    objects = root / ".git" / "objects"
    made = [path for path in objects.iterdir() if len(path.name) == 2]
    assert made and git(root, "cat-file", "-t", commit) == "commit"
    for directory in made:  # as git makes them: group-writable, setgid, as objects/ is
        assert directory.stat().st_mode & 0o7777 == objects.stat().st_mode & 0o7777
        assert all(file.stat().st_mode & 0o777 == 0o444 for file in directory.iterdir())
