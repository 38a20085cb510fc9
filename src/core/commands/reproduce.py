"""`--reproduce RUN_DIR`: re-make a logged run from its recorded commit and compare.

The run's commit is checked out into a temporary git worktree (so the working tree,
whatever its state, is never touched), the recorded config runs there with the
recorded flags, logging into `RUN_DIR/reproductions/<timestamp>/`, and the two runs'
metrics are compared value by value. The worktree is removed afterwards, also on
failure or Ctrl-C. What may explain a difference (another Python, torch or package
version, other hardware, changed data) is listed beside the verdict.
"""

import json
import math
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from src.core.archive.restore import restore_checkpoint
from src.core.archive.store import sha256_of_file
from src.core.commands.diff import ABSENT, IDENTITY_KEYS, flatten, read_recorded_run, results_section
from src.core.config.loader import dump_yaml, split_provenance
from src.core.errors import UserError
from src.core.phases import WALL_CLOCK_METRICS
from src.core.record.bootstrap import check_bootstrap
from src.core.record.checkpoint import DamagedCheckpoint, read_checkpoint, step_checkpoints
from src.core.record.environment import data_fingerprint, environment_provenance, installed_packages
from src.core.record.git import add_worktree, remove_worktree
from src.core.record.rundir import CONFIG_FILE, METADATA_FILE, read_yaml, require_run_directory
from src.core.record.snapshot import fetch_from_bundle
from src.core.tracking.metrics import read_metrics

DIFFERS_EXIT_CODE = 4  # reproduced, but the results are not identical


@dataclass
class Verdict:
    identical: bool  # no compared value differs and none the original logged is missing
    compared: int
    last_step: int  # the last step compared: the reproduction's or the original's end, whichever is first
    original_last_step: int
    lines: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether the comparison reached the original's last logged step."""
        return self.last_step >= self.original_last_step


def compare_metrics(original: list[dict], reproduction: list[dict], stops: frozenset[int] = frozenset()) -> Verdict:
    """Compare every value the reproduction logged with the original's at the same step.

    Values the original logged up to the reproduction's last step must all be there, but
    for those at `stops`, where it ended before a resume extended it (max_steps stops
    mid-epoch and evaluates; the uninterrupted reproduction does not). A reproduction cut
    short (--epochs=1) is compared on the steps it ran.
    """

    def keyed(records):  # what measures the machine (throughput, seconds) differs from run to run
        return {
            (r["step"], r["epoch"], r["phase"], r["name"]): r["value"]
            for r in records
            if f"{r['phase']}/{r['name']}" not in WALL_CLOCK_METRICS
        }

    before, after = keyed(original), keyed(reproduction)
    last_step = max((key[0] for key in after), default=-1)
    original_last_step = max((key[0] for key in before), default=-1)
    expected = {key for key in before if key[0] <= last_step}
    excused = sorted(key for key in expected - after.keys() if key[0] in stops)
    missing = sorted(expected - after.keys() - set(excused))
    common = sorted(expected & after.keys())
    lines = []
    differences: dict[str, list[tuple]] = {}
    for key in common:
        a, b = before[key], after[key]
        if a != b and not (math.isnan(a) and math.isnan(b)):
            differences.setdefault(f"{key[2]}/{key[3]}", []).append((key[0], a, b))
    for metric, items in sorted(differences.items()):
        first_step, a, b = items[0]
        worst = max(items, key=lambda item: abs(item[1] - item[2]))
        lines.append(
            f"{metric}: {len(items)} of its values differ; first at step {first_step} ({a!r} vs {b!r}); "
            f"largest difference {abs(worst[1] - worst[2]):.3g} at step {worst[0]}"
        )
    if missing:
        shown = ", ".join(f"{phase}/{name} at step {step}" for step, _, phase, name in missing[:5])
        lines.append(f"{len(missing)} value(s) the original logged are missing: {shown}")
    if excused:
        steps = ", ".join(str(step) for step in sorted({key[0] for key in excused}))
        lines.append(
            f"not compared: {len(excused)} value(s) the original logged where it stopped before an extension "
            f"(step {steps})"
        )
    if not common:
        lines.append("no values in common: nothing was compared")
    if last_step > original_last_step >= 0:
        lines.append(f"the original stopped at step {original_last_step}; the reproduction went on to step {last_step}")
    identical = not differences and not missing and bool(common)
    return Verdict(identical, len(common), min(last_step, original_last_step), original_last_step, lines)


