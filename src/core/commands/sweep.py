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
        sweep.sbatch, slurm/  with --slurm: the array script and the tasks' output (commands/slurm.py)
"""

import copy
import fcntl
import itertools
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from src.core.commands.cli import CommandLine
from src.core.commands.slurm import slurm_states, submit, write_slurm_script
from src.core.config.edits import lookup, set_key
from src.core.config.loader import dump_yaml
from src.core.config.schema import project_schema
from src.core.config.validation import Config, check_sweep_size, finalize
from src.core.errors import UserError
from src.core.phases import WALL_CLOCK_METRICS
from src.core.record.bootstrap import bootstrap_path
from src.core.record.environment import find_data_directory
from src.core.record.git import add_worktree, remove_worktree
from src.core.record.rundir import (
    CONFIG_FILE,
    METADATA_FILE,
    create_run_directory,
    log_root,
    read_yaml,
    write_text_atomic,
)
from src.core.record.snapshot import logging_gate, pin_run_snapshot
from src.core.tables import csv_text
from src.core.tracking.metrics import read_metrics
from src.core.tracking.tensorboard import write_hparams
from src.core.training.build import check_config_names

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

    @property
    def names(self) -> list[str]:
        return [member.name for member in self.members]


def create(parent: Path, run_name: str | None, document: dict, members: list[SweepMember], git: dict) -> Sweep:
    """The sweep directory, its worktree at the gated commit, and one config file per member."""
    directory = create_run_directory(parent, run_name, prefix="sweep-")
    git = pin_run_snapshot(git, directory)  # --snapshot: every member runs the one snapshot
    write_text_atomic(directory / "sweep.yaml", dump_yaml({**document, "git": git}))
    code = directory / "code"
    add_worktree(git["commit"], code, "sweep")
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
        remove_worktree(sweep.code)
    print(f"\nsweep {sweep.directory}: {len(sweep.members) - len(failed)} of {len(sweep.members)} finished")
    for name in failed:
        print(f"  failed: {name}")
    print(f"table: {sweep.directory / 'sweep.csv'}")
    return 1 if failed else 0


def sweep_section(sweep_directory: Path) -> dict:
    """The sweep directory's `sweep:` section (a grid's lists, or a search's form)."""
    sweep_file = sweep_directory / "sweep.yaml"
    return ((read_yaml(sweep_file) or {}).get("sweep") or {}) if sweep_file.exists() else {}


def swept_values(sweep_directory: Path, member_config: dict) -> dict:
    """A member's value of each swept key (`optimizer.lr`: 3e-4, ...), in the sweep's order
    (a search's: its parameters)."""
    swept = sweep_section(sweep_directory)
    keys = swept.get("parameters") or {} if "search" in swept else swept
    return {key: lookup(member_config, key) for key in keys}


def trial_objective(run_directory: Path, objective: str | None, mode: str | None) -> tuple[str, float | None]:
    """A search trial's objective: the best value its run logged of `objective` (default: the
    monitored metric, `checkpoint.monitor`) after training began, lowest or highest by `mode`
    (default: checkpoint.mode)."""
    metadata_file = run_directory / METADATA_FILE
    best = ((read_yaml(metadata_file) or {}).get("best") or {}) if metadata_file.exists() else {}
    metric, mode = objective or best.get("metric") or "?", mode or best.get("mode") or "min"
    values = [
        record["value"]
        for record in read_metrics(run_directory)
        if f"{record['phase']}/{record['name']}" == metric
        and record["epoch"] > 0  # not the untrained model's baseline (evaluate_before_training)
        and record["value"] == record["value"]  # not NaN
    ]
    return metric, ((max if mode == "max" else min)(values) if values else None)


TRIAL_STATES = {"finished": "complete", "failed": "failed", None: "waiting"}


def trial_columns(sweep_directory: Path, run_directory: Path, metadata: dict) -> dict:
    """A search trial's state (complete, pruned, running, failed) and objective."""
    search = sweep_section(sweep_directory).get("search") or {}
    objective = search.get("objective") if isinstance(search, dict) else None
    mode = search.get("mode") if isinstance(search, dict) else None
    state = TRIAL_STATES.get(metadata.get("status"), "running")
    if state == "complete" and str(metadata.get("stop_reason") or "").startswith("pruned"):
        state = "pruned"
    metric, value = trial_objective(run_directory, objective, mode)
    return {"state": state, "objective": metric if value is None else value, "_mode": mode or "min"}


