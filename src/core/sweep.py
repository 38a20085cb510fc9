"""Sweeps: a `sweep:` section maps dotted keys to lists of values; the run expands to their
cartesian product. Lists anywhere else in a config are ordinary values.

A sweep is pinned to the commit it started at: the gate runs once, then every sub-run
runs from a git worktree of that commit made inside the sweep directory, so edits,
checkouts or commits in the working tree afterwards change nothing. Sub-runs are normal
runs, named by their index and parameters, grouped in the sweep directory:

    logs/<project>/sweep-<timestamp>/
        sweep.yaml            the sweep's config (with its sweep: section) and git commit
        code/                 the worktree at that commit, where every sub-run runs
        configs/03-lr=3e-4,hidden=64.yaml
        03-lr=3e-4,hidden=64/ the sub-run's run directory
        sweep.csv             the sub-runs with their status and final metrics, rewritten as each ends
        sweep.sbatch, slurm/  with --slurm: the array script and the tasks' output
"""

import copy
import fcntl
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from src.core import provenance
from src.core.bootstrap import bootstrap_path
from src.core.config import Config, check_sweep_size, dump_yaml, finalize, lookup, set_key
from src.core.errors import UserError
from src.core.metrics import read_metrics, write_hparams
from src.core.phases import WALL_CLOCK_METRICS
from src.core.planning import find_data_directory
from src.core.resolve import check_config_names
from src.core.rundir import CONFIG_FILE, METADATA_FILE, create_run_directory, log_root, read_yaml, write_text_atomic
from src.core.tables import csv_text
from src.core.template_schema import project_schema

UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


@dataclass
class SweepMember:
    index: int
    name: str  # "03-lr=3e-4,hidden=64"
    parameters: dict  # dotted key -> value
    config: dict  # the resolved, validated config of this sub-run


def format_value(value) -> str:
    """Short and readable: 3e-4 rather than 0.0003, [1,2] rather than [1, 2]."""
    if isinstance(value, float):
        if value and not 1e-2 <= abs(value) < 1e5:
            mantissa, exponent = f"{value:.3e}".split("e")
            return f"{float(mantissa):g}e{int(exponent)}"
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def member_name(index: int, count: int, parameters: dict) -> str:
    """`03-lr=3e-4,hidden=64`: the index, then each key's last part (the whole key where
    two would read the same) and its value."""
    short = [key.rsplit(".", 1)[-1] for key in parameters]
    labels = [s if short.count(s) == 1 else key for s, key in zip(short, parameters, strict=True)]
    text = ",".join(f"{label}={format_value(value)}" for label, value in zip(labels, parameters.values(), strict=True))
    return f"{index:0{len(str(count - 1))}d}-{UNSAFE.sub('_', text)}"[:120]


def expand(document: dict, schema: dict) -> list[SweepMember]:
    """Every combination of the `sweep:` section's values, each validated as a whole config.
    A config without a sweep section is a sweep of one (for --slurm)."""
    sweep = document.get("sweep")
    if sweep is None:
        config = finalize(document, schema)
        check_config_names(config)
        return [SweepMember(0, "0-run", {}, config.to_dict())]
    if not isinstance(sweep, dict) or not sweep:
        raise UserError("config key 'sweep': expected a mapping of dotted keys to lists of values")
    for key, values in sweep.items():
        if str(key).split(".")[0] == "slurm":  # one array script holds one set of resources
            raise UserError(
                f"config key 'sweep.{key}': a sweep cannot vary Slurm resources (its array job asks for "
                "one set for every task); set 'slurm' outside the sweep, or run one sweep per setting"
            )
        if not isinstance(values, list) or not values:
            raise UserError(
                f"config key 'sweep.{key}': expected a non-empty list of values, found {values!r} "
                "(a sweep runs every combination of these lists)"
            )
    check_sweep_size(document, schema)
    combinations = list(itertools.product(*sweep.values()))
    members = []
    for index, values in enumerate(combinations):
        parameters = dict(zip(sweep, values, strict=True))
        name = member_name(index, len(combinations), parameters)
        member = copy.deepcopy({key: value for key, value in document.items() if key != "sweep"})
        for key, value in parameters.items():
            set_key(member, key, value, schema, f"sweep key {key}")
        try:
            config = finalize(member, schema)
            check_config_names(config)
        except UserError as error:
            raise UserError(f"sweep member {name}: {error}") from None
        members.append(SweepMember(index, name, parameters, config.to_dict()))
    return members