def compare_parameters(original_run: Path, reproduction_run: Path) -> str | None:
    """Compare the weights at the reproduction's last step, when the original kept that step."""
    try:
        final = read_checkpoint(reproduction_run / "checkpoints" / "last.pt")
    except (DamagedCheckpoint, FileNotFoundError):
        return None
    step = final["progress"]["global_step"]
    candidates = [info.path for info in step_checkpoints(original_run / "checkpoints") if info.step == step]
    candidates.append(original_run / "checkpoints" / "last.pt")
    for path in candidates:
        try:
            state = read_checkpoint(path)
        except (DamagedCheckpoint, FileNotFoundError):
            continue
        if state["progress"]["global_step"] != step:
            continue
        largest = 0.0
        for name, tensor in final["model"].items():
            other = state["model"][name]
            if tensor.shape != other.shape:
                return f"parameters at step {step}: {name} has another shape"
            if tensor.is_floating_point():
                largest = max(largest, (tensor.double() - other.double()).abs().max().item())
            elif not bool((tensor == other).all()):
                largest = math.inf
        same = all(final["model"][name].equal(state["model"][name]) for name in final["model"])
        return f"parameters at step {step}: " + ("identical (bitwise)" if same else f"differ by up to {largest:.3g}")
    return f"parameters at step {step}: the original kept no checkpoint of that step"


def environment_differences(
    saved: dict, run_directory: Path, data_directory: Path, reproduction: Path | None = None
) -> list[str]:
    """What differs between the recorded environment and data and the reproduction's (as its own
    config.yaml and packages.txt record them; this process's where it recorded none)."""
    notes = []
    reproduced = (read_yaml(reproduction / CONFIG_FILE) or {}) if reproduction else {}
    recorded, current = saved.get("environment", {}), reproduced.get("environment") or environment_provenance()
    for key in ("python", "torch", "numpy", "cuda", "cudnn", "gpus", "platform", "cpu_count", "torch_threads"):
        if key in recorded and key in current and recorded[key] != current[key]:
            notes.append(f"{key}: {recorded[key]} when recorded, {current[key]} in the reproduction")
    packages_file = run_directory / "packages.txt"
    if packages_file.exists():
        before = set(packages_file.read_text().split())
        reproduced_packages = reproduction / "packages.txt" if reproduction else None
        after = (
            set(reproduced_packages.read_text().split())
            if reproduced_packages and reproduced_packages.exists()
            else set(installed_packages())
        )
        changed = sorted({line.split("==")[0] for line in before ^ after})
        if changed:
            more = " ..." if len(changed) > 10 else ""
            notes.append(f"installed packages differ: {', '.join(changed[:10])}{more}")
    recorded_data = saved.get("data_fingerprint") or {}
    if data_directory.is_dir() and recorded_data:
        now = data_fingerprint(data_directory)
        if now["listing_sha256"] != recorded_data.get("listing_sha256"):
            notes.append(f"data: the files or their sizes in {data_directory} changed")
        elif recorded_data.get("content_sha256") and now["content_sha256"] != recorded_data["content_sha256"]:
            notes.append(f"data: file contents in {data_directory} changed (same names and sizes)")
    elif recorded_data:
        notes.append(f"data: {data_directory} is gone")
    return notes


