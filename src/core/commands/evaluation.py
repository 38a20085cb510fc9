"""Evaluation after the fact: the validation and rollout phases on a run's saved checkpoints.

`python run.py --evaluate RUN_DIR [--name NAME]` runs in its own process and only
reads the training's files: it takes no lock on the run, verifies each checkpoint as
a resume would, and skips one that disappears (pruned) while it works, so it can run
beside a training that is still going. An evaluation may use other evaluation data
(EVALUATION_MAY_CHANGE) and a subset of it. It writes `RUN_DIR/evaluation/<name>/`
(its config.yaml, each checkpoint's JSON, and with --save-outputs its per-sample
outputs) and merges its rows into `RUN_DIR/evaluation.csv`, keyed by (evaluation,
checkpoint), under a lock of its own.
"""

import contextlib
import csv
import fcntl
import io
import json
import math
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from src.core.commands.cli import CommandLine, recorded_flags
from src.core.commands.resume import load_run
from src.core.config.loader import dump_yaml
from src.core.config.schema import project_schema
from src.core.config.validation import changed_keys
from src.core.distributed import DistContext, choose_device
from src.core.errors import UserError
from src.core.phases import EVALUATION_PHASES
from src.core.record.checkpoint import DamagedCheckpoint, manifest_path, read_checkpoint, step_checkpoints
from src.core.record.environment import data_fingerprint, find_data_directory
from src.core.record.git import check_same_commit, gate
from src.core.record.rundir import CONFIG_FILE, now, read_yaml, write_bytes_atomic, write_text_atomic
from src.core.tables import csv_text
from src.core.training.build import Task, build_task
from src.core.training.data import Loaders
from src.core.training.evaluator import Evaluator

# The result-affecting keys an evaluation may change: what it evaluates on, not what was trained.
EVALUATION_MAY_CHANGE = frozenset(
    {
        "test_data_loader_type",
        "eval_data_loader_type",
        "data_loader_parameters.test",
        "data_loader_parameters.eval",
        "data_directory",
        "rollout.max_samples",
        "eval_batch_size",
    }
)
DEFAULT_NAME = "default"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+-]{0,99}")
KEY_COLUMNS = ("evaluation", "checkpoint", "step", "epoch")


def evaluate_run(command: CommandLine) -> int:
    """`--evaluate RUN_DIR`: the validation and rollout phases on the run's saved checkpoints."""
    name = command.name if command.name is not None else DEFAULT_NAME
    if not NAME.fullmatch(name):
        raise UserError(
            f"--name {name!r}: expected letters, digits and . _ = , + - (starting with a letter or digit, "
            "at most 100 characters); it names the directory evaluation/<name>/"
        )
    if command.save_outputs and command.no_logging:
        raise UserError("--save-outputs writes into the run directory, and --no-logging writes nothing; drop one")
    run_directory, saved, config = load_run(command.evaluate, command.edits, "--evaluate", EVALUATION_MAY_CHANGE)
    git = None
    if not command.no_logging:  # results written into the run must come from the run's own code
        git = gate()
        check_same_commit(saved["git"]["commit"], git["commit"], "--evaluate", run_directory)
    context = DistContext()
    context = context.on(choose_device(command.cpu, context))
    data_directory = str(find_data_directory(config.data_directory))
    record = None
    if git is not None:
        record = {
            **config.to_dict(),
            "evaluation": {"name": name, "subset": command.subset, "evaluated": now()},
            "git": git,
            "flags": recorded_flags(command),
            "command_line": shlex.join(["python", "run.py", *command.argv]),
            "data_fingerprint": data_fingerprint(data_directory),
        }
        check_same_settings(run_directory / "evaluation" / name, record)
    task = build_task(config, data_directory, saved["flags"]["mini"], context.device)
    task = Task(task.model.to(context.device), task.loss_function, take_subset(task.datasets, command.subset))
    evaluator = Evaluator(config, task, Loaders(config, task.datasets, context), context)
    paths = checkpoints_to_evaluate(run_directory / "checkpoints", command.checkpoints)
    results = evaluate_checkpoints(evaluator, paths, save_outputs=command.save_outputs)
    if record is not None:
        try:
            print(f"wrote {write_evaluation(run_directory, name, results, record)}")
        except OSError as error:  # a read-only run directory, a full disk: every file is written atomically
            raise UserError(
                f"--evaluate {run_directory}: cannot write the results into evaluation/{name}/ "
                f"({error.strerror or type(error).__name__}: {error.filename or ''}); evaluation.csv is as it was. "
                "Free space or make the run directory writable, then run the same command again"
            ) from None
    return 0


