"""Checkpoint files: atomic writes, verification, safe loading, pruning."""

import json
import os
import threading
import zipfile

import pytest
import torch

from src.core.record import checkpoint
from src.core.record.checkpoint import (
    CheckpointWriter,
    DamagedCheckpoint,
    Retention,
    newest_valid_checkpoint,
    read_checkpoint,
    step_checkpoints,
    write_checkpoint,
)


def state(step: int) -> dict:
    return {
        "format": checkpoint.FORMAT_VERSION,
        "model": {"weight": torch.full((64, 64), float(step))},
        "progress": {"epoch": 0, "batch_in_epoch": step, "global_step": step},
        "rng": {"python": (3, tuple(range(625)), None)},
    }


def test_round_trip_and_manifest(tmp_path):
    path = write_checkpoint(tmp_path, state(7), links=("last",))
    assert path.name == "step-000000007.pt"
    manifest = json.loads((tmp_path / "step-000000007.json").read_text())
    assert manifest["bytes"] == path.stat().st_size and len(manifest["sha256"]) == 64 and manifest["step"] == 7
    loaded = read_checkpoint(path)
    assert torch.equal(loaded["model"]["weight"], torch.full((64, 64), 7.0))
    assert loaded["rng"]["python"][1][:3] == (0, 1, 2)
    assert os.path.samefile(tmp_path / "last.pt", path)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["progress"]["global_step"] == 7  # plain torch.load
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_truncated_checkpoint_is_detected_and_skipped(tmp_path, capsys):
    write_checkpoint(tmp_path, state(1))
    newest = write_checkpoint(tmp_path, state(2))
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.raises(DamagedCheckpoint, match="truncated"):
        read_checkpoint(newest)
    path, loaded = newest_valid_checkpoint(tmp_path)
    assert path.name == "step-000000001.pt" and loaded["progress"]["global_step"] == 1
    assert "skipping checkpoint step-000000002.pt" in capsys.readouterr().err


def test_one_flipped_byte_is_detected(tmp_path):
    path = write_checkpoint(tmp_path, state(3))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match="SHA-256 does not match"):
        read_checkpoint(path)
    assert newest_valid_checkpoint(tmp_path) is None


def test_checkpoint_without_manifest_is_incomplete(tmp_path):
    path = write_checkpoint(tmp_path, state(4))
    (tmp_path / "step-000000004.json").unlink()  # as if killed between the rename and the manifest
    with pytest.raises(DamagedCheckpoint, match="no readable manifest"):
        read_checkpoint(path)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "step-000000005.pt"
    torch.save({"format": checkpoint.FORMAT_VERSION, "payload": RunsCode(marker)}, path)
    # A valid manifest, as an attacker who can write the directory could also make:
    (tmp_path / "step-000000005.json").write_text(
        json.dumps({"bytes": path.stat().st_size, "sha256": checkpoint.hashlib.sha256(path.read_bytes()).hexdigest()})
    )
    with zipfile.ZipFile(path) as archive:  # the file really holds the os.system call
        assert b"system" in archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    with pytest.raises(DamagedCheckpoint, match="weights_only"):
        read_checkpoint(path)
    assert not marker.exists()


def test_write_failure_keeps_previous_checkpoints(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, state(1), links=("last",))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device"):
        write_checkpoint(tmp_path, state(2), links=("last",))
    assert [info.step for info in step_checkpoints(tmp_path)] == [1]
    assert read_checkpoint(tmp_path / "last.pt")["progress"]["global_step"] == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_background_writer_reports_errors_and_prunes(tmp_path, monkeypatch):
    written = []
    writer = CheckpointWriter(tmp_path, keep_recent=2)
    writer.save(state(1), ("last", "best"), written.append)
    for step in range(2, 6):
        writer.save(state(step), ("last",), written.append)
    writer.wait()
    assert [p.name for p in written] == [f"step-00000000{i}.pt" for i in range(1, 6)]
    # best (step 1) is kept although older than the two most recent (4, 5).
    assert [info.step for info in step_checkpoints(tmp_path)] == [1, 4, 5]
    assert read_checkpoint(tmp_path / "best.pt")["progress"]["global_step"] == 1

    monkeypatch.setattr(checkpoint, "write_checkpoint", lambda *a: (_ for _ in ()).throw(OSError("disk")))
    writer.save(state(6), ("last",), written.append)
    with pytest.raises(OSError, match="disk"):
        writer.wait()


