"""The git gate on real repositories, and the provenance a run records."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import git

from src.core.errors import Refusal
from src.core.record import environment
from src.core.record.environment import data_fingerprint, environment_provenance, installed_packages
from src.core.record.git import COMMIT_ENV_VARIABLE, gate, index_may_mark_files, repository_state


def refusal(root) -> str:
    with pytest.raises(Refusal) as caught:
        gate(root)
    assert caught.value.exit_code == 3
    return str(caught.value)


def test_clean_repository_passes_and_records_the_commit(repo):
    section = gate(repo)
    assert section["commit"] == git(repo, "rev-parse", "HEAD")
    assert section["branch"] == "main" and section["detached"] is False
    assert section["source"] == "git repository"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda r: (r / "a.txt").write_text("changed\n"), "modified: a.txt"),
        (lambda r: ((r / "a.txt").write_text("staged\n"), git(r, "add", "a.txt")), "staged, modified: a.txt"),
        (lambda r: (r / "a.txt").unlink(), "deleted: a.txt"),
        (lambda r: git(r, "rm", "-q", "--cached", "a.txt"), "staged, deleted: a.txt"),
        (lambda r: git(r, "mv", "a.txt", "renamed.txt"), "staged, renamed: renamed.txt (from a.txt)"),
        (lambda r: (r / "new.txt").write_text("new\n"), "untracked: new.txt"),
        (lambda r: ((r / "new").mkdir(), (r / "new" / "x.py").write_text("")), "untracked: new/"),
    ],
    ids=["modified", "staged", "deleted", "deleted-staged", "renamed", "untracked", "untracked-directory"],
)
def test_each_kind_of_change_is_refused_and_listed(repo, change, expected):
    change(repo)
    message = refusal(repo)
    assert expected in message
    assert "--allow-dirty-repo" in message and "Commit" in message


def test_ignored_files_alone_do_not_count(repo):
    (repo / "ignored").mkdir()
    (repo / "ignored" / "data.bin").write_bytes(b"x")
    (repo / "run.log").write_text("log")
    assert gate(repo)["commit"]


def test_long_lists_are_cut_at_twenty_with_a_count(repo):
    for index in range(25):
        (repo / f"file{index:02d}.txt").write_text("x")
    message = refusal(repo)
    assert message.count("untracked: file") == 20 and "... and 5 more" in message
    assert "(25 in" in message


@pytest.mark.parametrize(
    ("mark", "change", "expected"),
    [
        ("--assume-unchanged", lambda r: (r / "a.txt").write_text("changed\n"), "modified (assume-unchanged): a.txt"),
        ("--skip-worktree", lambda r: (r / "a.txt").write_text("changed\n"), "modified (skip-worktree): a.txt"),
        ("--assume-unchanged", lambda r: (r / "a.txt").unlink(), "deleted (assume-unchanged): a.txt"),
    ],
    ids=["assume-unchanged", "skip-worktree", "assume-unchanged-deleted"],
)
def test_files_git_status_is_told_to_trust_are_checked_by_content(repo, mark, change, expected):
    git(repo, "update-index", mark, "a.txt")
    assert gate(repo)["commit"]  # marked but unchanged: clean
    change(repo)
    assert git(repo, "status", "--porcelain") == ""  # git status itself sees nothing
    assert [expected] == repository_state(repo).changes
    assert expected in refusal(repo)


def test_file_names_that_are_not_utf8_or_hold_a_carriage_return_are_named_not_a_traceback(repo):
    """git prints a path's bytes as they are: read as file names are read, each one names its file."""
    latin = os.fsdecode(b"caf\xe9.txt")
    (repo / latin).write_bytes(b"new\n")
    (repo / "Icon\r").write_bytes(b"")
    assert repository_state(repo).changes == ["untracked: Icon\r", f"untracked: {latin}"]
    assert latin in refusal(repo)


