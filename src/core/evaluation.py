"""Evaluation after the fact: the validation and rollout phases on a run's saved checkpoints.

`python run.py --evaluate RUN_DIR` runs in its own process and only reads the
training's files: it takes no lock, verifies each checkpoint as a resume would,
and skips one that disappears (pruned) while it works, so it can run beside a
training that is still going. It writes `RUN_DIR/evaluation.csv` (a row per
checkpoint) and `RUN_DIR/evaluation/<checkpoint>.json` (each batch's loss).
"""

import json
import sys
from pathlib import Path

from src.core import provenance
from src.core.checkpoint import DamagedCheckpoint, manifest_path, read_checkpoint, step_checkpoints
from src.core.distributed import DistContext, choose_device
from src.core.errors import UserError
from src.core.phases import EVALUATION_PHASES
from src.core.planning import check_same_commit, find_data_directory, load_run
from src.core.resolve import build_parts
from src.core.rundir import write_text_atomic
from src.core.tables import csv_text
from src.core.trainer import Trainer


def evaluate_run(args) -> int:
    """`--evaluate RUN_DIR`: the validation and rollout phases on the run's saved checkpoints."""
    run_directory, saved, config = load_run(args.evaluate, args.edits, "--evaluate")
    commit = None
    if not args.no_logging:  # results written into the run must come from the run's own code
        commit = provenance.gate()["commit"]
        check_same_commit(saved["git"]["commit"], commit, "--evaluate", run_directory)
    device = choose_device(args.cpu, DistContext())
    data_directory = str(find_data_directory(config))
    model, datasets, loss_function = build_parts(config, data_directory, saved["flags"]["mini"], device)
    trainer = Trainer(config, model, loss_function, datasets, device=device)
    paths = checkpoints_to_evaluate(run_directory / "checkpoints", args.checkpoints)
    results = evaluate_checkpoints(trainer, paths)
    if commit is not None:
        print(f"wrote {write_evaluation(run_directory, results, commit)}")
    return 0


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


def evaluate_checkpoints(trainer: Trainer, paths: list[Path]) -> list[dict]:
    """Each checkpoint's metrics, computed exactly as training computes them."""
    results = []
    for path in paths:
        try:
            state = read_checkpoint(path)
        except DamagedCheckpoint as error:
            print(f"warning: skipping checkpoint {error}", file=sys.stderr)
            continue
        except FileNotFoundError:
            print(f"note: {path.name} was pruned by the training meanwhile; skipped", file=sys.stderr)
            continue
        trainer.model.load_state_dict(state["model"])
        progress = state["progress"]
        row = {"checkpoint": path.name, "step": progress["global_step"], "epoch": progress["epoch"]}
        details = {}
        for phase in EVALUATION_PHASES:
            if phase.name in trainer.datasets:
                metrics, details[phase.name] = trainer.evaluate(phase.name)
                row |= metrics
        results.append({"row": row, "batches": details})
        print(
            "  ".join(
                f"{key} {value:.6g}" if isinstance(value, float) else f"{key} {value}" for key, value in row.items()
            )
        )
    return results


def write_evaluation(run_directory: Path, results: list[dict], commit: str) -> Path:
    """evaluation.csv and evaluation/<checkpoint>.json, each written atomically."""
    path = run_directory / "evaluation.csv"
    write_text_atomic(path, csv_text([result["row"] for result in results]))
    details = run_directory / "evaluation"
    details.mkdir(exist_ok=True)
    for result in results:
        name = Path(result["row"]["checkpoint"]).stem
        document = {"commit": commit, **result}
        write_text_atomic(details / f"{name}.json", json.dumps(document, indent=1) + "\n")
    return path
