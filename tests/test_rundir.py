"""Run directories are created once and never shared; metadata keeps what others wrote."""

import multiprocessing
from pathlib import Path

import yaml

from src.core.rundir import create_run_directory, update_metadata


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
