"""Archiving runs: a real S3 API on localhost (moto's standalone server, a subprocess the
tests start and stop), a real GCS JSON API on localhost (gcp-storage-emulator, likewise) and
file:// stores; real checkpoints, real processes killed with kill -9, real `python run.py`
runs restored and resumed elsewhere. No mocks of fsspec, s3fs or gcsfs."""

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CREDENTIALS, QUICK_RUN, GcsEmulator, MotoServer, assert_same_run

from src.core.archive.commands import archive_run
from src.core.archive.mirror import Mirror
from src.core.archive.restore import restore_run
from src.core.archive.store import ENVIRONMENT_VARIABLE, Store, archive_uri, refused, store_errors
from src.core.config.schema import project_schema
from src.core.config.validation import validate
from src.core.errors import UserError
from src.core.record.checkpoint import CheckpointWriter, read_checkpoint, step_checkpoints
from src.core.record.rundir import lock_run_directory, read_yaml, update_metadata

SCHEMA = project_schema()

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def moto_server():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3_archive(moto_server, monkeypatch) -> str:
    """A fresh bucket on the module's server; s3fs finds it through AWS_ENDPOINT_URL."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    bucket = f"runs-{uuid.uuid4().hex[:12]}"
    Store(f"s3://{bucket}").fs.mkdir(bucket)
    return f"s3://{bucket}/archive"


@pytest.fixture(scope="module")
def gcs_emulator():
    emulator = GcsEmulator()
    yield emulator
    emulator.stop()


@pytest.fixture
def gs_archive(gcs_emulator, monkeypatch) -> str:
    """A fresh bucket on the module's emulator; gcsfs finds it through STORAGE_EMULATOR_HOST
    (and so do the `python run.py` children, which inherit the environment)."""
    for name, value in gcs_emulator.environment.items():
        monkeypatch.setenv(name, value)
    bucket = f"runs-{uuid.uuid4().hex[:12]}"
    Store(f"gs://{bucket}").fs.mkdir(bucket)
    return f"gs://{bucket}/archive"


@pytest.fixture
def file_archive(tmp_path) -> str:
    return f"file://{tmp_path}/shared/archive"


@pytest.fixture(params=["s3", "gs", "file"])
def archive(request) -> str:
    return request.getfixturevalue(f"{request.param}_archive")


def make_run(root: Path, name: str = "run1", description: str = "archive test") -> Path:
    """A run directory as the template writes it, without training: config, metadata, metrics, a figure."""
    run = root / "logs" / "Proj" / name
    (run / "figures" / "rollout").mkdir(parents=True)
    config = {"description": description, "epochs": 3, "git": {"commit": "0" * 40}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "packages.txt").write_text("torch==2.13.0\n")
    (run / "metrics.jsonl").write_text('{"step": 0, "phase": "val", "name": "loss", "value": 1.0}\n')
    (run / "events.out.tfevents.1.host").write_bytes(b"\x00events")
    (run / "figures" / "rollout" / "trajectory.png").write_bytes(b"\x89PNG fake")
    update_metadata(run, status="running", description=description, started="2026-11-29T10:00:00", epochs_done=1)
    return run


def checkpoint_state(step: int, numbers: int = 1000) -> dict:
    generator = torch.Generator().manual_seed(step)
    return {
        "format": 1,
        "progress": {"global_step": step, "epoch": step // 10, "batch_in_epoch": step % 10},
        "model": {"weight": torch.randn(numbers, generator=generator)},
    }


def write_checkpoints(writer: CheckpointWriter, steps, best=()) -> None:
    for step in steps:
        links = ("last", "best") if step in best else ("last",)
        writer.save(checkpoint_state(step), links, on_written=lambda path: None)


def archived_names(uri: str, run: Path) -> set[str]:
    store = Store(f"{uri}/{run.parent.name}/{run.name}")
    store.refresh()
    return {name for name in store.listing("checkpoints") if not name.startswith(".")}


def assert_restored_checkpoints_verify(directory: Path) -> list[int]:
    """Every .pt in the restored run loads through the template's verification; their steps."""
    steps = []
    for path in sorted((directory / "checkpoints").glob("*.pt")):
        steps.append(read_checkpoint(path)["progress"]["global_step"])  # raises DamagedCheckpoint
    assert not list((directory / "checkpoints").glob(".*")), "temporary files left behind"
    return steps