def world_size_differences(saved: dict, metadata: dict, reproduction_saved: dict) -> list[str]:
    """DDP's global batch is the per-rank batch times the world size, and its sums run in
    another order: a reproduction with another number of processes computes another run."""
    recorded = saved.get("environment", {}).get("world_size", 1)
    reproduced = reproduction_saved.get("environment", {}).get("world_size", 1)
    notes = []
    if recorded != reproduced:
        notes.append(
            f"world size: the original ran {recorded} process(es), the reproduction {reproduced}; "
            "the results are not expected to be bitwise equal"
        )
    for resume in metadata.get("resumes") or []:
        if resume.get("world_size", recorded) != recorded:
            notes.append(
                f"world size: the original was resumed at step {resume.get('from_step')} with "
                f"{resume['world_size']} process(es) instead of {recorded}; the reproduction runs "
                f"{reproduced} throughout, so later steps are not expected to be bitwise equal"
            )
    return notes


def use_recorded_world_size(config: dict, world_size: int, cpu: bool) -> str | None:
    """Make the reproduction start the original's number of processes on this machine
    (run.py starts torchrun itself when `distributed.nproc_per_node` > 1); return what
    was decided, or None when the config already asks for them.

    A run started by `torchrun` records `environment.world_size` but its config keeps
    `nproc_per_node: 1`, so the recorded config alone would run one process.
    """
    import torch

    settings = config.get("distributed")
    if world_size <= 1 or settings is None:
        return None
    legacy = config.get("multigpu_parameters") or {}  # the original template's; overrides `distributed`
    processes = legacy.get("ngpus_per_node", 1) if legacy else settings.get("nproc_per_node", 1)
    nodes = legacy.get("num_nodes", 1) if legacy else settings.get("nnodes", 1)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and not cpu else world_size
    here = world_size if gpus >= world_size else 1  # one process per GPU
    if nodes == 1 and processes == here == world_size:
        return None
    config["distributed"] = {**settings, "nproc_per_node": here, "nnodes": 1, "rdzv_endpoint": None}
    if legacy:
        config["multigpu_parameters"] = None
    if here < world_size:
        return (
            f"the original ran {world_size} processes, but this machine has {gpus} GPU(s): reproducing in one "
            f"process (--cpu would start {world_size} on the CPU)"
        )
    where = f" (the original ran them on {nodes} nodes)" if nodes > 1 else ""
    return f"the original ran {world_size} processes: starting {world_size} on this machine{where}"


def original_epochs(metadata: dict, records: list[dict]) -> int:
    """How many epochs the original ran: metadata's `epochs_done` (config.yaml keeps the
    first `epochs` of a run extended with --resume --epochs=N), else its metrics' last epoch."""
    if metadata.get("epochs_done") is not None:
        return int(metadata["epochs_done"])
    return max((record["epoch"] for record in records), default=0)


def branch_arguments(run_directory: Path, saved: dict) -> list[str]:
    """How a branch is re-made: `--resume PARENT --from-step N` from the parent's checkpoint,
    verified by the SHA-256 the branch recorded, with the branch's config as edits of the parent's."""
    parent = saved["parent"]
    parent_run = Path(parent["run"])
    checkpoint = parent_run / "checkpoints" / parent["checkpoint"]
    where = f"--reproduce {run_directory}: a branch of {parent_run} at step {parent['step']}"
    if (parent_run / CONFIG_FILE).is_file() and not checkpoint.is_file() and parent.get("checkpoint_sha256"):
        restore_checkpoint(parent_run, parent["checkpoint"], parent["checkpoint_sha256"], "--reproduce")
    if not checkpoint.is_file() or not (parent_run / CONFIG_FILE).is_file():
        raise UserError(
            f"{where}, but {checkpoint} is not there, nor in the parent's archive; restore the parent run "
            "(--restore ARCHIVE_URI) to that place, then reproduce the branch again"
        )
    if parent.get("checkpoint_sha256") and sha256_of_file(checkpoint) != parent["checkpoint_sha256"]:
        raise UserError(
            f"{where}, but {checkpoint} is not the checkpoint it started from (its SHA-256 differs from the "
            "one in the branch's config.yaml, parent); the branch cannot be re-made from it"
        )
    before = flatten(split_provenance(read_yaml(parent_run / CONFIG_FILE) or {})[0])
    after = flatten(split_provenance(saved)[0])
    edits = [
        f"--{key}={json.dumps(value)}"  # JSON is YAML: strings quoted, floats exact
        for key, value in sorted(after.items())
        if key not in IDENTITY_KEYS and before.get(key, ABSENT) != value
    ]
    deleted = sorted(key for key in before.keys() - after.keys() if key not in IDENTITY_KEYS)
    return [
        "--resume",
        str(parent_run),
        "--from-step",
        str(parent["step"]),
        *edits,
        *(["--delete", *deleted] if deleted else []),
    ]


