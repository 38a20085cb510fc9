"""run.py's command line, as a user meets it: exit codes, messages, and nothing written on errors."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest
import yaml

from src.core.cli import parse_command_line

QUICK = ("--mini", "--epochs=1", "--cpu")


def assert_clean_error(project, result, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.stderr
    assert project.written_files() == []


def test_acceptance_command_prints_the_edited_config(project):
    result = project.run(
        "sample_runconfig.yaml",
        "--print-config",
        "--epochs=3",
        "--modify",
        "batch_size",
        "32",
        "--find-replace",
        "data/",
        "/tmp/data/",
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["epochs"] == 3 and printed["batch_size"] == 32
    assert printed["data_directory"] == "/tmp/data/pendulum"
    assert printed["optimizer"]["lr"] == 3.0e-3 and printed["checkpoint"]["keep_recent"] == 2  # defaults filled
    assert project.written_files() == []


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--find-replace", "a", "b", "c"), ("--find-replace takes pairs", "got 3 value(s)")),
        (("--modify", "epochs"), ("--modify takes pairs", "got 1 value(s)")),
        (("--modify", "epoch", "3"), ("--modify epoch: no such key", "did you mean 'epochs'")),
        (("--optimizer.lrr=0.1",), ("--optimizer.lrr=0.1: no such key", "did you mean 'optimizer.lr'")),
        (("--delete", "nope"), ("--delete nope: no such key",)),
        (("--epochs", "3"), ("unknown flag '--epochs'", "write --epochs=VALUE")),
        (("--epochs=three",), ("key 'epochs': must be of integer type, found 'three' (str)",)),
        (("--model_parameters.hiden_size=3",), ("'model_parameters.hiden_size'", "did you mean 'hidden_size'")),
        (("--optimizer.lr=[1",), ("--optimizer.lr: invalid YAML",)),
        (("--data_directory=/does/not/exist",), ("'data_directory': '/does/not/exist' is not a directory",)),
    ],
)
def test_bad_flags_exit_2_with_one_message(project, args, fragments):
    result = project.run("sample_runconfig.yaml", *args)
    assert_clean_error(project, result, 2, *fragments)
    assert len(result.stderr.strip().splitlines()) <= 4


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("description: x\nepochs: [1\n", ("invalid YAML at line 3, column 1",)),
        ("", ("is empty",)),
        ("description: [unclosed", ("invalid YAML",)),
    ],
)
def test_bad_config_files_exit_2(project, text, fragments):
    (project.root / "bad.yaml").write_text(text)
    project.commit("bad config")
    assert_clean_error(project, project.run("bad.yaml"), 2, *fragments)


def test_injection_inside_an_otherwise_valid_config_runs_nothing(project):
    marker = project.root.parent / "injected"
    config = (project.root / "sample_runconfig.yaml").read_text()
    config = config.replace("F.mse_loss", f"\"__import__('os').system('touch {marker}')\"")
    (project.root / "evil.yaml").write_text(config)
    project.commit("evil")
    result = project.run("evil.yaml", *QUICK)
    assert_clean_error(project, result, 2, "'loss_function'", "is not a name", "never evaluated")
    assert not marker.exists()


def test_missing_config_file(project):
    assert_clean_error(project, project.run("nope.yaml"), 2, "'nope.yaml' does not exist")
    assert_clean_error(project, project.run(), 2, "no config file given")


def test_dirty_tree_is_refused_with_exit_3_and_nothing_written(project):
    (project.root / "src" / "model.py").write_text((project.root / "src" / "model.py").read_text() + "\n# edit\n")
    (project.root / "notes.txt").write_text("x")
    result = project.run("sample_runconfig.yaml", *QUICK)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    for fragment in ("modified: src/model.py", "untracked: notes.txt", "--allow-dirty-repo", "--no-logging"):
        assert fragment in result.stderr
    assert project.written_files() == ["notes.txt"]


def test_no_logging_skips_the_gate_and_writes_nothing(project):
    (project.root / "notes.txt").write_text("x")
    result = project.run("sample_runconfig.yaml", "--no-logging", *QUICK)
    assert result.returncode == 0, result.stderr
    assert project.written_files() == ["notes.txt"]


def test_allow_dirty_repo_without_a_terminal_needs_y(project):
    (project.root / "notes.txt").write_text("x")
    result = project.run("sample_runconfig.yaml", "--allow-dirty-repo", *QUICK)
    assert result.returncode == 3 and "no terminal to ask on; add --y" in result.stderr
    result = project.run("sample_runconfig.yaml", "--allow-dirty-repo", "--y", *QUICK)
    assert result.returncode == 0, result.stderr
    assert "will log nothing" in result.stderr and "untracked: notes.txt" in result.stderr
    assert project.written_files() == ["notes.txt"]


def read_terminal(controller: int, until: bytes | None, timeout: float) -> bytes:
    """Read a pseudo-terminal until `until` appears, or until the other side closes it."""
    seen, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline and (until is None or until not in seen):
        ready, _, _ = select.select([controller], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    return seen


def run_in_terminal(project, args, answer: str) -> tuple[int, str]:
    """Run in a real pseudo-terminal, as a user at a shell, answering the [y/n] question."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "run.py", *args], cwd=project.root, stdin=terminal, stdout=terminal, stderr=terminal
    )
    os.close(terminal)
    output = read_terminal(controller, b"[y/n]", timeout=60)
    os.write(controller, answer.encode() + b"\n")
    output += read_terminal(controller, None, timeout=300)
    os.close(controller)
    return process.wait(timeout=60), output.decode(errors="replace")


@pytest.mark.parametrize(("answer", "code"), [("y", 0), ("n", 3)])
def test_allow_dirty_repo_asks_on_a_terminal(project, answer, code):
    (project.root / "notes.txt").write_text("x")
    returncode, output = run_in_terminal(project, ["sample_runconfig.yaml", "--allow-dirty-repo", *QUICK], answer)
    assert "Run anyway, without logging? [y/n]" in output
    assert returncode == code, output
    assert project.written_files() == ["notes.txt"]


def test_flags_are_parsed_in_place():
    args = parse_command_line(
        ["c.yaml", "--cpu", "--find-replace", "a", "b", "--delete", "x", "y.z", "--a.b=[1, 2]", "--n=3"]
    )
    assert args.cpu and not args.mini and args.config == "c.yaml"
    assert args.edits.find_replace == [("a", "b")] and args.edits.delete == ["x", "y.z"]
    assert args.edits.overrides == [("a.b", "[1, 2]"), ("n", "3")]
