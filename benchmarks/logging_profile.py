"""Where a logged run's extra wall time goes: the small classifier of benchmark 6, logged and
with --no-logging, each side run in-process with wall and CPU timers around the logging
machinery's calls (per thread: the training thread and the background writer).

python benchmarks/logging_profile.py [--repetitions 3]

A wall-clock profile, not a CPU one: an fsync or a queue that blocks the training thread
costs wall time and almost no CPU. cProfile is avoided because its per-call cost inflates
exactly the Python-heavy parts being compared.
"""

import argparse
import collections
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# (module, attribute) pairs timed wherever they are called from; methods are listed per class.
FUNCTIONS = {
    "src.core.record.git": ["gate"],
    "src.core.record.environment": ["environment_provenance", "installed_packages", "data_fingerprint"],
    "src.core.record.rundir": ["start_run", "update_metadata"],
    "src.core.record.checkpoint": ["write_checkpoint", "snapshot"],
    "src.core.commands.session": ["create_run_directory"],
    "os": ["fsync"],
}
METHODS = {
    ("src.core.tracking.metrics", "MetricLogger"): ["__init__", "log", "flush"],
    ("src.core.record.checkpoint", "CheckpointWriter"): ["save", "wait"],
    ("src.core.training.output", "RunOutput"): ["log", "log_figures", "_write_figure", "save_checkpoint", "close"],
    ("src.core.record.environment", "Gathering"): ["result"],
    ("src.core.training.evaluator", "Evaluator"): ["evaluate"],
    ("src.core.training.trainer", "Trainer"): [
        "fit",
        "train_one_epoch",
        "log_training",
        "state_dict",
        "save_checkpoint",
    ],
}


def child(output: str, arguments: list[str]) -> None:
    """Run `run.py ARGUMENTS` in this process with the timers in place; write them as JSON."""
    sys.path.insert(0, os.getcwd())
    import run  # noqa: F401 (imports every module the timers wrap)

    timings = collections.defaultdict(lambda: [0, 0.0, 0.0])  # calls, wall, CPU of the calling thread

    def timed(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                current = threading.current_thread()
                thread = "training" if current is threading.main_thread() else current.name
                entry = timings[f"{name} ({thread} thread)"]
                entry[0] += 1
                entry[1] += time.perf_counter() - wall
                entry[2] += time.thread_time() - cpu

        return wrapper

    wrapped = {}
    for module_name, names in FUNCTIONS.items():
        for name in names:
            original = getattr(sys.modules[module_name], name)
            wrapped[original] = timed(f"{module_name.removeprefix('src.core.')}.{name}", original)
    for module in list(sys.modules.values()):  # also where `from x import f` copied a function
        if module is not None and ((module.__name__.startswith("src.") or module.__name__ == "run") or module is os):
            for attribute, value in list(vars(module).items()):
                if callable(value) and not isinstance(value, type) and value in wrapped:
                    setattr(module, attribute, wrapped[value])
    for (module_name, class_name), names in METHODS.items():
        cls = getattr(sys.modules[module_name], class_name)
        for name in names:
            setattr(cls, name, timed(f"{class_name}.{name}", getattr(cls, name)))
    started = time.perf_counter()
    try:
        sys.modules["run"].main(arguments)
    finally:
        timings["run.main (training thread)"] = [1, time.perf_counter() - started, 0.0]
        Path(output).write_text(json.dumps(timings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import classifier_overhead
    from common import ALLOCATOR

    with tempfile.TemporaryDirectory(prefix="profile-") as scratch:
        project = classifier_overhead.prepare(Path(scratch))
        environment = {**os.environ, **ALLOCATOR, **classifier_overhead.ONE_THREAD}
        sides = {"logged": ["classifier.yaml", "--cpu"], "--no-logging": ["classifier.yaml", "--cpu", "--no-logging"]}
        results = {side: [] for side in sides}
        for _ in range(args.repetitions):  # alternating
            for side, arguments in sides.items():
                output = Path(scratch) / "timings.json"
                command = [sys.executable, __file__, "--child", str(output), *arguments]
                subprocess.run(command, cwd=project, env=environment, check=True, capture_output=True)
                results[side].append(json.loads(output.read_text()))
    for side, runs in results.items():
        print(f"\n{side} (median of {len(runs)}): calls, wall s, CPU s")
        names = set().union(*runs)
        rows = [(statistics.median(r.get(n, [0, 0, 0])[1] for r in runs), n) for n in names]
        for wall, name in sorted(rows, reverse=True):
            calls = runs[0].get(name, [0])[0]
            cpu = statistics.median(r.get(name, [0, 0, 0])[2] for r in runs)
            print(f"  {name:58s} {calls:5d} {wall:8.3f} {cpu:8.3f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3:])
    else:
        main()