def best_first(rows: list[dict]) -> list[dict]:
    """A search's trials: complete ones best first, then pruned (best first), then the others."""
    order = {"complete": 0, "pruned": 1, "running": 2, "failed": 3, "waiting": 4}

    def key(row: dict):
        value = row["objective"] if isinstance(row["objective"], float | int) else None
        sign = -1 if row["_mode"] == "max" else 1
        return (order[row["state"]], value is None, sign * value if value is not None else 0)

    rows = sorted(rows, key=key)
    for row in rows:
        del row["_mode"]
    return rows


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
    `slurm`, the Slurm state of a submitted sweep's tasks (commands/runs.py filters them)."""
    rows = []
    search = "search" in sweep_section(sweep_directory)
    slurm = slurm and not search  # a search's Slurm tasks are its workers, not its trials
    states = slurm_states(sweep_directory) if slurm else {}
    for config_file in sorted((sweep_directory / "configs").glob("*.yaml")):
        run_directory = sweep_directory / config_file.stem
        metadata = read_yaml(run_directory / METADATA_FILE) if (run_directory / METADATA_FILE).exists() else {}
        row = {"member": config_file.stem}
        row |= trial_columns(sweep_directory, run_directory, metadata) if search else {}
        row["status"] = metadata.get("status", "not started")
        if slurm and (sweep_directory / "slurm.json").exists():
            row["slurm"] = states.get(config_file.stem, "-")
        row |= swept_values(sweep_directory, read_yaml(config_file) or {})
        best = metadata.get("best") or {}
        if best.get("value") is not None:
            row[f"best {best['metric']}"] = best["value"]
        rows.append(row | final_metrics(run_directory))
    return best_first(rows) if search else rows


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
            metrics = final_metrics(run_directory)
            search = sweep_section(sweep_directory).get("search")
            if isinstance(search, dict):  # a search trial: its objective too (the best value, not the last)
                value = trial_objective(run_directory, search.get("objective"), search.get("mode"))[1]
                metrics |= {"search/objective": value} if value is not None else {}
            write_hparams(run_directory, parameters, metrics)
        write_table(sweep_directory)
    except Exception as error:  # the table is a convenience: never fail the run for it
        print(f"warning: could not update {sweep_directory / 'sweep.csv'}: {error!r}", file=sys.stderr)


def sweep_snapshot(git: dict, run_directory: Path) -> dict:
    """A sweep member's `git` section: the sweep's snapshot (commit, base, ref, files) when the
    sweep was started with --snapshot; the member itself runs in a clean worktree of it."""
    sweep_file = run_directory.parent / "sweep.yaml"
    if git.get("snapshot") or not sweep_file.is_file():
        return git
    recorded = (read_yaml(sweep_file) or {}).get("git") or {}
    if recorded.get("snapshot") and recorded.get("commit") == git.get("commit"):
        return {**git, "branch": recorded.get("branch"), "snapshot": recorded["snapshot"]}
    return git


def member_flags(command: CommandLine) -> list[str]:
    """The flags every run of a sweep or a search is started with: --cpu and --mini, as given."""
    return [flag for flag, on in (("--cpu", command.cpu), ("--mini", command.mini)) if on]


def run_sweep(command: CommandLine, document: dict) -> int:
    """A sweep (or, with --slurm, any config): every combination, pinned to this commit."""
    members = expand(document, project_schema())
    if command.print_config:
        for member in members:
            print(f"{member.name}: {member.parameters}")
        return 0
    if command.no_logging or command.allow_dirty_repo:
        raise UserError("a sweep logs every run it makes, so it cannot run with --no-logging or --allow-dirty-repo")
    for member in members:  # the sub-runs run in a worktree without the data: give them its real place
        member.config["data_directory"] = str(find_data_directory(member.config["data_directory"]))
        if member.config.get("bootstrap_model_file"):  # nor logs/, where initial weights often are
            member.config["bootstrap_model_file"] = str(bootstrap_path(member.config["bootstrap_model_file"]))
    first = Config(members[0].config)
    git = logging_gate(command.snapshot, first.snapshot_max_file_mb)
    sweep = create(
        log_root(command.log_dir) / (first.project_name or first.model_type), first.run_name, document, members, git
    )
    at = "snapshot" if git.get("snapshot") else "commit"
    print(f"sweep of {len(members)} run(s) at {at} {git['commit'][:12]}: {sweep.directory}")
    flags = member_flags(command)
    if not (command.slurm or command.submit):
        return run_locally(sweep, flags)
    script = write_slurm_script(sweep, first.slurm.to_dict(), flags, command.requeue)
    if command.submit:
        print(f"submitted job {submit(script)} ({script})")
    else:
        print(f"wrote {script}\nsubmit it with: sbatch {script}")
    return 0