def archive_command(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python run.py FLAGS` in `cwd`."""
    return subprocess.run(
        [sys.executable, "run.py", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(cwd), **(env or {})},
    )


def wait_for(condition, what: str, seconds: float = 120) -> None:
    """Poll until `condition()` (a background thread's work); fail with `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def archive_state(run: Path) -> dict:
    return (read_yaml(run / "metadata.yaml") or {}).get("archive") or {}


# ---------------------------------------------------------------------------------------
# The live mirror


def test_mirror_follows_checkpoints_pruning_and_pointers(archive, tmp_path):
    run = make_run(tmp_path)
    mirror = Mirror(run, archive)
    writer = CheckpointWriter(run / "checkpoints", keep_recent=2, archive=mirror)
    write_checkpoints(writer, range(1, 7), best={2})
    writer.wait()
    assert mirror.close(120)

    local = {p.name for p in (run / "checkpoints").iterdir()} - {"last.pt", "best.pt"}
    steps = {f"step-00000000{n}.{ext}" for n in (2, 5, 6) for ext in ("pt", "json")}
    assert local == steps | {"last.json", "best.json"}
    assert archived_names(archive, run) == local  # pruned in the archive too; pointers instead of copies
    assert archive_state(run) == {
        "uri": f"{archive}/Proj/run1",
        "status": "synced",
        "last_synced_step": 6,
    }

    report = restore_run(f"{archive}/Proj/run1", tmp_path / "elsewhere")
    restored = report.directory
    assert sorted(report.restored) == sorted(n for n in local if n.endswith(".pt")) and not report.damaged
    assert assert_restored_checkpoints_verify(restored) == [2, 6, 2, 5, 6]  # best, last, then the step files
    assert (restored / "checkpoints" / "last.pt").samefile(restored / "checkpoints" / "step-000000006.pt")
    assert (restored / "checkpoints" / "best.pt").samefile(restored / "checkpoints" / "step-000000002.pt")
    for name in ("config.yaml", "packages.txt", "metrics.jsonl", "events.out.tfevents.1.host"):
        assert (restored / name).read_bytes() == (run / name).read_bytes()
    assert (restored / "figures/rollout/trajectory.png").read_bytes() == b"\x89PNG fake"
    assert read_yaml(restored / "metadata.yaml")["archive"]["status"] == "synced"
    assert not (restored / ".restoring").exists()


def test_uploads_wait_for_the_interval_and_close_does_not(file_archive, tmp_path):
    """Checkpoints saved within one interval go up together; those pruned meanwhile never do."""
    run = make_run(tmp_path)
    mirror = Mirror(run, file_archive, interval=3600)
    assert mirror.wait_until_idle(60) and mirror.passes == 1  # the run's files, at once
    writer = CheckpointWriter(run / "checkpoints", keep_recent=2, archive=mirror)
    write_checkpoints(writer, [1, 2, 3, 4])
    writer.wait()
    time.sleep(1)  # time enough for a pass, were one due
    assert mirror.passes == 1 and archived_names(file_archive, run) == set()

    assert mirror.close(60)  # the final sync does not wait out the hour
    assert mirror.passes == 2
    assert archived_names(file_archive, run) == {
        f"step-00000000{n}.{ext}" for n in (3, 4) for ext in ("pt", "json")
    } | {"last.json"}
    assert mirror.uploader.present == {"step-000000003.pt", "step-000000004.pt"}  # 1 and 2 never sent
    assert mirror.uploader.report.removed == []  # nor removed: no request for them at all
    assert archive_state(run)["last_synced_step"] == 4


def test_archive_refuses_a_run_that_is_still_training(file_archive, tmp_path):
    run = make_run(tmp_path)
    held = lock_run_directory(run)  # as the training process holds it
    try:
        result = archive_command("--archive", str(run), file_archive)
    finally:
        held.close()
    assert result.returncode == 3 and "in use by another process" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not Path(file_archive.removeprefix("file://")).exists()
    assert archive_command("--archive", str(run), file_archive).returncode == 0  # once it has ended


def test_store_stopped_mid_run_warns_once_and_a_later_archive_completes_it(tmp_path, monkeypatch, capfd):
    server = MotoServer()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        for name, value in CREDENTIALS.items():
            monkeypatch.setenv(name, value)
        Store("s3://runs").fs.mkdir("runs")
        run = make_run(tmp_path)
        mirror = Mirror(run, "s3://runs/archive", retry_delays=(0.2, 0.5))
        writer = CheckpointWriter(run / "checkpoints", keep_recent=3, archive=mirror)
        write_checkpoints(writer, [1])
        wait_for(lambda: archive_state(run).get("last_synced_step") == 1, "the first checkpoint's upload")

        server.stop()  # the store disappears; training goes on
        write_checkpoints(writer, [2, 3, 4])
        writer.wait()
        wait_for(lambda: archive_state(run).get("status") == "behind", "the mirror to notice")
        assert not mirror.close(timeout=3)
        stderr = capfd.readouterr().err
        assert stderr.count("cannot write to s3://runs/archive/Proj/run1") == 1, stderr
        assert "did not finish within 3 s" in stderr and f"--archive {run}" in stderr
        assert archive_state(run) == {"uri": "s3://runs/archive/Proj/run1", "status": "behind", "last_synced_step": 1}
    finally:
        server.stop()

    server = MotoServer()  # a store again (moto forgets what it held: the archive starts empty)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        Store("s3://runs").fs.mkdir("runs")
        archive_run(run, "s3://runs/archive")
        assert archived_names("s3://runs/archive", run) >= {f"step-00000000{n}.json" for n in (2, 3, 4)}
        assert archive_state(run) == {"uri": "s3://runs/archive/Proj/run1", "status": "synced", "last_synced_step": 4}
        restored = restore_run("s3://runs/archive/Proj/run1", tmp_path / "elsewhere").directory
        assert assert_restored_checkpoints_verify(restored) == [4, 2, 3, 4]
    finally:
        server.stop()


def restricted_store(monkeypatch, server: MotoServer, actions=("s3:GetObject", "s3:ListBucket")) -> str:
    """A bucket, and credentials of a user allowed only `actions` there (moto enforcing IAM);
    by default one that may read but not write."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3").create_bucket(Bucket="runs")
    iam = boto3.client("iam")
    iam.create_user(UserName="reader")
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    policy = {"Effect": "Allow", "Action": list(actions), "Resource": "*"}
    document = json.dumps({"Version": "2012-10-17", "Statement": [policy]})
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=document)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    return "s3://runs/archive"


def test_a_policy_without_multipart_listing_still_archives(tmp_path, monkeypatch, capfd):
    """Many policies grant objects' get, put, delete and the bucket's listing, and no more:
    the clean-up of killed uploads is then skipped, with a word, and archiving goes on."""
    server = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        actions = ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket")
        uri = restricted_store(monkeypatch, server, actions)
        run = make_run(tmp_path)
        mirror = Mirror(run, uri)
        writer = CheckpointWriter(run / "checkpoints", keep_recent=2, archive=mirror)
        write_checkpoints(writer, [1, 2, 3])
        writer.wait()
        assert mirror.close(120)
        assert archive_state(run) == {"uri": f"{uri}/Proj/run1", "status": "synced", "last_synced_step": 3}
        stderr = capfd.readouterr().err
        assert stderr.count("may not look for unfinished uploads") == 1 and "warning" not in stderr, stderr
        assert archived_names(uri, run) >= {"step-000000003.pt", "step-000000003.json", "last.json"}
    finally:
        server.stop()


@pytest.mark.parametrize("status, is_refusal", [(401, True), (403, True), (404, False), (500, False), (503, False)])
def test_a_gcs_refusal_is_told_from_an_outage(status, is_refusal):
    """gcsfs maps HTTP statuses to exceptions itself (the emulator has no access control to
    answer 403): its own mapping decides "failed" (check the credentials) against "behind"."""
    from gcsfs.retry import validate_response

    with pytest.raises(store_errors()) as raised:
        validate_response(status, b'{"error": {"message": "no"}}', "bucket/run/config.yaml")
    assert refused(raised.value) is is_refusal


def test_store_that_refuses_writes(tmp_path, monkeypatch, capfd):
    server = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"})  # then IAM applies: the set-up needs 4
    try:
        uri = restricted_store(monkeypatch, server)
        run = make_run(tmp_path)
        mirror = Mirror(run, uri, retry_delays=(0.2,))
        writer = CheckpointWriter(run / "checkpoints", keep_recent=2, archive=mirror)
        write_checkpoints(writer, [1, 2])  # training goes on
        writer.wait()
        wait_for(lambda: archive_state(run).get("status") == "failed", "the refusal to be recorded")
        assert not mirror.close(timeout=1)
        stderr = capfd.readouterr().err
        assert stderr.count("warning: archive: cannot write") == 1 and "PermissionError" in stderr, stderr
        assert archived_names(uri, run) == set()  # nothing half-written that looks like a checkpoint

        with pytest.raises(UserError, match=r"refused access to s3://runs/archive/Proj/run1 .*check the credentials"):
            archive_run(run, uri)

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN")  # credentials the store does not know
        result = archive_command("--runs", uri)
        assert result.returncode == 2 and "refused access" in result.stderr and "Traceback" not in result.stderr
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------
# Faults: kill -9 during an upload, a damaged object, an interrupted restore


# Uploads in order: config.yaml, metadata.yaml, packages.txt, step 1, metrics.jsonl, step 2...
@pytest.mark.parametrize("fault", ["archive_manifest:2", "archive_upload:6"])
def test_kill_during_upload_leaves_no_checkpoint_without_its_manifest(archive, tmp_path, fault):
    """Killed after a .pt was stored but before its manifest, or while a .pt was being sent:
    the archive holds the earlier checkpoints complete, and nothing that passes for the killed one."""
    run = make_run(tmp_path)
    write_checkpoints(CheckpointWriter(run / "checkpoints", keep_recent=5, background=False), [1, 2, 3], best={1})
    killed = archive_command("--archive", str(run), archive, env={"TEMPLATE_FAULT": fault})
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    report = restore_run(f"{archive}/Proj/run1", tmp_path / "elsewhere")
    assert report.restored == ["step-000000001.pt"]  # the first; the second was being uploaded
    assert all("step-000000002.pt" in line for line in report.damaged)
    assert assert_restored_checkpoints_verify(report.directory) == [1]  # pointers go up after the checkpoints

    if archive.startswith("file://"):  # the killed copy's temporary file, which the next pass removes
        shared = Path(archive.removeprefix("file://"))
        killed_copies = [p.name.rsplit("-", 1)[0] for p in shared.rglob(".*.part-*")]
        assert killed_copies == ([".step-000000002.pt.part"] if fault.startswith("archive_upload") else [])
    assert archive_command("--archive", str(run), archive).returncode == 0  # resumable: completes it
    if archive.startswith("file://"):
        assert not list(shared.rglob(".*.part-*"))
    report = restore_run(f"{archive}/Proj/run1", tmp_path / "third")
    assert not report.damaged and assert_restored_checkpoints_verify(report.directory) == [1, 3, 1, 2, 3]


def test_kill_in_the_middle_of_a_multipart_upload(s3_archive, tmp_path):
    """A checkpoint above s3fs's 100 MiB multipart threshold, killed between its parts."""
    run = make_run(tmp_path)
    writer = CheckpointWriter(run / "checkpoints", keep_recent=5, background=False)
    writer.save(checkpoint_state(1), ("last",), on_written=lambda path: None)
    writer.save(checkpoint_state(2, numbers=27_000_000), ("last",), on_written=lambda path: None)  # 108 MB
    killed = archive_command("--archive", str(run), s3_archive, env={"TEMPLATE_FAULT": "archive_upload:6"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert archived_names(s3_archive, run) == {"step-000000001.pt", "step-000000001.json"}  # no partial object
    report = restore_run(f"{s3_archive}/Proj/run1", tmp_path / "elsewhere")
    assert report.restored == ["step-000000001.pt"] and assert_restored_checkpoints_verify(report.directory) == [1]

    # S3 keeps (and bills) the parts the killed writer sent, until the upload is aborted.
    assert unfinished_uploads(s3_archive) == ["archive/Proj/run1/checkpoints/step-000000002.pt"]
    store = Store(s3_archive)
    other_run = "archive/Proj/run10/checkpoints/step-000000001.pt"  # another run's, in flight: not ours to abort
    store.fs.call_s3("create_multipart_upload", Bucket=store.root.partition("/")[0], Key=other_run)
    completed = archive_command("--archive", str(run), s3_archive)
    assert completed.returncode == 0, completed.stderr
    assert "removed an unfinished upload of checkpoints/step-000000002.pt" in completed.stderr
    assert unfinished_uploads(s3_archive) == [other_run]
    report = restore_run(f"{s3_archive}/Proj/run1", tmp_path / "third")
    assert not report.damaged and assert_restored_checkpoints_verify(report.directory) == [2, 1, 2]


def unfinished_uploads(uri: str) -> list[str]:
    """The keys of the bucket's multipart uploads that were begun and never completed or aborted."""
    store = Store(uri)
    bucket = store.root.partition("/")[0]
    return sorted(
        upload["Key"] for upload in store.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    )


def test_restore_skips_a_damaged_object_and_never_leaves_it(file_archive, tmp_path):
    run = make_run(tmp_path)
    write_checkpoints(CheckpointWriter(run / "checkpoints", keep_recent=5, background=False), [1, 2, 3])
    archive_run(run, file_archive)
    stored = Path(file_archive.removeprefix("file://")) / "Proj/run1/checkpoints/step-000000003.pt"
    data = bytearray(stored.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the archive
    stored.write_bytes(bytes(data))

    report = restore_run(f"{file_archive}/Proj/run1", tmp_path / "elsewhere")
    assert report.restored == ["step-000000001.pt", "step-000000002.pt"]
    assert [line.split(":")[0] for line in report.damaged] == ["step-000000003.pt", "last.pt"]
    assert not (report.directory / "checkpoints" / "step-000000003.pt").exists()
    assert assert_restored_checkpoints_verify(report.directory) == [1, 2]


def test_interrupted_restore_is_completed_by_running_it_again(archive, tmp_path):
    run = make_run(tmp_path)
    write_checkpoints(CheckpointWriter(run / "checkpoints", keep_recent=5, background=False), [1, 2, 3, 4], best={2})
    archive_run(run, archive)
    log_dir = tmp_path / "elsewhere"
    killed = archive_command(
        "--restore", f"{archive}/Proj/run1", "--log-dir", str(log_dir), env={"TEMPLATE_FAULT": "archive_download:8"}
    )
    assert killed.returncode == -signal.SIGKILL
    directory = log_dir / "Proj" / "run1"
    assert (directory / ".restoring").exists()  # clearly incomplete
    for path in (directory / "checkpoints").glob("step-*.pt"):  # whatever is in place verifies
        read_checkpoint(path)

    result = archive_command("--restore", f"{archive}/Proj/run1", "--log-dir", str(log_dir))
    assert result.returncode == 0, result.stderr
    assert "already here and verified" in result.stdout
    assert not (directory / ".restoring").exists()
    assert assert_restored_checkpoints_verify(directory) == [2, 4, 1, 2, 3, 4]

    again = archive_command("--restore", f"{archive}/Proj/run1", "--log-dir", str(log_dir))
    assert again.returncode == 2 and "exists already" in again.stderr  # a finished restore is never overwritten


def test_archive_can_delete_local_step_checkpoints_once_verified(archive, tmp_path):
    run = make_run(tmp_path)
    write_checkpoints(CheckpointWriter(run / "checkpoints", keep_recent=5, background=False), [1, 2, 3, 4], best={2})
    result = archive_command("--archive", str(run), archive, "--delete-local-checkpoints")
    assert result.returncode == 0, result.stderr
    assert [info.step for info in step_checkpoints(run / "checkpoints")] == [2, 4]  # best and last stay
    read_checkpoint(run / "checkpoints" / "best.pt")
    report = restore_run(f"{archive}/Proj/run1", tmp_path / "elsewhere")
    assert assert_restored_checkpoints_verify(report.directory) == [2, 4, 1, 2, 3, 4]


def test_runs_lists_archived_runs_like_local_ones(archive, tmp_path):
    first = make_run(tmp_path, "first", description="the first run")
    second = make_run(tmp_path, "second", description="the second run")
    best = {"metric": "val/loss", "value": 0.25}
    update_metadata(second, status="finished", started="2026-11-29T11:00:00", best=best)
    for run in (first, second):
        archive_run(run, archive)
    result = archive_command("--runs", archive)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["run", "started", "commit", "status", "epochs", "best", "description"]
    assert lines[1].split()[:4] == ["Proj/second", "2026-11-29T11:00", "0000000000*", "finished"]
    assert "val/loss=0.25" in lines[1] and "the second run" in lines[1]
    assert lines[2].split()[0] == "Proj/first" and lines[3].startswith("2 row(s)")
    filtered = archive_command("--runs", archive, "--status", "finished", "--csv")
    assert filtered.stdout.splitlines()[1].startswith("Proj/second,")


# ---------------------------------------------------------------------------------------
# Bad input: credentials in a URI, a missing back end


SECRET_URIS = [
    "s3://AKIAEXAMPLE:SuperSecret123@bucket/prefix",
    "s3://bucket/prefix?access_key=AKIAEXAMPLE&secret_key=SuperSecret123",
    "gs://bucket/prefix?token=SuperSecret123",
]


@pytest.mark.parametrize("uri", SECRET_URIS)
def test_credentials_in_a_uri_are_refused_without_being_repeated(uri, tmp_path, monkeypatch):
    run = str(make_run(tmp_path))
    for arguments in (["--restore", uri], ["--runs", uri], ["--archive", run, uri]):
        result = archive_command(*arguments)
        assert result.returncode == 2 and "holds credentials" in result.stderr, result.stderr
        assert "SuperSecret123" not in result.stderr + result.stdout and "Traceback" not in result.stderr
    with pytest.raises(UserError) as config_error:
        validate({"description": "x", "archive": {"uri": uri}}, {**SCHEMA})
    assert "archive.uri" in str(config_error.value) and "SuperSecret123" not in str(config_error.value)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, uri)
    with pytest.raises(UserError, match="holds credentials"):
        archive_uri({"archive": {"uri": None}})


def test_archive_uri_comes_from_the_config_then_the_environment(monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    assert archive_uri({"archive": {"uri": None}}) is None
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "s3://cluster-bucket/runs/")
    assert archive_uri({"archive": {"uri": None}}) == "s3://cluster-bucket/runs"
    assert archive_uri({"archive": {"uri": "file:///mnt/shared"}}) == "file:///mnt/shared"
    assert archive_uri({"archive": {"uri": None, "enabled": False}}) is None
    with pytest.raises(UserError, match="expected s3://bucket/prefix"):
        archive_uri({"archive": {"uri": "ftp://host/runs"}})


def test_a_run_whose_bucket_does_not_exist_is_refused_before_it_starts(project, moto_server):
    """The start-up probe lists the archive's prefix: no such bucket is one message, exit 2,
    nothing written; an outage at start-up is the mirror's to retry (the tests above)."""
    env = {"AWS_ENDPOINT_URL": moto_server.endpoint, **CREDENTIALS}
    result = project.run(*QUICK_RUN, "--epochs=1", "--archive.uri=s3://no-such-bucket/archive", env=env)
    assert result.returncode == 2, result.stderr
    assert "error: archive.uri: s3://no-such-bucket/archive does not exist" in result.stderr
    assert "Traceback" not in result.stderr and project.run_directories() == []


def test_a_missing_back_end_is_one_clear_message():
    code = (
        "import sys; sys.modules['s3fs'] = None; sys.modules['gcsfs'] = None  # as if not installed\n"
        "from run import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    check = "from src.core.archive.store import check_archive\ncheck_archive({'archive': {'uri': sys.argv[-1]}})"
    for uri, package in (("s3://bucket/runs", "s3fs"), ("gs://bucket/runs", "gcsfs")):
        result = subprocess.run(
            [sys.executable, "-c", code, "--runs", uri], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 2, result.stderr
        scheme = uri.split(":")[0]
        message = f"{scheme}:// needs {package}: pip install -r requirements-archive.txt (or make install-archive)"
        assert result.stderr.strip() == f"error: {message}"
        at_plan_time = subprocess.run(
            [sys.executable, "-c", code.split("\n")[0] + "\n" + check, uri], cwd=REPO, capture_output=True, text=True
        )
        assert f"src.core.errors.UserError: {message}" in at_plan_time.stderr  # raised before anything is written
        mirror = "from src.core.archive.mirror import Mirror\nMirror('/nowhere/Proj/run', sys.argv[-1])"
        resumed = subprocess.run(
            [sys.executable, "-c", code.split("\n")[0] + "\n" + mirror, uri], cwd=REPO, capture_output=True, text=True
        )
        assert f"src.core.errors.UserError: {message}" in resumed.stderr  # a resumed run's mirror, at once


def test_a_back_end_that_cannot_be_imported_stops_the_mirror_at_once(tmp_path):
    """Installed (found) but broken, as with an aiobotocore that does not fit botocore: one
    message, no traceback; a live mirror records `failed` and its close() does not wait."""
    broken = tmp_path / "site" / "s3fs"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('cannot import name AioSession from aiobotocore')\n")
    env = {**os.environ, "PYTHONPATH": f"{broken.parent}{os.pathsep}{REPO}"}
    listed = subprocess.run(
        [sys.executable, "run.py", "--runs", "s3://bucket/runs"], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert listed.returncode == 2 and "Traceback" not in listed.stderr, listed.stderr
    assert "s3fs is installed but cannot be imported (cannot import name AioSession" in listed.stderr

    run = make_run(tmp_path)
    code = "import sys, time\nfrom src.core.archive.mirror import Mirror\nt = time.monotonic()\n"
    code += "closed = Mirror(sys.argv[1], 's3://bucket/runs').close(60)\nprint(closed, time.monotonic() - t < 30)"
    mirrored = subprocess.run([sys.executable, "-c", code, str(run)], cwd=REPO, capture_output=True, text=True, env=env)
    assert mirrored.stdout.split() == ["False", "True"], mirrored.stderr
    assert mirrored.stderr.count("cannot be imported") == 1 and "did not run" in mirrored.stderr
    assert archive_state(run)["status"] == "failed"


# ---------------------------------------------------------------------------------------
# A real run on another machine: train, archive, lose the disk, restore, resume, evaluate

RUN = ("sample_runconfig.yaml", "--mini", "--cpu", "--epochs=2", "--batch_size=8", "--checkpoint.every_n_steps=5")


def test_a_killed_run_archived_restored_elsewhere_and_resumed_equals_an_uninterrupted_one(project, s3_archive):
    assert project.run(*RUN, "--run_name=reference").returncode == 0
    killed = project.run(*RUN, "--run_name=moved", env={"TEMPLATE_FAULT": "train_step:17"})
    assert killed.returncode == -signal.SIGKILL
    original = project.root / "logs" / "PendulumModel" / "moved"
    archived = archive_command("--archive", str(original), s3_archive, cwd=project.root)
    assert archived.returncode == 0, archived.stderr
    shutil.rmtree(original)  # the machine is gone

    elsewhere = project.root.parent / "other-machine-logs"
    restored = archive_command(
        "--restore", f"{s3_archive}/PendulumModel/moved", "--log-dir", str(elsewhere), cwd=project.root
    )
    assert restored.returncode == 0, restored.stderr
    run = elsewhere / "PendulumModel" / "moved"
    resumed = project.run("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "from step-000000015.pt" in resumed.stdout
    assert_same_run(project.root / "logs" / "PendulumModel" / "reference", run)

    evaluated = project.run("--evaluate", str(run), "--checkpoints", "last")
    assert evaluated.returncode == 0, evaluated.stderr
    assert (run / "evaluation.csv").exists()


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_a_run_mirrors_while_it_trains_and_resumes_from_the_store_after_its_disk_is_lost(project, store, request):
    """The children find the store as the test does: AWS_ENDPOINT_URL or STORAGE_EMULATOR_HOST,
    set by the store's fixture, inherited."""
    archive = request.getfixturevalue(f"{store}_archive")
    assert project.run(*RUN, "--run_name=reference").returncode == 0
    env = {ENVIRONMENT_VARIABLE: archive}
    # The fault waits for the mirror's pass before it kills; with no interval that pass starts at once.
    every_checkpoint = "--archive.sync_interval_seconds=0"
    killed = project.run(*RUN, every_checkpoint, "--run_name=moved", env={**env, "TEMPLATE_FAULT": "train_step:17"})
    assert killed.returncode == -signal.SIGKILL
    shutil.rmtree(project.root / "logs" / "PendulumModel" / "moved")

    listed = project.run("--runs", archive, env=env)
    assert listed.returncode == 0 and "PendulumModel/moved" in listed.stdout
    resumed = project.run("--resume", f"{archive}/PendulumModel/moved", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "from step-000000015.pt" in resumed.stdout  # the last checkpoint before the kill, from the archive
    run = project.root / "logs" / "PendulumModel" / "moved"
    assert_same_run(project.root / "logs" / "PendulumModel" / "reference", run)
    assert read_yaml(run / "metadata.yaml")["archive"]["status"] == "synced"


def test_restore_never_writes_outside_the_run_directory(s3_archive, tmp_path):
    """An object key with `..` parts (anyone who can write to the bucket can make one) is refused."""
    run = make_run(tmp_path)
    archive_run(run, s3_archive)
    store = Store(s3_archive)
    store.fs.pipe(store.path("Proj/run1/../../escaped.txt"), b"outside")  # a key, not a path: S3 keeps it
    report = restore_run(f"{s3_archive}/Proj/run1", tmp_path / "elsewhere")
    assert any("escaped.txt: not a path inside the run" in line for line in report.damaged)
    assert not list(tmp_path.rglob("escaped.txt"))


class _RequesterPays(http.server.BaseHTTPRequestHandler):
    """Google's answer for a requester-pays bucket asked without a billing project, to every request."""

    def do_GET(self) -> None:
        body = json.dumps({"error": {"code": 400, "message": "Bucket is a requester pays bucket"}}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *arguments) -> None:
        pass


def test_a_bucket_gcsfs_will_not_read_is_one_message_without_its_log(project):
    """gcsfs turns a requester-pays 400 into a ValueError, and logs a traceback for each request
    it gives up on: the user sees one line, which says that running again will not help."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RequesterPays)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"http://127.0.0.1:{server.server_address[1]}"
        result = project.run("--runs", "gs://paid-by-others/runs", env={"STORAGE_EMULATOR_HOST": host}, timeout=120)
    finally:
        server.shutdown()
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "error: --runs: the store refused the request for gs://paid-by-others/runs (Bucket is a requester pays "
        "bucket, 400); it will answer the same again: archive to a bucket your project owns"
    ]