def run_at_commit(
    run_directory: Path,
    commit: str,
    config: dict,
    flags: list[str],
    overrides: list[str],
    branch: list[str] | None = None,
) -> tuple[int, Path | None]:
    """Run `config` (or, for a branch, its `branch_arguments`) at `commit` in a temporary
    worktree; return the exit code and the reproduction's run directory."""
    scratch = Path(tempfile.mkdtemp(prefix="reproduce-"))
    worktree = scratch / "worktree"
    config_file = scratch / "config.yaml"  # outside the worktree, which must stay clean
    config_file.write_text(dump_yaml(config))
    parent = run_directory.resolve() / "reproductions"
    before = set(parent.iterdir()) if parent.exists() else set()
    try:
        add_worktree(commit, worktree, f"--reproduce {run_directory}")
        print(f"reproducing {run_directory} at commit {commit[:12]} in a temporary worktree")
        source = [str(config_file)] if branch is None else branch
        command = [sys.executable, "run.py", *source, *flags, "--run-parent", str(parent), *overrides]
        returncode = subprocess.run(command, cwd=worktree).returncode
    finally:
        remove_worktree(worktree)
        shutil.rmtree(scratch, ignore_errors=True)
    created = sorted(set(parent.iterdir()) - before) if parent.exists() else []
    return returncode, (created[-1] if created else None)


def headline(verdict: Verdict, identical: bool, epochs: tuple[int, int]) -> str:
    """The verdict, saying what was compared: a partial check is never plainly "identical"."""
    reproduced, original = epochs
    text = f"compared {verdict.compared} logged values up to step {verdict.last_step} of the original's "
    text += f"{verdict.original_last_step}: "
    if not identical:
        return text + "they differ"
    if verdict.complete:
        return text + "identical (bitwise)"
    return text + f"identical over the first {reproduced} epoch(s) (the original ran {original}); later steps unchecked"


def reproduce(run_directory: Path, cpu: bool, overrides: list[tuple[str, str]]) -> int:
    """Re-run a logged run at its commit, with its flags, data and world size, to its full
    length (an extended run's too) unless --epochs says otherwise; compare and report."""
    saved = read_yaml(require_run_directory(run_directory, "--reproduce") / CONFIG_FILE)
    branch = branch_arguments(run_directory, saved) if saved.get("parent") else None
    metadata = read_yaml(run_directory / METADATA_FILE) or {}
    original = read_metrics(run_directory)
    config, flags, extra, epochs = reproduction_settings(run_directory, saved, metadata, original, cpu, overrides)
    fetch_from_bundle(run_directory, saved["git"])  # a snapshot run restored where its ref is not
    returncode, reproduction = run_at_commit(run_directory, saved["git"]["commit"], config, flags, extra, branch)
    if returncode != 0 or reproduction is None:
        print(f"the reproduction failed (exit code {returncode})", file=sys.stderr)
        return returncode or 1
    return report(run_directory, reproduction, saved, metadata, original, epochs)


