"""--snapshot: a dirty tree's run is logged against a commit of the tree on a hidden ref,
and the user's repository (HEAD, branch, index, stash, working tree) is left exactly as it was."""

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml
from helpers import (
    QUICK_RUN,
    Project,
    committed_repository,
    conflicting_branch,
    git,
    repository_view,
    snapshot_as_git_add_all,
)

from src.core.errors import Refusal
from src.core.record import snapshot as snapshot_module
from src.core.record.snapshot import pin_run_snapshot, pin_snapshot, snapshot_gate, snapshot_ref

RUN = (*QUICK_RUN, "--epochs=2")


def file_at(root: Path, commit: str, path: str) -> bytes:
    return subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, check=True, capture_output=True).stdout


def mode_at(root: Path, commit: str, path: str) -> str:
    return git(root, "ls-tree", commit, "--", path).split()[0]


def modified(root):
    (root / "a.txt").write_text("a, edited\n")
    return {"a.txt": b"a, edited\n"}, ["a.txt"]


def deleted(root):
    (root / "b.txt").unlink()
    return {}, ["b.txt"]


def deleted_and_staged(root):
    git(root, "rm", "-q", "b.txt")
    return {}, ["b.txt"]


def staged_only(root):
    (root / "a.txt").write_text("staged\n")
    git(root, "add", "a.txt")
    return {"a.txt": b"staged\n"}, ["a.txt"]


def renamed(root):
    (root / "b.txt").rename(root / "c.txt")
    return {"c.txt": b"b\n"}, ["b.txt", "c.txt"]


def renamed_and_staged(root):
    git(root, "mv", "b.txt", "d.txt")
    return {"d.txt": b"b\n"}, ["b.txt", "d.txt"]


def untracked(root):
    (root / "new").mkdir()
    (root / "new" / "module.py").write_text("X = 1\n")
    (root / "ignored").mkdir()
    (root / "ignored" / "data.bin").write_bytes(b"\0" * 100)  # .gitignore excludes it: not in the snapshot
    (root / "run.log").write_text("ignored too\n")
    return {"new/module.py": b"X = 1\n"}, ["new/module.py"]


def executable(root):
    (root / "a.txt").chmod(0o755)
    return {"a.txt": b"a\n"}, ["a.txt"]


def symlink(root):
    (root / "link").symlink_to("a.txt")
    return {"link": b"a.txt"}, ["link"]


def assume_unchanged(root):
    git(root, "update-index", "--assume-unchanged", "a.txt")
    (root / "a.txt").write_text("hidden from git status\n")
    return {"a.txt": b"hidden from git status\n"}, ["a.txt"]


def skip_worktree(root):
    git(root, "update-index", "--skip-worktree", "b.txt")
    (root / "b.txt").write_text("skipped by git status\n")
    return {"b.txt": b"skipped by git status\n"}, ["b.txt"]


def renamed_intent_to_add(root):
    (root / "b.txt").rename(root / "z.txt")
    git(root, "add", "-N", "z.txt")  # git status then names a rename in the working tree
    return {"z.txt": b"b\n"}, ["b.txt", "z.txt"]


def sparse_checkout(root):
    git(root, "sparse-checkout", "set", "--no-cone", "/a.txt", "/.gitignore")  # b.txt leaves the working tree
    (root / "a.txt").write_text("a, edited in a sparse checkout\n")
    return {"a.txt": b"a, edited in a sparse checkout\n", "b.txt": b"b\n"}, ["a.txt"]


def staged_then_edited(root):
    (root / "a.txt").write_text("staged\n")
    git(root, "add", "a.txt")
    (root / "a.txt").write_text("staged, then edited again\n")
    return {"a.txt": b"staged, then edited again\n"}, ["a.txt"]


CHANGES = [
    modified,
    deleted,
    deleted_and_staged,
    staged_only,
    renamed,
    renamed_and_staged,
    untracked,
    executable,
    symlink,
    assume_unchanged,
    skip_worktree,
    staged_then_edited,
    renamed_intent_to_add,
    sparse_checkout,
]