def take_subset(datasets: dict, fraction: float | None) -> dict:
    """--subset F: the first ceil(F * n) samples of each evaluation dataset (deterministic:
    the same samples at every call, so evaluations of different checkpoints compare)."""
    if fraction is None:
        return datasets
    subset = dict(datasets)
    for phase in EVALUATION_PHASES:
        if phase.name in datasets:
            dataset_class, dataset = datasets[phase.name]
            subset[phase.name] = (dataset_class, Subset(dataset, range(math.ceil(fraction * len(dataset)))))
    return subset


def evaluation_settings(record: dict) -> dict:
    """What makes an evaluation's numbers beside the result-affecting config: the subset, the commit."""
    return {"subset": (record.get("evaluation") or {}).get("subset"), "commit": (record.get("git") or {}).get("commit")}


def check_same_settings(directory: Path, record: dict) -> None:
    """An evaluation name stands for one set of settings: its rows must compare with each other."""
    path = directory / CONFIG_FILE
    if not path.exists():
        return
    before, schema = read_yaml(path) or {}, project_schema()
    old_config, new_config = ({key: value for key, value in r.items() if key in schema} for r in (before, record))
    changed = changed_keys(old_config, new_config, schema)
    old, new = evaluation_settings(before), evaluation_settings(record)
    changed += [key for key in old if old[key] != new[key]]
    if changed:
        raise UserError(
            f"--evaluate: the evaluation {directory.name!r} was made with other settings "
            f"({', '.join(changed)} differ); give this one another --name, or delete {directory} to redo it"
        )


def checkpoints_to_evaluate(directory: Path, names: list[str] | None) -> list[Path]:
    """Every step checkpoint (and best.pt when its step file was pruned), or the ones named."""
    if names:
        paths = []
        for name in names:
            path = directory / (name if name.endswith(".pt") else f"{name}.pt")
            if not path.exists() and name.isdigit():
                path = directory / f"step-{int(name):09d}.pt"
            if not path.exists():
                available = ", ".join(p.name for p in sorted(directory.glob("*.pt"))) or "none"
                raise UserError(f"--checkpoints: no checkpoint {name!r} in {directory} (available: {available})")
            paths.append(path)
        return paths
    paths = [info.path for info in step_checkpoints(directory) if manifest_path(info.path).exists()]
    best = directory / "best.pt"
    if best.exists() and not any(_same_file(best, path) for path in paths):
        paths.append(best)
    return paths


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except FileNotFoundError:  # pruned by the training meanwhile
        return False


def evaluate_checkpoints(evaluator: Evaluator, paths: list[Path], save_outputs: bool = False) -> list[dict]:
    """Each checkpoint's metrics, computed exactly as training computes them (and, with
    `save_outputs`, the model's `outputs` of every sample, by `<phase>/<key>`)."""
    results = []
    for path in paths:
        try:
            state = read_checkpoint(path)
        except DamagedCheckpoint as error:
            if not (path.exists() and manifest_path(path).exists()):
                print(f"note: {path.name} was pruned by the training meanwhile; skipped", file=sys.stderr)
            else:
                print(f"warning: skipping checkpoint {error}", file=sys.stderr)
            continue
        evaluator.model.load_state_dict(state["model"])
        progress = state["progress"]
        row = {"checkpoint": path.name, "step": progress["global_step"], "epoch": progress["epoch"]}
        details, outputs = {}, {}
        for phase in evaluator.phases:
            collect = OutputCollector(evaluator.model, phase, outputs) if save_outputs else None
            metrics, details[phase] = evaluator.evaluate(phase, on_batch=collect)
            row |= metrics
        results.append({"row": row, "batches": details, "outputs": outputs})
        print(
            "  ".join(
                f"{key} {value:.6g}" if isinstance(value, float) else f"{key} {value}" for key, value in row.items()
            )
        )
    return results


