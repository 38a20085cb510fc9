"""run.py's command line, as a user meets it: exit codes, messages, and nothing written on errors."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest
import yaml

from src.core.commands.cli import parse_command_line
from src.core.errors import UserError

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


def test_repeated_edit_flags_add_up_instead_of_replacing_each_other():
    edits = ["--delete", "a", "--delete", "b.c", "d", "--modify", "e", "1", "--modify", "f", "2"]
    args = parse_command_line(["c.yaml", *edits, "--find-replace", "x", "y", "--find-replace", "u", "v"])
    assert args.edits.delete == ["a", "b.c", "d"]
    assert args.edits.modify == [("e", "1"), ("f", "2")]
    assert args.edits.find_replace == [("x", "y"), ("u", "v")]
    # Each occurrence holds whole pairs: the partner of a value is never taken from the next flag.
    assert "--modify takes pairs" in parse_error(["c.yaml", "--modify", "e", "--modify", "1"])


def parse_error(argv: list[str]) -> str:
    with pytest.raises(UserError) as caught:
        parse_command_line(argv)
    return str(caught.value)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["c.yaml", "--checkpoints", "best"], "--checkpoints does nothing with a new run (CONFIG.yaml)"),
        (["c.yaml", "--submit"], "--submit does nothing without --slurm"),
        (["c.yaml", "--y"], "--y does nothing without --allow-dirty-repo"),
        (["c.yaml", "--filter", "x"], "--filter does nothing with a new run"),
        (["c.yaml", "--status", "failed"], "--status does nothing with a new run"),
        (["c.yaml", "--csv"], "--csv does nothing with a new run"),
        (["--runs", "--cpu"], "--cpu does nothing with --runs"),
        (["--runs", "--epochs=3"], "--KEY=VALUE does nothing with --runs"),
        (["--note", "logs/a/b", "text", "--mini"], "--mini does nothing with --note"),
        (["--reproduce", "logs/a/b", "--mini"], "--mini does nothing with --reproduce"),
        (["--reproduce", "logs/a/b", "--delete", "seed"], "--delete does nothing with --reproduce"),
        (["--evaluate", "logs/a/b", "--mini"], "--mini does nothing with --evaluate"),
        (["--evaluate", "logs/a/b", "--allow-dirty-repo"], "--allow-dirty-repo does nothing with --evaluate"),
        (["--resume", "logs/a/b", "--print-config"], "--print-config does nothing with --resume"),
        (["--resume", "logs/a/b", "--slurm"], "--slurm does nothing with --resume"),
        (["--resume", "logs/a/b", "--log-dir", "x"], "--log-dir does nothing with --resume"),
        (["--resume", "logs/a/b", "--evaluate", "logs/a/b"], "--evaluate and --resume cannot be combined"),
        (["--reproduce", "logs/a/b", "c.yaml"], "--reproduce takes no config file, but got 'c.yaml'"),
        (["c.yaml", "--no-logging", "--log-dir", "x"], "--log-dir does nothing with --no-logging"),
        (["c.yaml", "--print-config", "--run-parent", "x"], "--run-parent does nothing with --print-config"),
        (["c.yaml", "--log-dir", "x", "--run-parent", "y"], "--log-dir would do nothing"),
        (["c.yaml", "--slurm", "--print-config"], "--slurm does nothing with --print-config"),
        (["c.yaml", "--requeue", "--print-config"], "--requeue does nothing with --print-config"),
        (["c.yaml", "--print-config", "--auto-resume"], "--auto-resume does nothing with --print-config"),
        (["c.yaml", "--from-step", "3"], "--from-step does nothing with a new run"),
        (["--resume", "logs/a/b", "--from-step", "x"], "expected an optimizer step"),
        (["--resume", "logs/a/b", "--name", "a"], "--name does nothing with --resume"),
        (["c.yaml", "--save-outputs"], "--save-outputs does nothing with a new run"),
        (["--evaluate", "logs/a/b", "--auto-resume"], "--auto-resume does nothing with --evaluate"),
        (["c.yaml", "--auto-resume", "--no-logging"], "--auto-resume continues a logged run"),
    ],
)
def test_flags_that_would_do_nothing_are_refused(argv, expected):
    assert expected in parse_error(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["--resume", "logs/a/b", "--cpu", "--mini", "--requeue", "--distributed.nnodes=2"],  # a requeued Slurm task
        ["--evaluate", "logs/a/b", "--no-logging", "--checkpoints", "last", "--cpu"],
        ["--reproduce", "logs/a/b", "--cpu", "--epochs=1"],
        ["--runs", "logs", "--filter", "x", "--status", "failed", "--csv"],
        ["c.yaml", "--slurm", "--submit", "--requeue", "--mini", "--cpu"],
        ["c.yaml", "--allow-dirty-repo", "--y", "--no-logging"],
        ["--evaluate", "logs/a/b", "--name", "hard", "--subset", "0.25", "--save-outputs", "--data_directory=x"],
        ["--resume", "logs/a/b", "--from-step", "20", "--optimizer.lr=1e-3"],
        ["c.yaml", "--auto-resume", "--run_name=x", "--requeue"],
    ],
)
def test_flags_in_their_context_are_accepted(argv):
    parse_command_line(argv)


def test_log_dir_and_run_parent_must_be_able_to_be_directories(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is a file, not a directory" in parse_error(["c.yaml", "--log-dir", str(afile)])
    assert f"{afile} is a file, so" in parse_error(["c.yaml", "--log-dir", str(afile / "logs")])
    assert "is a file, not a directory" in parse_error(["c.yaml", "--run-parent", str(afile)])
    message = parse_error(["c.yaml", "--run-parent", str(tmp_path / "missing" / "parent")])
    assert f"its parent {tmp_path / 'missing'} is not an existing directory" in message
    parse_command_line(["c.yaml", "--log-dir", str(tmp_path / "new" / "logs")])  # made with its parents
    parse_command_line(["c.yaml", "--run-parent", str(tmp_path / "new")])


def test_a_refused_flag_exits_2_before_anything_runs(project):
    (project.root.parent / "afile").write_text("x")
    result = project.run("sample_runconfig.yaml", "--log-dir", str(project.root.parent / "afile"))
    assert_clean_error(project, result, 2, "--log-dir", "is a file, not a directory")
    result = project.run("sample_runconfig.yaml", "--checkpoints", "best")
    assert_clean_error(project, result, 2, "--checkpoints does nothing with a new run")


def test_help_shows_archive_taking_a_run_directory_and_an_optional_uri():
    from src.core.commands.cli import build_parser

    text = build_parser().format_help()
    assert "--archive RUN_DIR [URI]" in text and "[URI] ..." not in text and "[URI] [" not in text