@dataclass
class Sweep:
    directory: Path
    code: Path  # the worktree at the sweep's commit
    members: list[SweepMember]
    commit: str


def create(parent: Path, run_name: str | None, document: dict, members: list[SweepMember], git: dict) -> Sweep:
    """The sweep directory, its worktree at the gated commit, and one config file per member."""
    directory = create_run_directory(parent, run_name, prefix="sweep-")
    write_text_atomic(directory / "sweep.yaml", dump_yaml({**document, "git": git}))
    code = directory / "code"
    provenance.add_worktree(git["commit"], code, "sweep")
    (directory / "configs").mkdir()
    for member in members:
        config = {**member.config, "run_name": member.name}
        (directory / "configs" / f"{member.name}.yaml").write_text(dump_yaml(config))
    sweep = Sweep(directory, code, members, git["commit"])
    write_table(directory)
    return sweep


def member_command(sweep: Sweep, member: SweepMember, flags: list[str]) -> list[str]:
    """What runs one member: a new run named after it, or a resume if its directory exists
    (a requeued Slurm task)."""
    run_directory = sweep.directory / member.name
    if (run_directory / CONFIG_FILE).exists():
        return ["run.py", "--resume", str(run_directory), *[f for f in flags if f == "--cpu"]]
    config = sweep.directory / "configs" / f"{member.name}.yaml"
    return ["run.py", str(config), "--run-parent", str(sweep.directory), *flags]


def run_locally(sweep: Sweep, flags: list[str]) -> int:
    """Every member in turn, each in its own process; a failure does not stop the others.
    The worktree goes even on Ctrl-C, so that git does not keep it registered."""
    failed = []
    try:
        for member in sweep.members:
            print(f"\n=== sweep member {member.index + 1}/{len(sweep.members)}: {member.name}", flush=True)
            command = [sys.executable, *member_command(sweep, member, flags)]
            returncode = subprocess.run(command, cwd=sweep.code).returncode
            if returncode != 0:
                failed.append(f"{member.name} (exit code {returncode})")
            write_table(sweep.directory)
    finally:
        provenance.remove_worktree(sweep.code)
    print(f"\nsweep {sweep.directory}: {len(sweep.members) - len(failed)} of {len(sweep.members)} finished")
    for name in failed:
        print(f"  failed: {name}")
    print(f"table: {sweep.directory / 'sweep.csv'}")
    return 1 if failed else 0


def swept_values(sweep_directory: Path, member_config: dict) -> dict:
    """A member's value of each swept key (`optimizer.lr`: 3e-4, ...), in the sweep's order."""
    sweep_file = sweep_directory / "sweep.yaml"
    swept = ((read_yaml(sweep_file) or {}).get("sweep") or {}) if sweep_file.exists() else {}
    return {key: lookup(member_config, key) for key in swept}


def final_metrics(run_directory: Path) -> dict[str, float]:
    """The last value of every metric a run logged (training: the epoch loss and your metrics),
    without those that measure the machine."""
    final = {}
    for record in read_metrics(run_directory):
        key = f"{record['phase']}/{record['name']}"
        if key in WALL_CLOCK_METRICS or key in ("train/loss", "train/lr", "train/grad_norm"):
            continue
        final[key] = record["value"]
    return final


def member_rows(sweep_directory: Path, slurm: bool = True) -> list[dict]:
    """A row per member: its swept values, status, and the metrics its run logged last; with
    `slurm`, the Slurm state of a submitted sweep's tasks (src/core/runs.py filters them)."""
    rows = []
    states = slurm_states(sweep_directory) if slurm else {}
    for config_file in sorted((sweep_directory / "configs").glob("*.yaml")):
        run_directory = sweep_directory / config_file.stem
        metadata = read_yaml(run_directory / METADATA_FILE) if (run_directory / METADATA_FILE).exists() else {}
        row = {"member": config_file.stem, "status": metadata.get("status", "not started")}
        if slurm and (sweep_directory / "slurm.json").exists():
            row["slurm"] = states.get(config_file.stem, "-")
        row |= swept_values(sweep_directory, read_yaml(config_file) or {})
        best = metadata.get("best") or {}
        if best.get("value") is not None:
            row[f"best {best['metric']}"] = best["value"]
        rows.append(row | final_metrics(run_directory))
    return rows


def write_table(sweep_directory: Path) -> None:
    """sweep.csv, from the members' run directories. Slurm tasks rewrite it as they end, on
    any node, so they take turns under a lock: the last writer sees every member that has
    ended. No Slurm state here (it would be stale at once): `--runs SWEEP_DIR` shows it."""
    with open(sweep_directory / ".sweep.csv.lock", "a+") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)  # released when the file closes
        write_text_atomic(sweep_directory / "sweep.csv", csv_text(member_rows(sweep_directory, slurm=False)))