@pytest.mark.parametrize("change", CHANGES, ids=[change.__name__ for change in CHANGES])
def test_a_snapshot_holds_the_change_and_leaves_the_repository_as_it_was(repo, change):
    (repo / "kept.txt").write_text("stashed\n")  # a stash entry, which must survive too
    git(repo, "add", "kept.txt")
    git(repo, "stash")
    base = git(repo, "rev-parse", "HEAD")
    expected, changed_paths = change(repo)
    before = repository_view(repo)

    provenance = snapshot_gate(repo, max_file_mb=10)

    assert repository_view(repo) == before
    snapshot = provenance["commit"]
    assert snapshot != base and provenance["snapshot"]["base"] == base
    assert git(repo, "rev-parse", f"{snapshot}^") == base
    assert provenance["snapshot"]["files"] == sorted(changed_paths)
    assert provenance["branch"] == "main" and provenance["commit_on_remote"] is False
    for path, content in expected.items():
        assert file_at(repo, snapshot, path) == content
    tree = git(repo, "ls-tree", "-r", "--name-only", snapshot).splitlines()
    assert not any(path.startswith("ignored/") or path.endswith(".log") for path in tree)
    if change is executable:
        assert mode_at(repo, snapshot, "a.txt") == "100755"
    if change is symlink:
        assert mode_at(repo, snapshot, "link") == "120000"
    if change in (deleted, deleted_and_staged, renamed, renamed_and_staged, renamed_intent_to_add):
        assert "b.txt" not in tree


NESTED = {
    "src/pkg/a.py": "a\n",
    "src/pkg/b.py": "b\n",
    "src/other/c.py": "c\n",
    "docs/x.md": "x\n",
    "top.txt": "t\n",
    "tool": "a file\n",
    "gone/one.txt": "1\n",
    "gone/deeper/two.txt": "2\n",
}


def nested_changes(root: Path) -> None:
    """Changes across directories, and paths that change between file and directory."""
    (root / "src" / "pkg" / "a.py").write_text("a, edited\n")
    (root / "src" / "pkg" / "new").mkdir()
    (root / "src" / "pkg" / "new" / "d.py").write_text("d\n")  # a new directory in an existing one
    shutil.rmtree(root / "gone")  # a whole directory removed
    (root / "tool").unlink()  # a file becomes a directory
    (root / "tool").mkdir()
    (root / "tool" / "main.py").write_text("m\n")
    shutil.rmtree(root / "docs")  # a directory becomes a file
    (root / "docs").write_text("the docs are a file now\n")
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep.txt").write_text("deep\n")
    (root / "src" / "other" / "c.py").chmod(0o755)
    git(root, "mv", "top.txt", "src/top.txt")  # a staged rename across directories
    git(root, "rm", "-q", "--cached", "src/pkg/b.py")  # unstaged from the index, still in the tree
    git(root, "rm", "-q", "--cached", "kept.log")  # unstaged, and ignored: gone, as git add -A has it
    (root / "ignored").mkdir()
    (root / "ignored" / "data.bin").write_bytes(b"\0" * 10)


def test_a_snapshot_of_changes_across_directories_is_the_tree_git_add_all_makes(tmp_path):
    root = tmp_path / "nested"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    for path, text in NESTED.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    (root / ".gitignore").write_text("ignored/\n*.log\n")
    (root / "kept.log").write_text("tracked although ignored\n")
    git(root, "add", "-A")
    git(root, "add", "-f", "kept.log")
    git(root, "commit", "-q", "-m", "initial")
    nested_changes(root)
    provenance = snapshot_as_git_add_all(root, tmp_path)
    assert "kept.log" in provenance["snapshot"]["files"] and "src/top.txt" in provenance["snapshot"]["files"]


@pytest.mark.parametrize(
    "case", ["data moved and linked back", "data linked elsewhere", "linked where a repository is", "came back"]
)
def test_a_directory_replaced_by_a_link_or_by_a_file_and_back_is_the_tree_git_add_all_makes(tmp_path, case):
    """A tracked directory replaced by a link to scratch space (git records the link and reads
    nothing through it), and one replaced by a file, staged, then made a directory again (the
    directory's path is not a changed file)."""
    root = committed_repository(tmp_path / "repo", {"data/README.md": "put the data here\n", "train.py": "x = 1\n"})
    scratch = tmp_path / "scratch"
    if case == "data moved and linked back":
        shutil.move(root / "data", scratch)
        os.symlink(scratch, root / "data")
    elif case == "data linked elsewhere":
        shutil.rmtree(root / "data")
        scratch.mkdir()
        os.symlink(scratch, root / "data")
    elif case == "linked where a repository is":  # nothing is read through the link, not even a repository
        shutil.rmtree(root / "data")
        committed_repository(scratch / "README.md", {"f.txt": "f\n"})
        os.symlink(scratch, root / "data")
    else:
        shutil.rmtree(root / "data")
        (root / "data").write_text("a file now\n")
        git(root, "add", "-A")
        (root / "data").unlink()
        (root / "data").mkdir()
        (root / "data" / "README.md").write_text("edited\n")
    provenance = snapshot_as_git_add_all(root, tmp_path)
    expected = ["data/README.md"] if case == "came back" else ["data", "data/README.md"]
    assert provenance["snapshot"]["files"] == expected