def reproduction_settings(
    run_directory: Path, saved: dict, metadata: dict, original: list[dict], cpu: bool, overrides: list
) -> tuple[dict, list[str], list[str], int]:
    """What the reproduction runs: the recorded config, flags and overrides (the data at its
    recorded place, the original's world size and length), and the original's epochs."""
    recorded_flags = saved.get("flags", {})
    flags = ["--cpu"] if cpu or recorded_flags.get("cpu") else []
    flags += ["--mini"] if recorded_flags.get("mini") else []
    config = split_provenance(saved)[0]
    bootstrap = check_bootstrap(saved.get("bootstrap"), "--reproduce", run_directory)
    if bootstrap is not None:  # the worktree has no logs/: read the weights where the original did
        config["bootstrap_model_file"] = str(bootstrap)
    # The original's number of processes, unless the user sets it (--distributed.nproc_per_node=1).
    if not any(key.split(".")[0] in ("distributed", "multigpu_parameters") for key, _ in overrides):
        world_size = saved.get("environment", {}).get("world_size", 1)
        launch = use_recorded_world_size(config, world_size, "--cpu" in flags)
        if launch:
            print(launch)
    # The data lives outside git, at its recorded place; the reproduction is named by its start time.
    extra = [f"--data_directory={saved['data_fingerprint']['directory']}", "--run_name=null"]
    epochs = original_epochs(metadata, original)
    extra += length_overrides(saved, metadata, epochs, overrides)
    return config, flags, [*extra, *(f"--{key}={value}" for key, value in overrides)], epochs


def length_overrides(saved: dict, metadata: dict, epochs: int, overrides: list) -> list[str]:
    """How long the reproduction runs: the original's whole length, an extended run's too (to its
    recorded epoch, or with `max_steps` to its recorded step), unless --epochs/--max_steps says."""
    asked = any(key in ("epochs", "max_steps") for key, _ in overrides)  # --epochs=1: a quick check
    steps = metadata.get("global_step") or 0
    extra = []
    if saved.get("max_steps") and steps > saved["max_steps"] and not asked:  # max_steps ends the run
        print(f"the original was extended to step {steps} (its config.yaml says max_steps {saved['max_steps']})")
        extra.append(f"--max_steps={steps}")
    elif epochs > saved["epochs"] and not asked and not saved.get("max_steps"):
        print(f"the original was extended to {epochs} epochs (its config.yaml says {saved['epochs']}): reproducing all")
        extra.append(f"--epochs={epochs}")
    if (asked or extra) and metadata.get("schedule_steps"):  # another length keeps the original's schedule
        extra.append(f"--scheduler.total_steps={metadata['schedule_steps']}")
    return extra


def report(
    run_directory: Path, reproduction: Path, saved: dict, metadata: dict, original: list[dict], epochs: int
) -> int:
    """Compare the reproduction with the original, print the verdict, and keep it in
    the reproduction's comparison.json."""
    stops = frozenset(resume.get("from_step") for resume in metadata.get("resumes") or [])
    verdict = compare_metrics(original, read_metrics(reproduction), stops)
    parameters = compare_parameters(run_directory, reproduction)
    reproduced_epochs = (read_yaml(reproduction / METADATA_FILE) or {}).get("epochs_done", 0)
    notes = environment_differences(saved, run_directory, Path(saved["data_fingerprint"]["directory"]), reproduction)
    notes += world_size_differences(saved, metadata, read_yaml(reproduction / CONFIG_FILE) or {})
    same_weights = parameters is None or "identical" in parameters or "no checkpoint" in parameters
    identical = verdict.identical and same_weights
    print(f"\nreproduction: {reproduction}")
    print(headline(verdict, identical, (reproduced_epochs, epochs)))
    for line in [*verdict.lines, *([parameters] if parameters else [])]:
        print(f"  {line}")
    for note in notes:
        print(f"  warning: {note}")
    results = results_section(read_recorded_run(str(run_directory)), read_recorded_run(str(reproduction)), True)
    if not identical and results.lines:  # as --diff ORIGINAL REPRODUCTION says it
        print("results (original | reproduction):", *results.lines, sep="\n")
    comparison = {
        "original": str(run_directory),
        "identical": identical,
        "complete": verdict.complete,  # false: identical only up to compared_up_to_step
        "compared": verdict.compared,
        "compared_up_to_step": verdict.last_step,
        "original_last_step": verdict.original_last_step,
        "epochs": {"original": epochs, "reproduction": reproduced_epochs},
        "differences": verdict.lines,
        "parts_at": results.data["parts"],  # the first step and metric where the values differ
        "parameters": parameters,
        "environment_warnings": notes,
    }
    (reproduction / "comparison.json").write_text(json.dumps(comparison, indent=1) + "\n")
    return 0 if identical else DIFFERS_EXIT_CODE
