"""Sweeps on Slurm: one array job, a task per member, every task pinned to the sweep's commit
(it runs in the sweep's worktree); requeueing a preempted task; the tasks' states."""

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from src.core.errors import UserError
from src.core.record.git import PROJECT_ROOT
from src.core.record.rundir import write_text_atomic


class SweepFiles(Protocol):
    """Where a sweep lives: its directory, the worktree its tasks run in, its members' names."""

    directory: Path
    code: Path
    names: list[str]


def slurm_script(sweep: SweepFiles, settings: dict, flags: list[str], requeue: bool) -> str:
    """One array job, a task per member, each running in the sweep's worktree.

    A task runs `python run.py` (which, as a run of a sweep, updates sweep.csv as it ends). On one node
    it is exec'd, so that it is the batch shell that Slurm signals, and run.py starts its own
    processes if it has several (torchrun --standalone: a free port, so tasks sharing a node
    do not collide). On several nodes srun starts it on every node, with a c10d rendezvous at
    the first node on a port derived from the job id, and Slurm signals those steps.
    """
    header = sbatch_header(sweep.directory, len(sweep.names), settings, requeue)
    lines = [*header, *task_body(sweep, settings, flags, requeue)]
    return "\n".join(lines) + "\n"


def sbatch_header(directory: Path, tasks: int, settings: dict, requeue: bool) -> list[str]:
    """The #SBATCH lines: the array, its output, resources, and the warning before the time limit."""
    nodes = settings["nodes"]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={directory.parent.name}-{directory.name}"[:64],
        f"#SBATCH --array=0-{tasks - 1}" + (f"%{settings['parallel']}" if settings["parallel"] else ""),
        f"#SBATCH --output={directory}/slurm/%A_%a.out",
        f"#SBATCH --time={settings['time']}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={settings['cpus_per_task']}",
    ]
    optional = {
        "partition": "--partition={}",
        "mem": "--mem={}",
        "account": "--account={}",
        "qos": "--qos={}",
        "gpus_per_node": "--gpus-per-node={}",
    }
    lines += [f"#SBATCH {option.format(settings[key])}" for key, option in optional.items() if settings[key]]
    if requeue:  # a warning signal before the time limit: checkpoint, requeue, resume
        lines += [
            "#SBATCH --requeue",
            # B: the batch shell, which is run.py itself on one node; else srun's steps
            f"#SBATCH --signal={'B:' if nodes == 1 else ''}USR1@{settings['signal_seconds']}",
            "#SBATCH --open-mode=append",  # keep the output of the attempts before a requeue
        ]
    return lines + [f"#SBATCH {line}" for line in settings["extra_sbatch"]]


def task_body(sweep: SweepFiles, settings: dict, flags: list[str], requeue: bool) -> list[str]:
    """What each task runs: its member's new run, or a resume of it after a requeue."""
    nodes = settings["nodes"]
    run_flags = [*flags, *(["--requeue"] if requeue else [])]
    if settings["gpus_per_node"] > 1:  # a process per GPU; otherwise distributed.nproc_per_node decides
        run_flags.append(f"--distributed.nproc_per_node={settings['gpus_per_node']}")
    task = f'"$PYTHON" run.py "${{ARGS[@]}}" {shlex.join(run_flags)}'.rstrip()
    names = " ".join(shlex.quote(name) for name in sweep.names)
    lines = [
        "",
        "# Every task runs the commit the sweep was submitted at, whatever happens to the working tree.",
        "set -eo pipefail",
        "# The checkout the sweep was submitted from (its .venv, say): the worktree below has none.",
        f"export TEMPLATE_PROJECT={shlex.quote(str(PROJECT_ROOT))}",
        f"cd {shlex.quote(str(sweep.code))}",
        *settings["setup"],  # before set -u, which many module and conda scripts do not survive
        "set -u",
        f"PYTHON=${{PYTHON:-{shlex.quote(sys.executable)}}}",
        f"NAMES=({names})",
        'NAME="${NAMES[$SLURM_ARRAY_TASK_ID]}"',
        f"SWEEP={shlex.quote(str(sweep.directory))}",
        'if [ -e "$SWEEP/$NAME/config.yaml" ]; then  # requeued: continue the task\'s own run',
        '    ARGS=(--resume "$SWEEP/$NAME")',
        "else",
        '    ARGS=("$SWEEP/configs/$NAME.yaml" --run-parent "$SWEEP")',
        "fi",
        "# run.py, then this member's row in $SWEEP/sweep.csv",
    ]
    if nodes == 1:
        lines.append(f"exec {task}")
    else:
        lines += [
            # sed, not head, which stops reading: the SIGPIPE would fail the pipe (pipefail)
            'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
            "PORT=$((20000 + SLURM_JOB_ID % 20000))  # tasks sharing a first node differ",
            # Slurm 22.05+ no longer passes sbatch's --cpus-per-task on to srun
            'exec srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" \\',
            f"    {task} \\",
            '    --distributed.nnodes="$SLURM_NNODES" --distributed.rdzv_endpoint="$HEAD_NODE:$PORT"',
        ]
    return lines


