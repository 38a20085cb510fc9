"""Hardening: inputs found by attacking `run.py` as an adversary would (relative archive URIs,
archives that can never be written, corrupt archives and manifests, repositories mid-merge...).
Each gets one message and an exit code, no traceback, and nothing written outside the run."""

from pathlib import Path

import pytest
from helpers import QUICK_RUN, run_directory

from src.core.archive.store import probe_local_archive

QUICK = (*QUICK_RUN, "--epochs=1")


def one_message(result, exit_code: int = 2) -> str:
    """The result was refused with one `error:` message and no traceback; that message."""
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("error:") == 1, result.stderr
    return result.stderr[result.stderr.index("error:") :]


def finished_run(project, name: str = "run1", *extra: str) -> Path:
    result = project.run(*QUICK, f"--run_name={name}", *extra)
    assert result.returncode == 0, result.stderr
    return run_directory(project, name)


# 1. Relative file:// archive URIs


@pytest.mark.parametrize("uri", ["file://relative/dir", "file://../..", "file://.."])
def test_relative_file_uri_is_refused_for_a_new_run(project, uri):
    message = one_message(project.run(*QUICK, f"--archive.uri={uri}"))
    assert "file:///absolute/path" in message
    assert project.written_files() == [] and not (project.root / "relative").exists()


def test_relative_file_uri_is_refused_by_archive_and_restore(project, tmp_path):
    run = finished_run(project)
    before = sorted(path.name for path in tmp_path.iterdir())
    for arguments in (("--archive", str(run), "file://../.."), ("--restore", "file://../..", "--log-dir", "elsewhere")):
        message = one_message(project.run(*arguments))
        assert "absolute path" in message
    assert sorted(path.name for path in tmp_path.iterdir()) == before  # nothing written above the project
    assert not (project.root / "elsewhere").exists()


# 2. An archive that can never be written is refused at start-up


@pytest.mark.parametrize("target", ["/dev/null/x", "/proc/self/x", "/tmp/" + "a" * 5000])
def test_unwritable_file_archive_is_refused_before_the_run_starts(project, target):
    message = one_message(project.run(*QUICK, f"--archive.uri=file://{target}"), 2)
    assert "cannot be written" in message and len(message) < 600
    assert project.run_directories() == [] and project.written_files() == []


def test_a_writable_file_archive_probe_leaves_nothing(tmp_path):
    target = tmp_path / "shared" / "deeper" / "archive"
    probe_local_archive(target)
    assert not (tmp_path / "shared").exists()