class OutputCollector:
    """Gathers `model.outputs(...)` of each batch of a phase into `into[<phase>/<key>]`."""

    def __init__(self, model, phase: str, into: dict[str, list]):
        self.model, self.phase, self.into = model, phase, into

    def __call__(self, prediction, target: torch.Tensor, inputs: dict) -> None:
        samples = len(target)
        for key, value in self.model.outputs(prediction, target, inputs).items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or len(value) != samples:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise UserError(
                    f"{type(self.model).__name__}.outputs: {key!r} is {shape}; expected a tensor with one "
                    f"row per sample (first dimension {samples}, this batch's samples)"
                )
            self.into.setdefault(f"{self.phase}/{key}", []).append(value.detach().cpu())


def merge_rows(existing: list[dict], new: list[dict]) -> list[dict]:
    """evaluation.csv's rows: each (evaluation, checkpoint) once, the newest replacing an older
    one in place; every other row kept; new ones appended."""
    key = lambda row: (row.get("evaluation") or DEFAULT_NAME, row["checkpoint"])  # noqa: E731
    replacements = {key(row): row for row in new}
    merged = [replacements.pop(key(row), row) for row in existing]
    return merged + [row for row in new if key(row) in replacements]


def write_evaluation(run_directory: Path, name: str, results: list[dict], record: dict) -> Path:
    """evaluation/<name>/ (config.yaml, <checkpoint>.json, <checkpoint>.outputs.npz) and the
    rows merged into evaluation.csv: every file written atomically, the merge under a lock
    (two evaluations may finish at once)."""
    directory = run_directory / "evaluation" / name
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / CONFIG_FILE, dump_yaml(record))
    for result in results:
        stem = Path(result["row"]["checkpoint"]).stem
        document = {"evaluation": name, "commit": record["git"]["commit"], "row": result["row"]}
        write_text_atomic(
            directory / f"{stem}.json", json.dumps(document | {"batches": result["batches"]}, indent=1) + "\n"
        )
        if result["outputs"]:
            write_outputs(directory / f"{stem}.outputs.npz", result["outputs"])
    path = run_directory / "evaluation.csv"
    new_rows = [{"evaluation": name, **result["row"]} for result in results]
    with evaluation_lock(run_directory):
        existing = []
        if path.exists():
            with open(path, newline="", encoding="utf-8") as stream:
                existing = list(csv.DictReader(stream))
        rows = merge_rows(existing, new_rows)
        columns = list(dict.fromkeys([*KEY_COLUMNS, *(key for row in rows for key in row)]))
        write_text_atomic(path, csv_text(rows, columns))
    return path


@contextlib.contextmanager
def evaluation_lock(run_directory: Path):
    """Serialise the read-merge-write of evaluation.csv (not the training's lock: evaluation
    never waits for, or blocks, the training)."""
    with open(run_directory / "evaluation" / ".lock", "a+") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def write_outputs(path: Path, outputs: dict[str, list[torch.Tensor]]) -> None:
    """Per-sample outputs as a NumPy .npz (np.load(path)["rollout/prediction"]), written atomically."""
    arrays = {}
    for key, parts in outputs.items():
        tensor = torch.cat([part.detach().cpu() for part in parts])
        arrays[key] = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())