def test_a_tracked_file_replaced_by_a_repository_or_a_pipe_is_refused_with_one_message(repo):
    """Neither has a place in a snapshot: a repository's commit says nothing of where to fetch it,
    and git cannot store a pipe (`git add -A` fails on it too)."""
    (repo / "a.txt").unlink()
    committed_repository(repo / "a.txt", {"f.py": "f = 1\n"})
    before = repository_view(repo)
    with pytest.raises(Refusal, match="git repositories inside the working tree") as refusal:
        snapshot_gate(repo, max_file_mb=10)
    assert "  a.txt\n" in str(refusal.value) and repository_view(repo) == before
    (repo / "b.txt").unlink()
    os.mkfifo(repo / "b.txt")
    shutil.rmtree(repo / "a.txt")
    (repo / "a.txt").write_text("a\n")
    with pytest.raises(Refusal, match="git cannot store the working tree as it is") as refusal:
        snapshot_gate(repo, max_file_mb=10)
    assert "b.txt" in str(refusal.value)


def test_files_git_stores_otherwise_than_as_they_are_are_snapshotted_as_git_add_has_them(repo, tmp_path, monkeypatch):
    """Most changed files go to git's importer as they are, once git has computed the same id
    for them. Those git stores otherwise (line endings converted, a clean filter) and those over
    the in-memory budget are written by git itself, as `git add` writes them."""
    (repo / ".gitattributes").write_text("*.crlf text eol=lf\n*.up filter=upper\n")
    git(repo, "config", "filter.upper.clean", "tr a-z A-Z")
    git(repo, "config", "filter.upper.smudge", "cat")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "attributes")
    (repo / "lines.crlf").write_bytes(b"one\r\ntwo\r\n")  # stored with LF
    (repo / "shout.up").write_text("hello\n")  # stored as HELLO
    (repo / "large.bin").write_bytes(bytes(range(256)) * 4)  # over the budget set below
    (repo / "plain.txt").write_text("as it is\n")
    (repo / "script.sh").write_text("#!/bin/sh\n")
    os.chmod(repo / "script.sh", 0o755)
    os.symlink("plain.txt", repo / "link")
    monkeypatch.setattr(snapshot_module, "INLINE_BYTES", 100)
    written_by_git = []
    index_entries = snapshot_module._index_entries

    def spy(root, paths, seed, write):
        written_by_git.extend(paths if write else [])
        return index_entries(root, paths, seed, write)

    monkeypatch.setattr(snapshot_module, "_index_entries", spy)
    before = repository_view(repo)

    provenance = snapshot_gate(repo, max_file_mb=10)

    assert repository_view(repo) == before
    assert sorted(written_by_git) == ["large.bin", "lines.crlf", "shout.up"]
    commit = provenance["commit"]
    assert file_at(repo, commit, "lines.crlf") == b"one\ntwo\n"
    assert file_at(repo, commit, "shout.up") == b"HELLO\n"
    assert file_at(repo, commit, "large.bin") == bytes(range(256)) * 4
    assert file_at(repo, commit, "plain.txt") == b"as it is\n" and file_at(repo, commit, "link") == b"plain.txt"
    assert (mode_at(repo, commit, "script.sh"), mode_at(repo, commit, "link")) == ("100755", "120000")
    reference = tmp_path / "reference"
    shutil.copytree(repo, reference, symlinks=True)
    git(reference, "add", "-A")
    assert git(repo, "rev-parse", f"{commit}^{{tree}}") == git(reference, "write-tree")


