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

from src.core import provenance
from src.core.checkpoint import DamagedCheckpoint, read_checkpoint, step_checkpoints
from src.core.config import PROVENANCE_KEYS, dump_yaml
from src.core.errors import UserError
from src.core.metrics import read_metrics
from src.core.rundir import CONFIG_FILE, METADATA_FILE, read_yaml

DIFFERS_EXIT_CODE = 4  # reproduced, but the results are not identical


@dataclass
class Verdict:
    identical: bool
    compared: int
    lines: list[str] = field(default_factory=list)


def compare_metrics(original: list[dict], reproduction: list[dict]) -> Verdict:
    """Compare every value the reproduction logged with the original's at the same step.

    Values the original logged up to the reproduction's last step must all be there;
    a reproduction cut short (--epochs=1) is compared on the steps it ran.
    """

    def keyed(records):
        return {(r["step"], r["epoch"], r["phase"], r["name"]): r["value"] for r in records}

    before, after = keyed(original), keyed(reproduction)
    last_step = max((key[0] for key in after), default=-1)
    expected = {key for key in before if key[0] <= last_step}
    missing = sorted(expected - after.keys())
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
    if not common:
        lines.append("no values in common: nothing was compared")
    identical = not differences and not missing and bool(common)
    return Verdict(identical, len(common), lines)


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


def environment_differences(saved: dict, run_directory: Path, data_directory: Path) -> list[str]:
    """What differs between the recorded environment and data and the current ones."""
    notes = []
    recorded, current = saved.get("environment", {}), provenance.environment_provenance()
    for key in ("python", "torch", "numpy", "cuda", "cudnn", "gpus", "platform", "cpu_count", "torch_threads"):
        if key in recorded and recorded[key] != current[key]:
            notes.append(f"{key}: {recorded[key]} when recorded, {current[key]} now")
    packages_file = run_directory / "packages.txt"
    if packages_file.exists():
        before = set(packages_file.read_text().split())
        after = set(provenance.installed_packages())
        changed = sorted({line.split("==")[0] for line in before ^ after})
        if changed:
            more = " ..." if len(changed) > 10 else ""
            notes.append(f"installed packages differ: {', '.join(changed[:10])}{more}")
    recorded_data = saved.get("data_fingerprint") or {}
    if data_directory.is_dir() and recorded_data:
        now = provenance.data_fingerprint(data_directory)
        if now["listing_sha256"] != recorded_data.get("listing_sha256"):
            notes.append(f"data: the files or their sizes in {data_directory} changed")
        elif recorded_data.get("content_sha256") and now["content_sha256"] != recorded_data["content_sha256"]:
            notes.append(f"data: file contents in {data_directory} changed (same names and sizes)")
    elif recorded_data:
        notes.append(f"data: {data_directory} is gone")
    return notes


def run_at_commit(run_directory: Path, saved: dict, flags: list[str], overrides: list[str]) -> tuple[int, Path | None]:
    """Run the recorded config at the recorded commit in a temporary worktree; return
    the exit code and the reproduction's run directory."""
    commit = saved["git"]["commit"]
    scratch = Path(tempfile.mkdtemp(prefix="reproduce-"))
    worktree = scratch / "worktree"
    config_file = scratch / "config.yaml"  # outside the worktree, which must stay clean
    config_file.write_text(dump_yaml({k: v for k, v in saved.items() if k not in PROVENANCE_KEYS}))
    parent = run_directory.resolve() / "reproductions"
    before = set(parent.iterdir()) if parent.exists() else set()
    try:
        provenance.add_worktree(commit, worktree, f"--reproduce {run_directory}")
        print(f"reproducing {run_directory} at commit {commit[:12]} in a temporary worktree")
        command = [sys.executable, "run.py", str(config_file), *flags, "--run-parent", str(parent), *overrides]
        returncode = subprocess.run(command, cwd=worktree).returncode
    finally:
        provenance.remove_worktree(worktree)
        shutil.rmtree(scratch, ignore_errors=True)
    created = sorted(set(parent.iterdir()) - before) if parent.exists() else []
    return returncode, (created[-1] if created else None)


def reproduce(run_directory: Path, cpu: bool, overrides: list[tuple[str, str]]) -> int:
    if not (run_directory / CONFIG_FILE).is_file():
        raise UserError(f"--reproduce {run_directory}: no {CONFIG_FILE} there; expected a run directory under logs/")
    saved = read_yaml(run_directory / CONFIG_FILE)
    recorded_flags = saved.get("flags", {})
    data_directory = Path(saved["data_fingerprint"]["directory"])
    flags = ["--cpu"] if cpu or recorded_flags.get("cpu") else []
    flags += ["--mini"] if recorded_flags.get("mini") else []
    # The data lives outside git, at its recorded place; the reproduction is named by its start time.
    extra = [f"--data_directory={data_directory}", "--run_name=null"]
    if any(key == "epochs" for key, _ in overrides):  # a shorter check keeps the original schedule
        schedule_steps = (read_yaml(run_directory / METADATA_FILE) or {}).get("schedule_steps")
        if schedule_steps:
            extra.append(f"--scheduler.total_steps={schedule_steps}")
    extra += [f"--{key}={value}" for key, value in overrides]

    returncode, reproduction = run_at_commit(run_directory, saved, flags, extra)
    if returncode != 0 or reproduction is None:
        print(f"the reproduction failed (exit code {returncode})", file=sys.stderr)
        return returncode or 1
    verdict = compare_metrics(read_metrics(run_directory), read_metrics(reproduction))
    parameters = compare_parameters(run_directory, reproduction)
    notes = environment_differences(saved, run_directory, data_directory)
    same_weights = parameters is None or "identical" in parameters or "no checkpoint" in parameters
    identical = verdict.identical and same_weights
    print(f"\nreproduction: {reproduction}")
    print(f"compared {verdict.compared} logged values: " + ("identical (bitwise)" if identical else "they differ"))
    for line in [*verdict.lines, *([parameters] if parameters else [])]:
        print(f"  {line}")
    for note in notes:
        print(f"  warning: {note}")
    (reproduction / "comparison.json").write_text(
        json.dumps(
            {
                "original": str(run_directory),
                "identical": identical,
                "compared": verdict.compared,
                "differences": verdict.lines,
                "parameters": parameters,
                "environment_warnings": notes,
            },
            indent=1,
        )
        + "\n"
    )
    return 0 if identical else DIFFERS_EXIT_CODE
