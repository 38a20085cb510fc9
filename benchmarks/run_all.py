"""`make bench`: every benchmark, side by side, printed and written to benchmarks/results/latest.md.

python benchmarks/run_all.py [--repetitions N] [--only training,classifier,startup,gate,checkpoint,trackers,archive]
"""

import argparse
import datetime
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import archive
import checkpointing
import classifier_overhead
import epoch_overhead
import git_gate
import startup
import torch
import trackers
import training_overhead
from common import REPO, scratch_project

HEADER = "| measurement | A | B | A / B (median) | spread (min–max) |\n|---|---|---|---|---|"


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} × {cpu}, {memory:.0f} GiB, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {datetime.date.today().isoformat()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--only", default="training,classifier,startup,gate,checkpoint,trackers,archive")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        run(set(args.only.split(",")), args.repetitions, Path(scratch))


def run(chosen: set[str], repetitions: int, scratch: Path) -> None:
    project = scratch_project(scratch)
    results = REPO / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    sections = []

    def report(*parts: str) -> None:  # print and save each section as soon as it is measured
        sections.extend(parts)
        print("\n".join(parts), flush=True)
        (results / "latest.md").write_text("\n".join(sections))

    report(f"Machine: {machine()}\n")

    configs = training_overhead.prepare(project)
    if "training" in chosen:
        comparisons, memory = training_overhead.run(project, configs, repetitions)
        data = project / "data" / "bench"
        comparisons += epoch_overhead.run(data, training_overhead.TASKS, max(10, 4 * repetitions))
        report(
            "### 1. Training overhead (A = as named, B = the plain loop)\n",
            "\n".join([HEADER, *(c.row() for c in comparisons)]) + "\n",
            "### 5. Peak resident memory (whole process)\n",
            "\n".join(["| task | Trainer | plain loop | difference |", "|---|---|---|---|", *memory]) + "\n",
        )
    if "classifier" in chosen:
        rows = [c.row() for c in classifier_overhead.run(scratch, repetitions)]
        report(
            "### 6. What users fork: a small classifier, whole process (A = as named, B = as named)\n",
            "\n".join([HEADER, *rows]) + "\n",
        )
    if "startup" in chosen:
        rows = startup.run(project, next(iter(configs.values())), repetitions)
        table = ["| run | to first step | beyond `import torch` | beyond the plain loop |", "|---|---|---|---|"]
        report("### 2. Start-up: process start to the end of the first training step\n", "\n".join(table + rows) + "\n")
    if "gate" in chosen:
        rows = [c.row() for c in git_gate.run(max(repetitions, 10), scratch)]
        report("### 3. The git gate (50,000 tracked files)\n", "\n".join([HEADER, *rows]) + "\n")
    if "checkpoint" in chosen:
        data = project / "data" / "pendulum"
        if not data.exists():
            subprocess.run(["python", "data/generate_pendulum.py"], cwd=project, check=True, capture_output=True)
        comparisons, notes = checkpointing.run(data, max(3, repetitions // 2), scratch)
        report("### 4. Checkpointing\n", "\n".join([HEADER, *(c.row() for c in comparisons)]) + "\n", *notes)
    if "trackers" in chosen:
        rows = [c.row() for c in trackers.run(max(repetitions, 7), scratch)]
        rows = rows or ["| neither wandb nor mlflow is installed (pip install -r requirements-trackers.txt) | | | | |"]
        title = "### 7. Experiment trackers (A = TensorBoard + metrics.jsonl + the tracker, B = without it)\n"
        report(title, "\n".join([HEADER, *rows]) + "\n")
    if "archive" in chosen:  # against moto's S3 server on localhost
        comparisons, notes = archive.run(repetitions)
        rows = "\n".join([HEADER, *(c.row() for c in comparisons)]) + "\n"
        report("### 8. Archiving to S3 (A = as named, B = without it)\n", rows, *notes)
    print(f"written to {results / 'latest.md'}")


if __name__ == "__main__":
    main()