def test_a_sparse_checkout_is_clean_though_the_files_outside_it_are_not_on_disk(repo):
    """Files outside a sparse checkout are marked skip-worktree and left out of the working tree:
    missing, they are no change (as for git status and `git add -A`); back on disk and edited,
    they are one."""
    (repo / "docs").mkdir()
    (repo / "docs" / "guide.md").write_text("guide\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "docs")
    git(repo, "sparse-checkout", "set", "--no-cone", "/*.txt", "/.gitignore")
    assert not (repo / "docs").exists()
    assert gate(repo)["commit"] == git(repo, "rev-parse", "HEAD")
    (repo / "docs").mkdir()
    (repo / "docs" / "guide.md").write_text("edited outside the sparse checkout\n")
    assert "docs/guide.md" in refusal(repo)  # git itself notices the file again (and unmarks it)


def test_a_marked_symbolic_link_is_compared_by_its_target(repo):
    (repo / "link").symlink_to("a.txt")
    git(repo, "add", "link")
    git(repo, "commit", "-q", "-m", "link")
    git(repo, "update-index", "--assume-unchanged", "link", "b.txt")
    assert gate(repo)["commit"]  # the link's target is a.txt, as committed
    (repo / "link").unlink()
    (repo / "link").symlink_to("b.txt")
    assert repository_state(repo).changes == ["modified (assume-unchanged): link"]


def test_the_index_is_read_without_git_only_where_no_file_is_marked(repo):
    """The common case costs no second git process: the index's own flags say nothing is marked."""
    index = repo / ".git" / "index"
    assert index_may_mark_files(index) is False
    git(repo, "update-index", "--assume-unchanged", "b.txt")
    assert index_may_mark_files(index) is True
    git(repo, "update-index", "--no-assume-unchanged", "b.txt")
    git(repo, "update-index", "--skip-worktree", "a.txt")
    assert index_may_mark_files(index) is True
    git(repo, "update-index", "--no-skip-worktree", "a.txt")
    assert index_may_mark_files(index) is False
    git(repo, "update-index", "--index-version", "4")  # a format not read here: git is asked
    assert index_may_mark_files(index) is True


def test_an_index_version_4_and_a_linked_worktree_are_checked_too(repo, tmp_path):
    git(repo, "update-index", "--index-version", "4")
    git(repo, "update-index", "--skip-worktree", "a.txt")
    (repo / "a.txt").write_text("changed\n")
    assert "modified (skip-worktree): a.txt" in refusal(repo)
    linked = tmp_path / "linked"
    git(repo, "worktree", "add", "-q", "--detach", str(linked))
    assert gate(linked)["commit"]
    git(linked, "update-index", "--assume-unchanged", "b.txt")
    assert index_may_mark_files(Path(git(linked, "rev-parse", "--git-dir")) / "index") is True
    (linked / "b.txt").write_text("changed\n")
    assert "modified (assume-unchanged): b.txt" in refusal(linked)


def test_submodule_commits_are_recorded(with_submodule):
    section = gate(with_submodule)
    assert section["submodules"] == {"lib": git(with_submodule / "lib", "rev-parse", "HEAD")}


def test_dirty_submodule_is_refused(with_submodule):
    (with_submodule / "lib" / "lib.py").write_text("x = 2\n")
    assert "submodule (modified content): lib" in refusal(with_submodule)


def test_untracked_file_in_submodule_is_refused(with_submodule):
    (with_submodule / "lib" / "extra.py").write_text("")
    assert "submodule (untracked content): lib" in refusal(with_submodule)


def test_submodule_at_another_commit_is_refused(with_submodule):
    sub = with_submodule / "lib"
    (sub / "lib.py").write_text("x = 3\n")
    git(sub, "commit", "-q", "-am", "newer")
    assert "submodule (new commits): lib" in refusal(with_submodule)


def test_detached_head_works(repo):
    (repo / "a.txt").write_text("second\n")
    git(repo, "commit", "-q", "-am", "second")
    first = git(repo, "rev-parse", "HEAD~1")
    git(repo, "checkout", "-q", first)
    section = gate(repo)
    assert section["commit"] == first and section["branch"] is None and section["detached"] is True


def test_not_a_repository(tmp_path, monkeypatch):
    monkeypatch.delenv(COMMIT_ENV_VARIABLE, raising=False)
    message = refusal(tmp_path)
    assert "is not inside a git repository" in message and "--no-logging" in message


def test_the_gate_reads_git_in_any_locale(tmp_path, repo, monkeypatch):
    monkeypatch.setenv("LANGUAGE", "de")
    translated = subprocess.run(["git", "status"], cwd=tmp_path, capture_output=True, text=True).stderr
    if "not a git repository" in translated:
        pytest.skip("this git has no German messages installed")
    assert "is not inside a git repository" in refusal(tmp_path)
    (repo / "a.txt").write_text("changed\n")
    assert "modified: a.txt" in refusal(repo)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give a repository away")
def test_a_repository_owned_by_another_user_gets_a_safe_directory_hint(repo):
    shutil.chown(repo, "nobody")
    message = refusal(repo)
    assert "belongs to another user" in message and "safe.directory" in message


def test_repository_without_commits(tmp_path):
    git(tmp_path, "init", "-q")
    assert "has no commits yet" in refusal(tmp_path)


def test_no_git_binary(repo, monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    message = refusal(repo)
    assert "git is not installed" in message and "--no-logging" in message


def test_commit_from_environment_outside_a_repository(tmp_path, monkeypatch):
    monkeypatch.setenv(COMMIT_ENV_VARIABLE, "0123456789abcdef")
    section = gate(tmp_path)
    assert section["commit"] == "0123456789abcdef"
    assert COMMIT_ENV_VARIABLE in section["source"]


def test_environment_variable_does_not_override_a_real_repository(repo, monkeypatch):
    monkeypatch.setenv(COMMIT_ENV_VARIABLE, "0123456789abcdef")
    (repo / "a.txt").write_text("dirty\n")
    refusal(repo)  # a repository is there: its state decides


def test_remote_and_whether_the_commit_is_on_it(repo, tmp_path):
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    git(repo, "remote", "add", "origin", str(remote))
    assert gate(repo)["commit_on_remote"] is False
    git(repo, "push", "-q", "origin", "main")
    git(repo, "fetch", "-q", "origin")
    section = gate(repo)
    assert section["remotes"] == {"origin": str(remote)} and section["commit_on_remote"] is True
    (repo / "a.txt").write_text("local only\n")
    git(repo, "commit", "-q", "-am", "local")
    assert gate(repo)["commit_on_remote"] is False


def test_environment_section_names_the_versions():
    import numpy
    import torch

    section = environment_provenance()
    assert section["torch"] == str(torch.__version__) and section["numpy"] == numpy.__version__
    assert section["python"].count(".") == 2 and section["hostname"] and section["cpu_count"] >= 1
    assert "cuda" in section and "cudnn" in section


def test_installed_packages_read_the_same_names_and_versions_as_importlib():
    import importlib.metadata

    parsed = {f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions() if d.metadata["Name"]}
    assert installed_packages() == sorted(parsed, key=str.lower)


def test_installed_packages_match_pip_freeze():
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True
    ).stdout
    listed = {line.lower().split("==")[0].replace("_", "-") for line in installed_packages()}
    for line in freeze.splitlines():
        if "==" in line:
            assert line.lower().split("==")[0].replace("_", "-") in listed


def test_data_fingerprint_hashes_small_data_and_sees_changes(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "x.npy").write_bytes(b"1234")
    first = data_fingerprint(data)
    assert first["files"] == 1 and first["bytes"] == 4 and first["content_sha256"]
    (data / "train" / "x.npy").write_bytes(b"1235")  # same size, other content
    second = data_fingerprint(data)
    assert second["listing_sha256"] == first["listing_sha256"]
    assert second["content_sha256"] != first["content_sha256"]
    monkeypatch.setattr(environment, "DATA_HASH_LIMIT_BYTES", 3)
    large = data_fingerprint(data)
    assert large["content_sha256"] is None and large["listing_sha256"] == first["listing_sha256"]


def test_data_fingerprint_does_not_depend_on_where_the_data_is(tmp_path):
    data = tmp_path / "a"
    (data / "train").mkdir(parents=True)
    (data / "train" / "x.npy").write_bytes(b"1234")
    shutil.copytree(data, tmp_path / "b")
    first, second = data_fingerprint(data), data_fingerprint(Path(tmp_path / "b"))
    assert (first["listing_sha256"], first["content_sha256"]) == (second["listing_sha256"], second["content_sha256"])


def test_the_templates_gitignore_covers_what_make_and_runs_create(project):
    """A virtual environment (a directory, or a link to one), logs, generated data and caches
    must never make the tree dirty, or no logged run could start."""
    (project.root / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    (project.root / ".venv-bench").mkdir()
    (project.root / "logs" / "x").mkdir(parents=True)
    (project.root / "data" / "other").mkdir()
    (project.root / "benchmarks" / "results").mkdir()
    (project.root / "benchmarks" / "results" / "latest.md").write_text("")
    (project.root / "src" / "__pycache__").mkdir(exist_ok=True)
    assert gate(project.root)["commit"] == project.git("rev-parse", "HEAD")