def test_tracked_files_are_read_against_their_index_entries_as_git_add_reads_them(repo, tmp_path):
    """Three settings where `git add` keeps what the index says: core.fileMode=false keeps an
    executable's mode, core.symlinks=false keeps a link that is a plain file on disk, and
    core.autocrlf keeps the CRLF line endings of a file committed with them."""
    (repo / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(repo / "run.sh", 0o755)
    os.symlink("plain.txt", repo / "link")
    (repo / "windows.txt").write_bytes(b"one\r\ntwo\r\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "an executable, a link, CRLF line endings")
    for key, value in (("core.fileMode", "false"), ("core.symlinks", "false"), ("core.autocrlf", "true")):
        git(repo, "config", key, value)
    (repo / "run.sh").write_text("#!/bin/sh\necho edited\n")
    os.chmod(repo / "run.sh", 0o644)  # the bit lost on disk (a mounted volume, say): git keeps the index's
    (repo / "link").unlink()
    (repo / "link").write_text("other.txt")  # a link as a checkout without symlinks leaves it, retargeted
    (repo / "windows.txt").write_bytes(b"one\r\ntwo\r\nthree\r\n")
    before = repository_view(repo)

    provenance = snapshot_gate(repo, max_file_mb=10)

    assert repository_view(repo) == before
    commit = provenance["commit"]
    assert (mode_at(repo, commit, "run.sh"), mode_at(repo, commit, "link")) == ("100755", "120000")
    assert file_at(repo, commit, "link") == b"other.txt"
    assert file_at(repo, commit, "windows.txt") == b"one\r\ntwo\r\nthree\r\n"
    reference = tmp_path / "reference"
    shutil.copytree(repo, reference, symlinks=True)
    git(reference, "add", "-A")
    assert git(repo, "rev-parse", f"{commit}^{{tree}}") == git(reference, "write-tree")


def test_a_file_replaced_after_git_read_it_is_left_to_git_and_never_blocks(tmp_path):
    """While git computes a file's id, the snapshot reads it, and the file may have become a pipe
    (opening it would wait for a writer), a link (to /dev/zero, say: its target is read, never
    what it points at) or a directory: the snapshot does not read it, and git's own writing
    decides (a link's bytes only count if git, too, found a link with that target)."""
    os.mkfifo(tmp_path / "pipe")
    os.symlink("/dev/zero", tmp_path / "link")
    (tmp_path / "directory").mkdir()
    (tmp_path / "file").write_bytes(b"as it is\n")
    read = {name: snapshot_module._blob_bytes(str(tmp_path / name), 1024) for name in os.listdir(tmp_path)}
    assert read == {"pipe": None, "link": b"/dev/zero", "directory": None, "file": b"as it is\n"}
    assert snapshot_module._blob_bytes(str(tmp_path / "file"), 4) is None  # over the limit


ODD_NAMES = [
    "with space.txt",
    'quote".txt',
    "back\\slash.txt",
    "new\nline.txt",
    "tab\there.txt",
    "carriage\rreturn.txt",  # as macOS names a folder's icon ("Icon\r")
    "ünï cödé.txt",
    os.fsdecode(b"latin-1 caf\xe9.txt"),  # not UTF-8: a byte the file system's encoding cannot decode
]


def test_paths_of_any_characters_are_snapshotted_as_git_add_all_has_them(repo, tmp_path):
    """Every path reaches git's importer quoted: spaces, quotes, backslashes, control
    characters, non-ASCII names and names that are not UTF-8, in tracked files edited or
    deleted and in new ones."""
    odd = repo / '"odd dir'
    odd.mkdir()
    for name in ODD_NAMES:
        (odd / name).write_bytes(os.fsencode(f"{name}, committed\n"))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "odd names")
    (odd / ODD_NAMES[0]).unlink()
    for name in ODD_NAMES[1:]:
        (odd / name).write_bytes(os.fsencode(f"{name}, edited\n"))
        (repo / f"new {name}").write_bytes(os.fsencode(f"{name}, new\n"))
    provenance = snapshot_as_git_add_all(repo, tmp_path)
    expected = [f'"odd dir/{name}' for name in ODD_NAMES] + [f"new {name}" for name in ODD_NAMES[1:]]
    assert provenance["snapshot"]["files"] == sorted(expected)
    assert file_at(repo, provenance["commit"], '"odd dir/new\nline.txt') == b"new\nline.txt, edited\n"


def test_a_project_in_a_subdirectory_snapshots_the_whole_working_tree(repo, tmp_path):
    """The template forked into a folder of a larger repository: the snapshot is of the whole
    working tree, changes outside the project's folder included, as the gate reads them."""
    project = repo / "project"
    project.mkdir()
    (project / "train.py").write_text("print('committed')\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "a project in a folder")
    (project / "train.py").write_text("print('edited')\n")
    (project / "new.py").write_text("new = 1\n")
    (repo / "a.txt").write_text("edited outside the project\n")
    before = repository_view(repo)

    provenance = snapshot_gate(project, max_file_mb=10)

    assert repository_view(repo) == before
    assert provenance["snapshot"]["files"] == ["a.txt", "project/new.py", "project/train.py"]
    reference = tmp_path / "reference"
    shutil.copytree(repo, reference, symlinks=True)
    git(reference, "add", "-A")
    assert git(repo, "rev-parse", f"{provenance['commit']}^{{tree}}") == git(reference, "write-tree")


def test_an_unborn_branch_gives_a_root_commit(tmp_path):
    root = tmp_path / "fresh"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "train.py").write_text("print('first')\n")
    (root / "staged.py").write_text("staged = True\n")
    git(root, "add", "staged.py")
    before = repository_view(root)

    provenance = snapshot_gate(root, max_file_mb=10)

    assert repository_view(root) == before
    snapshot = provenance["commit"]
    # Until a run pins it under its name, a pending ref keeps it (from gc --prune=now too).
    assert git(root, "for-each-ref", "--format=%(refname) %(objectname)") == f"refs/runs-pending/{snapshot} {snapshot}"
    assert git(root, "rev-list", "--parents", "-n1", snapshot) == snapshot  # no parent
    assert provenance["snapshot"] == {"base": None, "ref": None, "files": ["staged.py", "train.py"]}
    assert file_at(root, snapshot, "train.py") == b"print('first')\n"
    assert snapshot_gate(root, max_file_mb=10)["commit"] == snapshot


def test_the_same_tree_on_the_same_base_is_the_same_commit_and_a_ref_is_never_moved(repo):
    (repo / "a.txt").write_text("edited\n")
    first = snapshot_gate(repo, max_file_mb=10)["commit"]
    assert snapshot_gate(repo, max_file_mb=10)["commit"] == first

    ref = snapshot_ref("project", "run 1")
    assert ref == "refs/runs/project/run_1"
    assert pin_snapshot(repo, first, ref) == ref
    assert git(repo, "for-each-ref", "refs/runs-pending") == ""  # pinned: no longer pending
    assert pin_snapshot(repo, first, ref) == ref  # pinned again (a restart): the same ref
    (repo / "a.txt").write_text("edited again\n")
    second = snapshot_gate(repo, max_file_mb=10)["commit"]
    assert second != first
    assert pin_snapshot(repo, second, ref) == f"{ref}-2"  # the name is taken by another snapshot
    assert git(repo, "rev-parse", ref) == first and git(repo, "rev-parse", f"{ref}-2") == second
    git(repo, "gc", "-q", "--prune=now")
    assert file_at(repo, first, "a.txt") == b"edited\n" and file_at(repo, second, "a.txt") == b"edited again\n"


def test_snapshots_beside_each_other_and_the_users_commits_then_gc_lose_nothing(repo, tmp_path):
    (repo / "a.txt").write_text("work in progress\n")
    pinned, errors = [], []

    def runs(name: str) -> None:
        try:
            for index in range(4):
                provenance = snapshot_gate(repo, max_file_mb=10)
                directory = tmp_path / "logs" / "project" / f"{name}-{index}"
                directory.mkdir(parents=True)  # the run's directory, where its snapshot.bundle goes
                pinned.append(pin_run_snapshot(provenance, directory, repo))
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=runs, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for index in range(4):  # meanwhile, the user commits
        (repo / f"user{index}.txt").write_text(f"{index}\n")
        git(repo, "add", f"user{index}.txt")
        git(repo, "commit", "-q", "-m", f"user {index}")
    for thread in threads:
        thread.join()
    assert errors == []

    assert git(repo, "log", "--format=%s", "main").splitlines() == ["user 3", "user 2", "user 1", "user 0", "initial"]
    assert git(repo, "status", "--porcelain") == "M a.txt"
    assert git(repo, "diff", "--cached") == ""
    git(repo, "gc", "-q", "--prune=now")
    subprocess.run(["git", "fsck", "--strict", "--no-progress"], cwd=repo, check=True, capture_output=True)
    assert len(pinned) == 8
    for provenance in pinned:
        ref = provenance["snapshot"]["ref"]
        assert git(repo, "rev-parse", ref) == provenance["commit"]
        assert file_at(repo, ref, "a.txt") == b"work in progress\n"
    assert git(repo, "for-each-ref", "refs/runs-pending") == ""


def test_a_clean_tree_is_its_commit(repo):
    provenance = snapshot_gate(repo, max_file_mb=10)
    assert provenance["commit"] == git(repo, "rev-parse", "HEAD") and "snapshot" not in provenance


def test_large_untracked_files_are_refused_listing_them(repo):
    (repo / "model.ckpt").write_bytes(b"\0" * 3 * 1024 * 1024)
    (repo / "outputs").mkdir()
    (repo / "outputs" / "big.npy").write_bytes(b"\0" * 2 * 1024 * 1024)
    (repo / "small.py").write_text("ok\n")
    objects = git(repo, "count-objects", "-v")
    with pytest.raises(Refusal) as refusal:
        snapshot_gate(repo, max_file_mb=1)
    message = str(refusal.value)
    for fragment in ("model.ckpt (3.0 MB)", "outputs/big.npy (2.0 MB)", "snapshot_max_file_mb (1 MB)", ".gitignore"):
        assert fragment in message
    assert "small.py" not in message
    assert git(repo, "count-objects", "-v") == objects  # refused before anything was written
    assert snapshot_gate(repo, max_file_mb=4)["snapshot"]["files"] == ["model.ckpt", "outputs/big.npy", "small.py"]


def test_a_dirty_submodule_is_refused(with_submodule):
    (with_submodule / "lib" / "lib.py").write_text("x = 2\n")
    with pytest.raises(Refusal) as refusal:
        snapshot_gate(with_submodule, max_file_mb=10)
    assert "submodule (modified content): lib" in str(refusal.value)
    assert "Commit (or discard) the changes inside each submodule" in str(refusal.value)


def test_a_repository_inside_the_tree_that_is_not_a_submodule_is_refused_not_left_out(repo):
    """git status names it as an untracked directory; a snapshot that left it out would log a run
    whose code it does not hold."""
    committed_repository(repo / "vendored", {"code.py": "x = 1\n"})
    (repo / "new.py").write_text("y = 2\n")
    before = repository_view(repo)
    with pytest.raises(Refusal) as refusal:
        snapshot_gate(repo, max_file_mb=10)
    assert "vendored/" in str(refusal.value) and "git submodule add" in str(refusal.value)
    assert "new.py" not in str(refusal.value)
    assert repository_view(repo) == before


def source_view_of(view: dict) -> dict:
    """A repository view without what running writes (logs/, __pycache__/: both ignored)."""
    tree = {path: value for path, value in view["tree"].items() if not path.startswith("logs/")}
    return {**view, "tree": {path: value for path, value in tree.items() if "__pycache__" not in path}}


def source_view(root: Path) -> dict:
    return source_view_of(repository_view(root))


def snapshot_work(project) -> None:
    """A modified src/model.py that imports a new, untracked module."""
    (project.root / "src" / "residual.py").write_text("SCALE = 0.2\n")
    model = project.root / "src" / "model.py"
    text = model.read_text().replace("state + 0.1 * self.net(state)", "state + SCALE * self.net(state)")
    imports = "from src.core.base import BaseModel\nfrom src.residual import SCALE"
    model.write_text(text.replace("from src.core.base import BaseModel", imports))


def test_a_dirty_tree_is_refused_without_the_flag_and_logged_with_it(project):
    snapshot_work(project)
    before = repository_view(project.root)
    refused = project.run(*RUN, "--run_name=refused")
    assert refused.returncode == 3 and "--snapshot" not in refused.stdout
    assert not (project.root / "logs").exists()

    result = project.run(*RUN, "--run_name=wip", "--snapshot")
    assert result.returncode == 0, result.stderr
    run = project.root / "logs" / "PendulumModel" / "wip"
    git_section = yaml.safe_load((run / "config.yaml").read_text())["git"]
    ref = "refs/runs/PendulumModel/wip"
    assert git_section["snapshot"] == {
        "base": project.git("rev-parse", "HEAD"),
        "ref": ref,
        "files": ["src/model.py", "src/residual.py"],
    }
    assert git_section["commit"] == project.git("rev-parse", ref)
    assert yaml.safe_load((run / "metadata.yaml").read_text())["commit"] == git_section["commit"]
    assert f"kept as {ref}" in result.stdout
    assert source_view(project.root) == source_view_of(before)

    env_run = project.run(*RUN, "--run_name=again", env={"TEMPLATE_SNAPSHOT": "1"})  # the same tree: the same commit
    assert env_run.returncode == 0, env_run.stderr
    again = yaml.safe_load((project.root / "logs" / "PendulumModel" / "again" / "config.yaml").read_text())["git"]
    assert again["commit"] == git_section["commit"] and again["snapshot"]["ref"] == "refs/runs/PendulumModel/again"


def test_a_snapshot_run_is_reproduced_bitwise_after_the_work_is_thrown_away(project):
    snapshot_work(project)
    assert project.run(*RUN, "--run_name=wip", "--snapshot").returncode == 0
    project.git("checkout", "--", ".")
    project.git("clean", "-fdq")
    assert not (project.root / "src" / "residual.py").exists()
    git(project.root, "gc", "-q", "--prune=now")

    result = project.run("--reproduce", "logs/PendulumModel/wip")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to step 26 of the original's 26: identical (bitwise)" in result.stdout
    assert "parameters at step 26: identical (bitwise)" in result.stdout


def test_an_archived_snapshot_run_is_reproduced_in_a_fresh_clone_without_the_ref(project, tmp_path):
    snapshot_work(project)
    assert project.run(*RUN, "--run_name=wip", "--snapshot").returncode == 0
    run = project.root / "logs" / "PendulumModel" / "wip"
    assert (run / "snapshot.bundle").is_file()
    archive = f"file://{tmp_path}/archive"
    archived = project.run("--archive", str(run), archive)
    assert archived.returncode == 0, archived.stderr
    commit = project.git("rev-parse", "refs/runs/PendulumModel/wip")

    clone = Project(tmp_path / "clone")
    git(tmp_path, "clone", "-q", "--no-local", str(project.root), str(clone.root))  # reachable objects only
    assert clone.git("for-each-ref", "refs/runs") == ""  # a clone does not fetch refs/runs
    shutil.copytree(project.root / "data" / "pendulum", clone.root / "data" / "pendulum")
    restored = clone.run("--restore", f"{archive}/PendulumModel/wip")
    assert restored.returncode == 0, restored.stderr

    result = clone.run("--reproduce", "logs/PendulumModel/wip")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fetched snapshot" in result.stdout
    assert "up to step 26 of the original's 26: identical (bitwise)" in result.stdout
    assert clone.git("rev-parse", "refs/runs/PendulumModel/wip") == commit


def test_a_killed_snapshot_run_resumes_with_the_same_snapshot_and_ends_equal(project):
    from helpers import assert_same_run

    snapshot_work(project)
    args = (*RUN, "--checkpoint.every_n_steps=5", "--snapshot")
    assert project.run(*args, "--run_name=reference").returncode == 0
    killed = project.run(*args, "--run_name=killed", env={"TEMPLATE_FAULT": "train_step:22"})
    assert killed.returncode == -9
    run = project.root / "logs" / "PendulumModel" / "killed"

    refused = project.run("--resume", str(run))  # the tree is dirty: the gate refuses, and says how
    assert refused.returncode == 3
    assert "Resume it with --snapshot" in refused.stderr and "refs/runs/PendulumModel/killed" in refused.stderr

    resumed = project.run("--resume", str(run), "--snapshot")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(project.root / "logs" / "PendulumModel" / "reference", run)

    # A job script re-submitted: --auto-resume --snapshot finds the run by its snapshot commit.
    auto = (*args, "--run_name=auto", "--auto-resume")
    assert project.run(*auto, env={"TEMPLATE_FAULT": "train_step:22"}).returncode == -9
    continued = project.run(*auto)
    assert continued.returncode == 0 and "exists with this commit and config; continuing it" in continued.stdout
    assert_same_run(
        project.root / "logs" / "PendulumModel" / "reference", project.root / "logs" / "PendulumModel" / "auto"
    )
    assert "has finished already" in project.run(*auto).stdout

    (project.root / "src" / "residual.py").write_text("SCALE = 0.3\n")  # other work: another snapshot
    other = project.run("--resume", str(run), "--snapshot", "--epochs=3")
    assert other.returncode == 3 and "was made at commit" in other.stderr


def test_snapshot_flag_combinations_are_refused(project):
    result = project.run(*RUN, "--snapshot", "--no-logging")
    assert result.returncode == 2
    assert "--snapshot logs a dirty tree's run, and --no-logging logs nothing" in result.stderr
    result = project.run("--runs", "--snapshot")
    assert result.returncode == 2 and "--snapshot does nothing with --runs" in result.stderr


def test_a_large_untracked_file_refuses_the_run_and_writes_nothing(project):
    (project.root / "weights.pt").write_bytes(b"\0" * 2 * 1024 * 1024)
    result = project.run(*RUN, "--snapshot", "--snapshot_max_file_mb=1")
    assert result.returncode == 3 and "weights.pt (2.0 MB)" in result.stderr
    assert not (project.root / "logs").exists()
    assert project.git("for-each-ref", "refs/runs") == ""


def test_a_sweep_from_a_dirty_tree_shares_one_snapshot(project):
    snapshot_work(project)
    result = project.run(*RUN, "--epochs=1", "--snapshot", "--sweep={optimizer.lr: [0.001, 0.002]}")
    assert result.returncode == 0, result.stdout + result.stderr
    (sweep,) = (project.root / "logs" / "PendulumModel").glob("sweep-*")
    recorded = yaml.safe_load((sweep / "sweep.yaml").read_text())["git"]
    ref = f"refs/runs/PendulumModel/{sweep.name}"
    assert recorded["snapshot"]["ref"] == ref and recorded["commit"] == project.git("rev-parse", ref)
    members = sorted(path for path in sweep.glob("*-lr=*") if (path / "config.yaml").exists())
    assert len(members) == 2
    for member in members:
        member_git = yaml.safe_load((member / "config.yaml").read_text())["git"]
        assert member_git["commit"] == recorded["commit"] and member_git["snapshot"] == recorded["snapshot"]
    assert project.git("for-each-ref", "--format=%(refname)", "refs/runs") == ref  # one snapshot for all

    table = project.run("--runs")
    assert table.returncode == 0
    marked = [line for line in table.stdout.splitlines() if recorded["commit"][:10] + "+*" in line]
    assert len(marked) == 2 and "+ a snapshot of uncommitted work" in table.stdout


def test_under_torchrun_rank_zero_snapshots_once_and_a_restart_finds_the_same_commit(project):
    snapshot_work(project)
    result = project.torchrun(
        *RUN,
        "--run_name=ddp",
        "--snapshot",
        launcher=("--standalone", "--max-restarts=1"),
        env={"TEMPLATE_FAULT": "train_step:3@1"},  # rank 1 dies: torchrun restarts the group, which resumes
    )
    assert result.returncode == 0, result.stderr
    run = project.root / "logs" / "PendulumModel" / "ddp"
    git_section = yaml.safe_load((run / "config.yaml").read_text())["git"]
    assert project.git("for-each-ref", "--format=%(refname)", "refs/runs") == "refs/runs/PendulumModel/ddp"
    assert project.git("rev-parse", "refs/runs/PendulumModel/ddp") == git_section["commit"]
    assert project.git("for-each-ref", "refs/runs-pending") == ""
    metadata = yaml.safe_load((run / "metadata.yaml").read_text())
    assert metadata["status"] == "finished" and len(metadata["resumes"]) == 1


def test_a_tree_with_every_file_deleted_is_the_empty_tree(repo):
    for name in ("a.txt", "b.txt", ".gitignore"):
        (repo / name).unlink()
    provenance = snapshot_gate(repo, max_file_mb=10)
    assert git(repo, "rev-parse", f"{provenance['commit']}^{{tree}}") == git(
        repo, "hash-object", "-t", "tree", "/dev/null"
    )
    assert provenance["snapshot"]["files"] == [".gitignore", "a.txt", "b.txt"]


def test_an_unconcluded_merge_is_refused_as_the_gate_refuses_it(repo):
    conflicting_branch(repo)
    subprocess.run(["git", "merge", "-q", "other"], cwd=repo, capture_output=True)  # a conflict: MERGE_HEAD stays
    with pytest.raises(Refusal, match="in the middle of a merge"):
        snapshot_gate(repo, max_file_mb=10)
