"""Where a logged run's extra seconds go, against the plain loop: start-up, the epochs, exit.

python benchmarks/fixed_costs.py [--repetitions 5]

The small classifier of benchmarks/classifier_overhead.py (train, validation, rollout,
accuracy, a confusion-matrix figure per rollout, a checkpoint per epoch), three sides run
as whole processes in alternating rounds: the plain loop (benchmarks/plain_classifier.py),
the logged run and the --no-logging run. Each process is split in three by two marks:

- start-up: process start to the end of the first optimizer step (this script's child mode
  wraps the optimizer's `step` and writes the time of its first call);
- the epochs: from there to the last epoch's line on the console (both sides print one
  line per epoch, after its checkpoint is handed over);
- exit: from that line to the parent seeing the process end, in two parts: closing (the
  script's own work after its last epoch: the last checkpoint's write, closing the logs,
  the final status) up to the script's return, then teardown (the interpreter's exit).

Wall and CPU time (user + system, os.wait4) of the whole process too. Medians over the
rounds, with the spread of the per-round differences and ratios; the first round warms up.

Every side runs with Python's own default, compiled modules kept in __pycache__, whatever
this machine's environment says (`--no-bytecode-cache` sets PYTHONDONTWRITEBYTECODE=1 for
every side instead: the template's 11,000 lines are then compiled again at each start, about
0.1 s here, and the plain loop's one file).
"""

import argparse
import os
import re
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import classifier_overhead
from common import python

EPOCH_LINE = re.compile(r"^epoch \d+")


def child(marks: str, argv: list[str]) -> None:
    """Run `argv` (a script and its arguments) in this process, marking the first optimizer step."""
    import torch

    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        if not getattr(step, "marked", False):
            step.marked = True
            result = original(self, *args, **kwargs)
            Path(marks).write_text(f"{time.time()}\n")
            return result
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = step
    sys.argv = argv
    sys.path.insert(0, os.getcwd())
    try:
        runpy.run_path(argv[0], run_name="__main__")
    finally:  # reached by sys.exit; not by an os._exit, where teardown is (nearly) nothing
        with open(marks, "a") as stream:
            stream.write(f"{time.time()}\n")


def run_once(command: list[str], cwd: Path, marks: Path, bytecode_cache: bool = True) -> dict[str, float]:
    """One whole process: its start-up, epochs and exit seconds, wall and CPU. With
    `bytecode_cache`, Python keeps compiled modules in __pycache__ as it does by default
    (PYTHONDONTWRITEBYTECODE is taken out of the environment); without, it compiles every
    module of the run again at each start (the variable set)."""
    marks.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    wrapped = [python(), __file__, "--child", str(marks), "--", *command[1:]]
    started = time.time()
    process = subprocess.Popen(wrapped, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last_epoch, lines = None, []
    for line in process.stdout:
        lines.append(line)
        if EPOCH_LINE.match(line):
            last_epoch = time.time()
    _, status, usage = os.wait4(process.pid, 0)
    ended = time.time()
    if status != 0 or last_epoch is None or not marks.exists():
        raise RuntimeError(f"{command} failed (status {status}):\n{''.join(lines[-20:])}")
    first_step, *returned = (float(line) for line in marks.read_text().split())
    returned = returned[0] if returned else ended  # an os._exit: the script's return is the process's end
    return {
        "wall": ended - started,
        "cpu": usage.ru_utime + usage.ru_stime,
        "start-up": first_step - started,
        "epochs": last_epoch - first_step,
        "exit": ended - last_epoch,
        "closing": returned - last_epoch,
        "teardown": ended - returned,
    }


def summarise(results: dict[str, list[dict[str, float]]]) -> list[str]:
    """A markdown table: each side's medians, and the logged sides against the plain loop."""
    rows = ["| part | plain loop | logged | --no-logging | logged − plain (range) | --no-logging − plain (range) |"]
    rows.append("|---|---|---|---|---|---|")
    for part in ("start-up", "epochs", "exit", "closing", "teardown", "wall", "cpu"):
        medians = [statistics.median(r[part] for r in results[side]) for side in ("plain", "logged", "logging off")]
        cells = [f"{value:.3f} s" for value in medians]
        for side in ("logged", "logging off"):
            differences = [r[part] - p[part] for r, p in zip(results[side], results["plain"], strict=True)]
            low, high = min(differences), max(differences)
            cells.append(f"{statistics.median(differences):+.3f} s ({low:+.3f} to {high:+.3f})")
        rows.append(f"| {part} | " + " | ".join(cells) + " |")
    for part in ("wall", "cpu"):
        cells = []
        for side in ("logged", "logging off"):
            ratios = [r[part] / p[part] for r, p in zip(results[side], results["plain"], strict=True)]
            cells.append(f"**{statistics.median(ratios):.3f}×** ({min(ratios):.3f}–{max(ratios):.3f})")
        rows.append(f"| {part} ratio to plain | | | | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="compile every module at each start (PYTHONDONTWRITEBYTECODE=1), as some containers set it",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    arguments, rest = parser.parse_known_args()
    if arguments.child:
        return child(arguments.child, rest[1:] if rest[:1] == ["--"] else rest)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        project = classifier_overhead.prepare(scratch)
        sides = classifier_overhead.commands(project, scratch / "plain-checkpoints")
        results = {side: [] for side in sides}
        for repetition in range(arguments.repetitions + 1):  # alternate the sides; the first round warms up
            for side, command in sides.items():
                measured = run_once(command, project, scratch / "marks", not arguments.no_bytecode_cache)
                print(side, " ".join(f"{key} {value:.3f}" for key, value in measured.items()), flush=True)
                if repetition:
                    results[side].append(measured)
        print("\n".join(summarise(results)))


if __name__ == "__main__":
    main()
