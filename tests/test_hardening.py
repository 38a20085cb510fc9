"""Hardening: inputs found by attacking `run.py` as an adversary would (relative archive URIs,
archives that can never be written, corrupt archives and manifests, repositories mid-merge...).
Each gets one message and an exit code, no traceback, and nothing written outside the run."""

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import QUICK_RUN, conflicting_branch, free_port, git, run_directory

from src.core.archive.store import probe_local_archive
from src.core.errors import Refusal
from src.core.record.checkpoint import step_file_name
from src.core.record.git import gate

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


NO_AWS_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "",
    "AWS_SECRET_ACCESS_KEY": "",
    "AWS_SESSION_TOKEN": "",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance to ask
}


def test_an_object_store_that_refuses_the_run_is_refused_before_it_starts(project):
    """s3:// with no credentials: the start-up probe's listing is refused (botocore finds none),
    so the run is refused at once, as --archive would be, rather than after training."""
    pytest.importorskip("s3fs")
    result = project.run(*QUICK, "--archive.uri=s3://a-bucket/runs", env=NO_AWS_CREDENTIALS, timeout=120)
    message = one_message(result)
    assert "refused access to s3://a-bucket/runs" in message and "NoCredentialsError" in message
    assert project.run_directories() == [] and project.written_files() == []


def test_a_mirror_whose_store_refuses_its_credentials_ends_at_once(tmp_path, monkeypatch, capfd):
    """A store that refuses once the run has begun (credentials that expired): the final sync
    is not retried for final_sync_timeout_seconds (600 s): close() returns, the archive is
    marked failed, and the message says how to complete it."""
    pytest.importorskip("s3fs")
    from src.core.archive.mirror import Mirror

    for name, value in NO_AWS_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "logs" / "Proj" / "run1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "phase": "val", "name": "loss", "value": 1.0}\n')
    mirror = Mirror(run, "s3://a-bucket/runs", retry_delays=(0.2, 0.5))
    mirror.sync_run_files()
    closing = threading.Thread(target=mirror.close, args=(600,), daemon=True)
    closing.start()
    closing.join(120)  # retrying, it would wait the 600 s
    assert not closing.is_alive()
    assert yaml.safe_load((run / "metadata.yaml").read_text())["archive"]["status"] == "failed"
    assert f"Complete it later with: python run.py --archive {run}" in capfd.readouterr().err


def test_a_writable_file_archive_probe_leaves_nothing(tmp_path):
    target = tmp_path / "shared" / "deeper" / "archive"
    probe_local_archive(target)
    assert not (tmp_path / "shared").exists()


# 3. Tracebacks become one message

BRANCHABLE = ("--checkpoint.every_n_steps=2", "--checkpoint.keep_every_n_steps=2")  # step-2, 4, 6... kept


def resign(checkpoint: Path) -> None:
    """Write the manifest that fits `checkpoint` as it is now (an attacker's re-signing)."""
    from src.core.archive.store import sha256_of_file

    manifest = checkpoint.with_suffix(".json")
    document = json.loads(manifest.read_text())
    document.update(bytes=checkpoint.stat().st_size, sha256=sha256_of_file(checkpoint))
    manifest.write_text(json.dumps(document))