def write_search_script(directory: Path, code: Path, settings: dict, workers: int) -> Path:
    """A search's workers (commands/search.py): an array of `workers` tasks, all at once, each
    `run.py --resume SEARCH_DIR` in the search's worktree, running one trial at a time and
    sharing the study with the others. Submitted again, the array continues the search."""
    lines = [
        *sbatch_header(directory, workers, {**settings, "parallel": None}, requeue=False),
        "",
        "# A worker of the search: its trials run the commit the search started at, whatever",
        "# happens to the working tree, and share the study (study.journal) with the other workers.",
        "set -eo pipefail",
        f"export TEMPLATE_PROJECT={shlex.quote(str(PROJECT_ROOT))}",
        f"cd {shlex.quote(str(code))}",
        *settings["setup"],
        "set -u",
        f"PYTHON=${{PYTHON:-{shlex.quote(sys.executable)}}}",
        f'exec "$PYTHON" run.py --resume {shlex.quote(str(directory))}',
    ]
    (directory / "slurm").mkdir(exist_ok=True)
    path = directory / "search.sbatch"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_slurm_script(sweep: SweepFiles, settings: dict, flags: list[str], requeue: bool) -> Path:
    (sweep.directory / "slurm").mkdir(exist_ok=True)
    path = sweep.directory / "sweep.sbatch"
    path.write_text(slurm_script(sweep, settings, flags, requeue))
    return path


def submit(script: Path) -> str:
    """sbatch the script; return the job id."""
    try:
        result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError("--submit: sbatch is not on PATH (is this a Slurm login node?); submit it yourself") from None
    if result.returncode != 0:
        raise UserError(f"--submit: sbatch refused {script}: {result.stderr.strip()}")
    job = result.stdout.strip().split(";")[0]
    write_text_atomic(script.parent / "slurm.json", json.dumps({"job_id": job, "script": str(script)}) + "\n")
    return job


def requeue_this_job() -> str:
    """Put this Slurm job back in the queue; it will resume its run when it starts again.

    An array task is named ARRAY_TASK: one task's SLURM_JOB_ID can equal the array's id, and
    `scontrol requeue <array id>` requeues every task of the array."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return "not a Slurm job: continue it with --resume"
    # The requeue has Slurm end this attempt at once (SIGTERM, SIGKILL after KillWait). The
    # checkpoint is written: let the run close its files and say what happened first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        return f"scontrol requeue {job} failed ({result.stderr.strip()}): continue it with --resume"
    return f"requeued Slurm job {job}"


def slurm_states(sweep_directory: Path) -> dict[str, str]:
    """member name -> Slurm state of a submitted sweep's tasks: PENDING, RUNNING, and for a
    while (slurm.conf's MinJobAge) COMPLETED, FAILED, TIMEOUT..."""
    info = sweep_directory / "slurm.json"
    if not info.exists():
        return {}
    job = json.loads(info.read_text())["job_id"]
    try:
        listing = subprocess.run(
            ["squeue", "-h", "-r", "-t", "all", "-j", job, "-o", "%K %T"], capture_output=True, text=True, timeout=30
        ).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    names = sorted(path.stem for path in (sweep_directory / "configs").glob("*.yaml"))
    states = {}
    for line in listing.splitlines():
        task, _, state = line.partition(" ")
        if task.isdigit() and int(task) < len(names):
            states[names[int(task)]] = state
    return states
