"""Run directories are created once and never shared; metadata keeps what others wrote."""

import multiprocessing
from pathlib import Path

import pytest
import yaml

from src.core.errors import UserError
from src.core.record.rundir import create_run_directory, read_run_files, update_metadata


def _create(parent: str, queue) -> None:
    queue.put(str(create_run_directory(Path(parent), None)))


def test_runs_started_in_the_same_second_never_share_a_directory(tmp_path):
    queue = multiprocessing.get_context("fork").Queue()
    processes = [multiprocessing.get_context("fork").Process(target=_create, args=(tmp_path, queue)) for _ in range(8)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    created = [queue.get() for _ in processes]
    assert len(set(created)) == 8 and all(Path(path).is_dir() for path in created)


def test_a_named_run_is_never_reused(tmp_path):
    first = create_run_directory(tmp_path, "baseline")
    second = create_run_directory(tmp_path, "baseline")
    assert (first.name, second.name) == ("baseline", "baseline-2")


def test_metadata_updates_keep_the_users_summary(tmp_path):
    update_metadata(tmp_path, status="running", summary="")
    path = tmp_path / "metadata.yaml"
    metadata = yaml.safe_load(path.read_text())
    metadata["summary"] = "diverged after epoch 3: lr too high"  # written by the user meanwhile
    path.write_text(yaml.safe_dump(metadata))
    update_metadata(tmp_path, status="finished")
    assert yaml.safe_load(path.read_text()) == {"status": "finished", "summary": "diverged after epoch 3: lr too high"}


# --- read_run_files: what --resume and --evaluate read ------------------------------------------

SAVED = "description: x\ngit: {commit: 0123abcd}\nflags: {mini: false}\n"


def run_directory_with(tmp_path, config: str | None = SAVED, metadata: str | bytes | None = "status: x\n") -> Path:
    run = tmp_path / "logs" / "Model" / "run"
    run.mkdir(parents=True)
    if config is not None:
        (run / "config.yaml").write_text(config)
    if isinstance(metadata, bytes):
        (run / "metadata.yaml").write_bytes(metadata)
    elif metadata is not None:
        (run / "metadata.yaml").write_text(metadata)
    return run


def test_read_run_files_returns_both_files(tmp_path):
    config, metadata = read_run_files(run_directory_with(tmp_path), "--resume")
    assert config["git"]["commit"] == "0123abcd" and metadata == {"status": "x"}


@pytest.mark.parametrize(
    ("config", "metadata", "flag", "expected"),
    [
        (None, "status: running\n", "--resume", "no config.yaml there"),
        ("description: [unclosed\n", "status: running\n", "--evaluate", "config.yaml: invalid YAML at line 2"),
        ("- a list\n", "status: running\n", "--resume", "config.yaml holds a list; expected the mapping"),
        ("", "status: running\n", "--resume", "config.yaml holds nothing"),
        ("description: x\n", "status: running\n", "--resume", "has no git.commit or flags"),
        ("a: &a [*a]\n", "status: running\n", "--resume", "config.yaml: invalid YAML at line 1, column 4: a recursive"),
        (SAVED, "status: [running\n", "--evaluate", "metadata.yaml: invalid YAML"),
        (SAVED, "just text\n", "--resume", "metadata.yaml holds a str"),
        (SAVED, b"status: \xff\xfe\n", "--resume", "metadata.yaml cannot be read"),  # not UTF-8
    ],
)
def test_read_run_files_refuses_what_a_run_never_writes(tmp_path, config, metadata, flag, expected):
    run = run_directory_with(tmp_path, config, metadata)
    with pytest.raises(UserError) as caught:
        read_run_files(run, flag)
    assert str(caught.value).startswith(f"{flag} {run}") and expected in str(caught.value)


def test_a_run_killed_before_its_metadata_was_written_still_reads(tmp_path):
    for flag in ("--evaluate", "--resume"):
        assert read_run_files(run_directory_with(tmp_path / flag, metadata=None), flag)[1] == {}


def test_a_file_or_a_missing_path_is_not_a_run_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "missing"):
        with pytest.raises(UserError, match="not a directory; expected a run directory"):
            read_run_files(path, "--resume")