def update_sweep_table(run_directory: Path) -> None:
    """When a run of a sweep ends (locally or as a Slurm task, on any node), its row in the
    sweep's table follows, and a finished run shows in TensorBoard's HParams tab with its
    swept values and final metrics; nothing happens for a run outside a sweep."""
    sweep_directory = Path(run_directory).parent
    if not (sweep_directory / "sweep.yaml").is_file():
        return
    try:
        if (read_yaml(run_directory / METADATA_FILE) or {}).get("status") == "finished":
            parameters = swept_values(sweep_directory, read_yaml(run_directory / CONFIG_FILE) or {})
            write_hparams(run_directory, parameters, final_metrics(run_directory))
        write_table(sweep_directory)
    except Exception as error:  # the table is a convenience: never fail the run for it
        print(f"warning: could not update {sweep_directory / 'sweep.csv'}: {error!r}", file=sys.stderr)


def run_sweep(args, document: dict) -> int:
    """A sweep (or, with --slurm, any config): every combination, pinned to this commit."""
    members = expand(document, project_schema())
    if args.print_config:
        for member in members:
            print(f"{member.name}: {member.parameters}")
        return 0
    if args.no_logging or args.allow_dirty_repo:
        raise UserError("a sweep logs every run it makes, so it cannot run with --no-logging or --allow-dirty-repo")
    for member in members:  # the sub-runs run in a worktree without the data: give them its real place
        member.config["data_directory"] = str(find_data_directory(Config(member.config)))
        if member.config.get("bootstrap_model_file"):  # nor logs/, where initial weights often are
            member.config["bootstrap_model_file"] = str(bootstrap_path(member.config["bootstrap_model_file"]))
    git = provenance.gate()
    first = Config(members[0].config)
    sweep = create(
        log_root(args.log_dir) / (first.project_name or first.model_type), first.run_name, document, members, git
    )
    print(f"sweep of {len(members)} run(s) at commit {git['commit'][:12]}: {sweep.directory}")
    flags = [flag for flag, on in (("--cpu", args.cpu), ("--mini", args.mini)) if on]
    if not (args.slurm or args.submit):
        return run_locally(sweep, flags)
    script = write_slurm_script(sweep, first.slurm.to_dict(), flags, args.requeue)
    if args.submit:
        print(f"submitted job {submit(script)} ({script})")
    else:
        print(f"wrote {script}\nsubmit it with: sbatch {script}")
    return 0


# ---------------------------------------------------------------------------------------
# Slurm


def slurm_script(sweep: Sweep, settings: dict, flags: list[str], requeue: bool) -> str:
    """One array job, a task per member, each running in the sweep's worktree.

    A task runs `python run.py` (which, as a run of a sweep, updates sweep.csv as it ends). On one node
    it is exec'd, so that it is the batch shell that Slurm signals, and run.py starts its own
    processes if it has several (torchrun --standalone: a free port, so tasks sharing a node
    do not collide). On several nodes srun starts it on every node, with a c10d rendezvous at
    the first node on a port derived from the job id, and Slurm signals those steps.
    """
    nodes = settings["nodes"]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={sweep.directory.parent.name}-{sweep.directory.name}"[:64],
        f"#SBATCH --array=0-{len(sweep.members) - 1}" + (f"%{settings['parallel']}" if settings["parallel"] else ""),
        f"#SBATCH --output={sweep.directory}/slurm/%A_%a.out",
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
    lines += [f"#SBATCH {line}" for line in settings["extra_sbatch"]]
    run_flags = [*flags, *(["--requeue"] if requeue else [])]
    if settings["gpus_per_node"] > 1:  # a process per GPU; otherwise distributed.nproc_per_node decides
        run_flags.append(f"--distributed.nproc_per_node={settings['gpus_per_node']}")
    task = f'"$PYTHON" run.py "${{ARGS[@]}}" {shlex.join(run_flags)}'.rstrip()
    names = " ".join(shlex.quote(member.name) for member in sweep.members)
    lines += [
        "",
        "# Every task runs the commit the sweep was submitted at, whatever happens to the working tree.",
        "set -eo pipefail",
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
    return "\n".join(lines) + "\n"


def write_slurm_script(sweep: Sweep, settings: dict, flags: list[str], requeue: bool) -> Path:
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