def test_milestones_survive_pruning_beside_recent_best_and_last(tmp_path):
    """keep_every_n_steps keeps multiples of N; keep_every_n_epochs keeps every N-th epoch's end."""
    writer = CheckpointWriter(tmp_path, Retention(2, every_n_steps=4, every_n_epochs=2), background=False)
    for step in range(1, 13):  # epochs of 3 steps: steps 3, 6, 9, 12 end epochs 1 to 4
        epoch_end = step % 3 == 0
        progress = {"epoch": step // 3, "batch_in_epoch": 0 if epoch_end else step % 3, "global_step": step}
        writer.save({**state(step), "progress": progress}, ("last", "best") if step == 1 else ("last",), lambda _: None)
    # 1: best; 4, 8, 12: multiples of 4; 6, 12: ends of epochs 2 and 4; 11, 12: the two newest.
    assert [info.step for info in step_checkpoints(tmp_path)] == [1, 4, 6, 8, 11, 12]

    plain = tmp_path / "plain"
    writer = CheckpointWriter(plain, keep_recent=2, background=False)
    for step in range(1, 7):
        writer.save(state(step), ("last",), lambda _: None)
    assert [info.step for info in step_checkpoints(plain)] == [5, 6]


def test_snapshot_is_independent_of_training(tmp_path, monkeypatch):
    trained = threading.Event()
    original = checkpoint.write_checkpoint

    def write_after_training_moved_on(*args):
        trained.wait(timeout=30)
        return original(*args)

    monkeypatch.setattr(checkpoint, "write_checkpoint", write_after_training_moved_on)
    weight = torch.zeros(3)
    writer = CheckpointWriter(tmp_path, keep_recent=5)
    snapshot_state = state(1)
    snapshot_state["model"] = {"weight": weight}
    writer.save(snapshot_state, (), lambda path: None)
    weight += 1  # training goes on before the background write starts
    trained.set()
    writer.wait()
    assert torch.equal(read_checkpoint(tmp_path / "step-000000001.pt")["model"]["weight"], torch.zeros(3))


def test_the_writer_reports_a_failure_before_anyone_waits(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "write_checkpoint", lambda *a: (_ for _ in ()).throw(OSError("disk")))
    writer = CheckpointWriter(tmp_path, keep_recent=2)
    writer.save(state(1), ("last",), lambda path: None)
    writer._thread.join()
    assert writer.failed  # what training checks after every step
    with pytest.raises(OSError, match="disk"):
        writer.wait()
    assert not writer.failed


def test_leftovers_of_a_killed_run_never_push_out_the_only_valid_checkpoint(tmp_path):
    write_checkpoint(tmp_path, state(20))
    leftover = write_checkpoint(tmp_path, state(30))
    (tmp_path / "step-000000030.json").unlink()  # killed between the rename and the manifest
    (tmp_path / ".step-000000035.pt.tmp").write_bytes(b"partial")  # killed mid-write
    path, loaded = newest_valid_checkpoint(tmp_path)
    assert path.name == "step-000000020.pt"

    # What a resume from step 20 does first: the later leftovers go aside, the partial file goes.
    assert checkpoint.set_aside_newer_than(tmp_path, loaded["progress"]["global_step"]) == [leftover.name]
    assert (tmp_path / "discarded" / leftover.name).exists()
    assert not list(tmp_path.glob(".*.tmp"))

    # Even had a leftover stayed, pruning counts only complete checkpoints as recent.
    (tmp_path / "step-000000040.pt").write_bytes(b"no manifest")
    writer = CheckpointWriter(tmp_path, keep_recent=1, background=False)
    writer.save(state(25), (), lambda path: None)
    assert newest_valid_checkpoint(tmp_path)[0].name == "step-000000025.pt"
    assert [info.step for info in step_checkpoints(tmp_path)] == [25, 40]


def test_a_snapshot_reuses_the_previous_ones_memory_and_each_file_keeps_its_values(tmp_path):
    writer = CheckpointWriter(tmp_path, keep_recent=5)
    weight = torch.ones(64, 64)
    writer.save({**state(1), "model": {"weight": weight}}, (), lambda path: None)
    first = writer._snapshot["model"]["weight"]
    weight.fill_(2)
    writer.save({**state(2), "model": {"weight": weight}}, (), lambda path: None)
    writer.wait()
    assert writer._snapshot["model"]["weight"] is first  # filled in place, no new memory
    for step in (1, 2):
        loaded = read_checkpoint(tmp_path / f"step-00000000{step}.pt")["model"]["weight"]
        assert torch.equal(loaded, torch.full((64, 64), float(step)))


def test_what_a_checkpoint_covers_is_made_durable_before_it_becomes_visible(tmp_path, monkeypatch):
    """`covered` (metrics.jsonl fsynced, TensorBoard's and the figures' threads caught up: see
    RunOutput.save_checkpoint) runs on the writer thread after the checkpoint's own data is on
    disk and before the rename that makes it visible: training never waits for it, and no
    checkpoint covers values a kill or a power cut could lose."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append("fsync")
        return real_fsync(descriptor)

    def replace(source, target):
        events.append(f"replace {os.path.basename(target)}")
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_checkpoint(tmp_path / "checkpoints", state(3), covered=lambda: events.append("covered"))
    assert events[:3] == ["fsync", "covered", "replace step-000000003.pt"]


def test_a_checkpoint_whose_tensorboard_writer_stopped_on_a_full_disk_is_not_made(tmp_path, monkeypatch):
    """It would cover values TensorBoard never got: it fails as a checkpoint write does, naming the
    disk's error, and the checkpoint does not show (rather than waiting for a thread that is gone)."""
    from src.core.tracking.metrics import MetricLogger
    from src.core.tracking.tensorboard import EventFile

    def full_disk(self, event):
        raise OSError(28, "No space left on device")

    logger = MetricLogger(tmp_path)
    monkeypatch.setattr(EventFile, "write", full_disk)
    logger.log(1, 1, "train", {"loss": 1.0})
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device"):
        write_checkpoint(tmp_path / "checkpoints", state(1), covered=logger.make_durable)
    assert not list((tmp_path / "checkpoints").iterdir())