def test_branch_refusals_write_nothing(project):
    """Items 3, 7, 8 and 9: a damaged parent checkpoint (a manifest that is not JSON, a truncated
    file, an unsafe pickle, another step's file re-signed) is one message, and no RUN-from-N."""
    parent = finished_run(project, "parent", *BRANCHABLE)
    checkpoints = parent / "checkpoints"
    step6, step8, step10 = (checkpoints / step_file_name(n) for n in (6, 8, 10))

    step6.with_suffix(".json").write_text("{not json")
    assert "manifest" in one_message(project.run("--resume", str(parent), "--from-step", "6"))

    step8.write_bytes(step10.read_bytes())  # step 10's weights, with a manifest re-signed to fit
    resign(step8)
    assert "holds the state of step 10, not 8" in one_message(project.run("--resume", str(parent), "--from-step", "8"))

    step10.write_bytes(step10.read_bytes()[:1000])  # truncated
    assert "truncated" in one_message(project.run("--resume", str(parent), "--from-step", "10"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    import torch

    step4 = checkpoints / step_file_name(4)
    torch.save({"format": 1, "evil": Evil()}, step4)
    resign(step4)
    message = one_message(project.run("--resume", str(parent), "--from-step", "4"))
    assert "weights_only=False" not in message and "set to `False`" not in message and "code" in message
    assert not (project.root / "pwned").exists()
    assert [path.name for path in project.run_directories()] == ["parent"]  # no parent-from-N left behind


def test_restore_of_a_damaged_archive_is_one_message(project, tmp_path):
    run = finished_run(project)
    archive = tmp_path / "archive"
    assert project.run("--archive", str(run), f"file://{archive}").returncode == 0
    stored = archive / "PendulumModel" / "run1"
    manifests = sorted((stored / "checkpoints").glob("step-*.json"))
    manifests[0].write_text("{not json")
    manifests[-1].write_text("[1, 2]")
    log_dir = tmp_path / "restored"
    result = project.run("--restore", f"file://{stored}", "--log-dir", str(log_dir))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "not a JSON object" in result.stderr
    restored = log_dir / "PendulumModel" / "run1"
    assert not (restored / ".restoring").exists()

    # Into a --log-dir that cannot be written (as a read-only disk: /proc refuses even root).
    assert "cannot create" in one_message(project.run("--restore", f"file://{stored}", "--log-dir", "/proc/logs"))

    # An archived metadata.yaml holding a python tag: refused before anything is written.
    (stored / "metadata.yaml").write_text("status: !!python/object/apply:os.system ['touch pwned']\n")
    elsewhere = tmp_path / "elsewhere"
    message = one_message(project.run("--restore", f"file://{stored}", "--log-dir", str(elsewhere)))
    assert "metadata.yaml" in message
    assert not elsewhere.exists() and not (project.root / "pwned").exists()


def test_bad_data_directory_and_optimizer_values_are_one_message(project):
    for flag in ("--data_directory=/etc", "--data_directory=/" + "d" * 100_000):
        message = one_message(project.run(*QUICK, flag))
        assert "data_directory" in message and len(message) < 1000
    message = one_message(project.run(*QUICK, "--optimizer.parameters={betas: 5}"))
    assert "optimizer.parameters" in message and "betas" in message
    assert project.run_directories() == []


def test_evaluate_with_a_missing_data_file_is_one_message(project):
    run = finished_run(project)
    message = one_message(project.run("--evaluate", str(run), "--data_directory=/etc", "--no-logging"))
    assert "data_directory" in message and "trajectories.npy" in message


@pytest.mark.parametrize("target", ["loop", "/proc/self/mem"])
def test_unreadable_bootstrap_file_is_one_message(project, target):
    if target == "loop":
        os.symlink("loop", project.root / "loop")
    message = one_message(project.run(*QUICK, f"--bootstrap_model_file={target}", "--no-logging"))
    assert "bootstrap_model_file" in message


def mounted(kind: str, where: Path) -> bool:
    """A small tmpfs at `where`: full after a few kilobytes ("full") or read-only ("ro"); False
    when this machine may not mount (the test is then skipped)."""
    where.mkdir(parents=True, exist_ok=True)
    options = "size=8k" if kind == "full" else "ro,size=64k"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize("kind", ["full", "ro"])
def test_evaluate_save_outputs_on_a_full_or_read_only_disk(project, kind):
    run = finished_run(project)
    assert project.run("--evaluate", str(run)).returncode == 0
    table = (run / "evaluation.csv").read_bytes()
    target = run / "evaluation" / "again"
    if shutil.which("mount") is None or not mounted(kind, target):
        pytest.skip("cannot mount a tmpfs here")
    try:
        result = project.run("--evaluate", str(run), "--save-outputs", "--name=again")
        message = one_message(result)
        assert "evaluation.csv is as it was" in message
        assert (run / "evaluation.csv").read_bytes() == table
    finally:
        subprocess.run(["umount", str(target)], check=True)


# 4. A process count the machine cannot run


def test_a_million_processes_are_refused_before_torchrun_starts(project):
    before = set(Path("/tmp").glob("torchelastic_*"))
    message = one_message(project.run(*QUICK, "--distributed.nproc_per_node=1000000", timeout=120))
    assert "distributed.nproc_per_node" in message and "at most" in message
    assert set(Path("/tmp").glob("torchelastic_*")) == before and project.run_directories() == []


# 5. The gate refuses a repository in the middle of a merge, rebase, cherry-pick or revert


@pytest.mark.parametrize(
    "operation, expected",
    [
        (("merge", "other"), "a merge"),
        (("rebase", "other"), "a rebase"),
        (("cherry-pick", "other"), "a cherry-pick"),
        (("revert", "--no-edit", "HEAD"), "a revert"),
    ],
)
def test_gate_refuses_an_unconcluded_operation(repo, operation, expected):
    conflicting_branch(repo)
    if operation[0] == "revert":  # reverting "ours" on top of a later change to the same line conflicts
        (repo / "a.txt").write_text("later\n")
        git(repo, "commit", "-q", "-am", "later")
        operation = ("revert", "--no-edit", "HEAD~1")
    environment = {**os.environ, "GIT_EDITOR": "true"}
    failed = subprocess.run(["git", *operation], cwd=repo, capture_output=True, env=environment)
    assert failed.returncode != 0  # stopped on the conflict
    git(repo, "checkout", "-q", "HEAD", "--", "a.txt")  # resolved to HEAD: the files equal the commit
    assert git(repo, "status", "--porcelain") == ""
    with pytest.raises(Refusal) as caught:
        gate(repo)
    assert caught.value.exit_code == 3 and expected in str(caught.value)


def test_a_logged_run_is_refused_mid_merge(project):
    conflicting_branch(project.root)
    subprocess.run(["git", "merge", "other"], cwd=project.root, capture_output=True)
    project.git("checkout", "-q", "HEAD", "--", "a.txt")
    message = one_message(project.run(*QUICK), 3)
    assert "in the middle of a merge" in message and project.run_directories() == []


# 6. --export: an unreachable server, config overrides, W&B's files


def test_export_to_an_unreachable_mlflow_is_one_message(project, tmp_path):
    run = finished_run(project)
    unreachable = f"http://127.0.0.1:{free_port()}"
    environment = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    override = f"--mlflow.tracking_uri={unreachable}"
    result = project.run("--export", str(run), "--to", "mlflow", override, env=environment)
    message = one_message(result)
    assert "nothing was exported" in message and "training goes on" not in result.stderr
    assert unreachable in message  # the override was used, not the environment's or the default store


def test_export_honours_a_tracking_uri_override(project, tmp_path):
    run = finished_run(project)
    store = tmp_path / "elsewhere" / "mlruns"
    result = project.run("--export", str(run), "--to", "mlflow", f"--mlflow.tracking_uri={store.as_uri()}")
    assert result.returncode == 0, result.stderr
    assert store.is_dir()
    metadata = yaml.safe_load((run / "metadata.yaml").read_text())
    assert metadata["trackers"]["mlflow"]["tracking_uri"] == store.as_uri()
    refused = one_message(project.run("--export", str(run), "--to", "mlflow", "--epochs=3"))
    assert "may change only the mlflow section" in refused


def test_export_to_wandb_keeps_its_files_under_the_run(project, tmp_path):
    run = finished_run(project)
    home = tmp_path / "home"
    home.mkdir()
    environment = {"HOME": str(home), "XDG_CACHE_HOME": "", "WANDB_MODE": "offline"}
    environment = {key: value for key, value in environment.items() if value}
    result = project.run("--export", str(run), "--to", "wandb", "--wandb.mode=offline", env=environment)
    assert result.returncode == 0, result.stderr
    assert not (home / ".cache" / "wandb").exists(), sorted(str(p) for p in home.rglob("*"))[:10]
    assert (run / "wandb").is_dir()


# 8. Messages that told the wrong story


def test_auto_resume_of_a_run_being_created_says_so(project):
    directory = run_directory(project, "racing")
    directory.mkdir(parents=True)  # what the winner of two simultaneous --auto-resume has made so far
    message = one_message(project.run(*QUICK, "--run_name=racing", "--auto-resume"), 3)
    assert "being created by another process" in message and "killed" not in message
    old = time.time() - 3600
    os.utime(directory, (old, old))  # an hour later, nobody is creating it: a run killed while it was
    assert "killed" in one_message(project.run(*QUICK, "--run_name=racing", "--auto-resume"), 3)


def test_a_dev_zero_symlink_in_an_archive_is_skipped_with_a_warning(project, tmp_path):
    run = finished_run(project)
    archive = tmp_path / "archive"
    assert project.run("--archive", str(run), f"file://{archive}").returncode == 0
    stored = archive / "PendulumModel" / "run1"
    (stored / "metrics.jsonl").unlink()
    os.symlink("/dev/zero", stored / "metrics.jsonl")
    log_dir = tmp_path / "restored"
    result = project.run("--restore", f"file://{stored}", "--log-dir", str(log_dir), timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "metrics.jsonl: not a plain file" in result.stderr and "create the bucket" not in result.stderr
    assert not (log_dir / "PendulumModel" / "run1" / "metrics.jsonl").exists()

    (stored / "metadata.yaml").unlink()
    os.symlink("/dev/zero", stored / "metadata.yaml")  # never read: it would never end
    message = one_message(project.run("--restore", f"file://{stored}", "--log-dir", str(tmp_path / "b"), timeout=120))
    assert "metadata.yaml" in message


# 10. Restore verifies every run file against the archive's run-files.json


def test_restore_verifies_run_files_and_refuses_tampered_ones(project, tmp_path):
    run = finished_run(project, "run1", "--rollout.figures=true")  # its figures are run files too
    archive = tmp_path / "archive"
    assert project.run("--archive", str(run), f"file://{archive}").returncode == 0
    stored = archive / "PendulumModel" / "run1"
    digests = json.loads((stored / "run-files.json").read_text())
    assert {"config.yaml", "metadata.yaml", "metrics.jsonl", "packages.txt"} <= set(digests)
    assert any(name.startswith("figures/") for name in digests) and any("tfevents" in name for name in digests)

    clean = project.run("--restore", f"file://{stored}", "--log-dir", str(tmp_path / "clean"))
    assert clean.returncode == 0 and "warning" not in clean.stderr, clean.stderr
    restored = tmp_path / "clean" / "PendulumModel" / "run1"
    assert (restored / "metrics.jsonl").read_bytes() == (run / "metrics.jsonl").read_bytes()

    with open(stored / "metrics.jsonl", "a") as stream:  # a forged line
        stream.write('{"step": 999, "phase": "rollout", "name": "loss", "value": 0.0}\n')
    tampered = project.run("--restore", f"file://{stored}", "--log-dir", str(tmp_path / "tampered"))
    assert tampered.returncode == 0, tampered.stderr
    assert "metrics.jsonl: its SHA-256 is not the one run-files.json records" in tampered.stderr
    assert not (tmp_path / "tampered" / "PendulumModel" / "run1" / "metrics.jsonl").exists()

    config = stored / "config.yaml"
    config.write_text(config.read_text().replace("epochs: 1", "epochs: 2"))
    message = one_message(project.run("--restore", f"file://{stored}", "--log-dir", str(tmp_path / "forged")))
    assert "config.yaml is not the file that was archived" in message
    assert not (tmp_path / "forged").exists()


def test_archive_of_a_run_with_a_damaged_local_manifest_skips_that_checkpoint(project, tmp_path):
    run = finished_run(project, "run1", *BRANCHABLE)
    manifest = run / "checkpoints" / step_file_name(6)
    manifest.with_suffix(".json").write_text("{not json")
    result = project.run("--archive", str(run), f"file://{tmp_path / 'archive'}")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "step-000000006.json is not a JSON object" in result.stderr
    stored = tmp_path / "archive" / "PendulumModel" / "run1" / "checkpoints"
    assert (stored / step_file_name(8)).exists() and not (stored / step_file_name(6)).exists()
