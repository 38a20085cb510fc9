"""DDP with real torchrun processes: two processes on the CPU over gloo."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers import MINIMAL, NOISY, QUICK_RUN, assert_same_run, free_port, logged_values, run_directory

from src.core.commands.launch import launch_settings, torchrun_arguments
from src.core.config.loader import parse_yaml
from src.core.config.schema import project_schema
from src.core.config.validation import finalize
from src.core.record.checkpoint import read_checkpoint

# 100 training pairs: batches of 8 on each of 2 ranks (a global batch of 16), 7 steps an epoch.
RUN = (*QUICK_RUN, "--epochs=3", "--checkpoint.every_n_steps=3", *NOISY)


def metadata(run) -> dict:
    return yaml.safe_load((run / "metadata.yaml").read_text())


def test_two_processes_train_like_one_process_with_the_same_global_batch(project):
    """Without random augmentation (each rank draws its own), 2 ranks x 8 is one process x 16.
    17 rollout samples in batches of 8 split unevenly (9 in 2 batches on rank 0, 8 in 1 on rank 1):
    the sample-weighted mean must still equal one process's, and nothing may hang."""
    uneven = ("--rollout.max_samples=17", "--eval_batch_size=8")
    result = project.torchrun(*RUN[:-3], *uneven, "--run_name=ddp")
    assert result.returncode == 0, result.stderr
    assert [path.name for path in project.run_directories()] == ["ddp"]  # rank 0 alone made one
    run = run_directory(project, "ddp")
    replicas = metadata(run)["replica_parameters_sha256"]
    assert len(replicas) == 2 and len(set(replicas)) == 1  # every rank ended with the same weights
    assert yaml.safe_load((run / "config.yaml").read_text())["environment"]["world_size"] == 2
    assert result.stdout.count("epoch 3/3") == 1  # one progress report, from rank 0

    single = project.run(*RUN[:-3], *uneven, "--batch_size=16", "--run_name=single")
    assert single.returncode == 0, single.stderr
    distributed_values, single_values = logged_values(run), logged_values(run_directory(project, "single"))
    assert [v[:4] for v in distributed_values] == [v[:4] for v in single_values]  # same steps, phases, names
    for (*_, a), (*_, b) in zip(distributed_values, single_values, strict=True):
        assert a == pytest.approx(b, rel=2e-4, abs=1e-9)  # summation order differs, nothing else


def test_exact_resume_under_ddp(project):
    assert project.torchrun(*RUN, "--run_name=reference").returncode == 0
    # Killed and resumed with the example's figures drawn (the reference draws none: no result changes).
    figures = "--rollout.figures=true"
    killed = project.torchrun(*RUN, figures, "--run_name=killed", env={"TEMPLATE_FAULT": "train_step:12@0"})
    assert killed.returncode != 0
    run = run_directory(project, "killed")
    assert metadata(run)["status"] == "running"
    resumed = project.torchrun("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_directory(project, "reference"), run)
    assert len(list((run / "figures" / "rollout").glob("*.png"))) == 4  # the baseline and 3 epochs, across the kill
    (entry,) = metadata(run)["resumes"]
    assert entry["world_size"] == entry["saved_world_size"] == 2


def test_a_killed_worker_restarts_the_group_which_resumes_the_run(project):
    reference = project.torchrun(*RUN, "--run_name=reference")
    assert reference.returncode == 0, reference.stderr
    result = project.torchrun(
        *RUN,
        "--run_name=elastic",
        launcher=("--standalone", "--max-restarts=1"),
        env={"TEMPLATE_FAULT": "train_step:12@1"},
    )
    assert result.returncode == 0, result.stderr
    assert [path.name for path in project.run_directories()] == ["elastic", "reference"]
    run = run_directory(project, "elastic")
    (entry,) = metadata(run)["resumes"]
    assert entry["from_step"] > 0 and metadata(run)["status"] == "finished"
    assert_same_run(run_directory(project, "reference"), run)  # exact, even across the restart

    # A restart during a resume that extends the run keeps the extension (--epochs=4).
    extend = ("--resume", str(run), "--epochs=4")
    assert project.torchrun("--resume", str(run_directory(project, "reference")), "--epochs=4").returncode == 0
    killed = project.torchrun(
        *extend, launcher=("--standalone", "--max-restarts=1"), env={"TEMPLATE_FAULT": "train_step:3@1"}
    )
    assert killed.returncode == 0, killed.stderr
    assert [entry["from_step"] for entry in metadata(run)["resumes"]][1:] == [21, 21]  # epoch 3 ended at step 21
    assert metadata(run)["epochs_done"] == 4
    assert_same_run(run_directory(project, "reference"), run)


def test_two_nodes_with_c10d_rendezvous(project):
    launcher = (
        "--nnodes=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--rdzv-id=two-nodes",
    )
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc-per-node=1", "run.py", *RUN]
    nodes = [
        subprocess.Popen(
            [*command, "--run_name=nodes"], cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    (run,) = project.run_directories()
    assert len(metadata(run)["replica_parameters_sha256"]) == 2


def test_python_run_py_starts_the_processes_itself(project):
    result = project.run(*RUN, "--distributed.nproc_per_node=2", "--run_name=self")
    assert result.returncode == 0, result.stderr
    assert "torchrun --nproc-per-node=2" in result.stdout
    assert len(set(metadata(run_directory(project, "self"))["replica_parameters_sha256"])) == 1


def test_the_original_multigpu_parameters_section_launches_too(project):
    original = {"ngpus_per_node": 2, "num_nodes": 1, "node_idx": 0, "backend": "gloo", "url": "tcp://127.0.0.1:1"}
    project.write_config("original.yaml", multigpu_parameters=original)
    project.commit("original layout")
    result = project.run("original.yaml", *RUN[1:], "--run_name=original")
    assert result.returncode == 0, result.stderr
    assert len(metadata(run_directory(project, "original"))["replica_parameters_sha256"]) == 2


def test_the_original_sections_nodes_start_a_static_rendezvous():
    original = "multigpu_parameters: {ngpus_per_node: 4, num_nodes: 2, node_idx: 1, url: 'tcp://node0:29500'}\n"
    config = finalize(parse_yaml(MINIMAL + original, "original"), project_schema())
    assert torchrun_arguments(launch_settings(config)) == [
        "--nproc-per-node=4",
        "--max-restarts=0",
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=node0",
        "--master-port=29500",
    ]
    assert config.distributed.backend == "auto"  # not given: the template's own choice


def test_a_refusal_on_rank_zero_stops_every_rank_with_its_exit_code(project):
    (project.root / "notes.txt").write_text("uncommitted")
    result = project.run(*RUN, "--distributed.nproc_per_node=2")
    assert result.returncode == 3
    assert result.stderr.count("refusing to log") == 1 and "untracked: notes.txt" in result.stderr
    assert project.written_files() == ["notes.txt"]
    assert "starting 2 processes" not in result.stdout  # refused before any worker started
    retried = project.run(*RUN, "--distributed.nproc_per_node=2", "--distributed.max_restarts=2")
    assert retried.returncode == 3 and retried.stderr.count("refusing to log") == 1  # not once per restart
    direct = project.torchrun(*RUN, timeout=120)  # under torchrun itself: fails, never hangs
    assert direct.returncode != 0 and direct.stderr.count("refusing to log") == 1
    assert "exitcode  : 3" in direct.stderr  # rank 0 stopped with the refusal's code (torchrun may then stop rank 1)


def test_a_dead_rank_fails_the_job_instead_of_hanging(project):
    started = time.monotonic()
    result = project.torchrun(*RUN, env={"TEMPLATE_FAULT": "train_step:3@1"}, timeout=300)
    assert result.returncode != 0 and time.monotonic() - started < 120


def test_without_torchrun_agent_a_collective_timeout_ends_a_hung_rank(project):
    """Processes started by hand (as srun would) have no agent to stop them: the collective
    timeout must end the survivor."""
    port = free_port()
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    args = [sys.executable, "run.py", *RUN, "--epochs=1000", "--distributed.timeout_seconds=10", "--no-logging"]
    ranks = [
        subprocess.Popen(
            args,
            cwd=project.root,
            env={**os.environ, **common, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for rank in range(2)
    ]
    time.sleep(8)  # both are training
    ranks[1].send_signal(signal.SIGKILL)
    started = time.monotonic()
    ranks[0].wait(timeout=180)
    assert ranks[0].returncode != 0 and time.monotonic() - started < 120


def test_resume_with_another_world_size_works_and_is_recorded(project):
    assert project.torchrun(*RUN, "--run_name=two", env={"TEMPLATE_FAULT": "train_step:9@0"}).returncode != 0
    run = run_directory(project, "two")
    resumed = project.run("--resume", str(run))  # one process now
    assert resumed.returncode == 0, resumed.stderr
    (entry,) = metadata(run)["resumes"]
    assert (entry["world_size"], entry["saved_world_size"]) == (1, 2)
    assert metadata(run)["status"] == "finished"
    assert read_checkpoint(run / "checkpoints" / "last.pt")["world_size"] == 1
