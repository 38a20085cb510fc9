"""Shared by the benchmarks: side-by-side timing of whole processes, and a scratch project.

Every figure is a ratio of two things measured in one invocation, alternating A and B
over several repetitions, so that a noisy machine slows both alike. We report the
median ratio and its spread (min and max over the repetitions).

Every process runs with the same fixed glibc malloc thresholds (ALLOCATOR below). By
default glibc raises its mmap threshold after the first large free, so how often a
process page-faults on new tensors depends on what it happened to allocate and free
before training: we measured the logged Trainer 25% *faster* than the plain loop on
the large model for that reason alone (0.4M page faults against 2.3M). Fixed
thresholds make both sides allocate alike, so the ratios measure the code.
"""

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(256 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(512 * 2**20)}


@dataclass
class Measurement:
    seconds: float
    max_rss_mib: float
    stdout: str
    cpu_seconds: float  # user + system, the process and the children it waited for


def measure(command: list[str], cwd: Path, env: dict | None = None) -> Measurement:
    """Wall time, CPU time and peak resident memory of one process (os.wait4 gives that child's own rusage)."""
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=cwd, env={**os.environ, **ALLOCATOR, **(env or {})}, stdout=stdout, stderr=stderr
        )
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read().decode(), stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({os.waitstatus_to_exitcode(status)}):\n{errors[-3000:]}")
    return Measurement(seconds, usage.ru_maxrss / 1024, output, usage.ru_utime + usage.ru_stime)


def epoch_seconds(stdout: str) -> float:
    """The sum of the "(1.23 s)" epoch durations both the Trainer and the plain loop print."""
    return sum(float(match) for match in re.findall(r"^epoch .*\((\d+(?:\.\d+)?) s\)", stdout, re.MULTILINE))


@dataclass
class Comparison:
    name: str
    a: list[float]
    b: list[float]
    unit: str = "s"

    @property
    def ratios(self) -> list[float]:
        return [x / y for x, y in zip(self.a, self.b, strict=True)]

    def row(self) -> str:
        ratios, unit = self.ratios, self.unit
        a, b = statistics.median(self.a), statistics.median(self.b)
        return (
            f"| {self.name} | {a:.3f} {unit} | {b:.3f} {unit} "
            f"| **{statistics.median(ratios):.3f}×** | {min(ratios):.3f}–{max(ratios):.3f} |"
        )


def alternate(name: str, run_a, run_b, repetitions: int, unit: str = "s") -> Comparison:
    """Run A then B, `repetitions` times; the first pair warms caches and is discarded."""
    run_a(), run_b()
    a, b = [], []
    for _ in range(repetitions):
        a.append(run_a())
        b.append(run_b())
    return Comparison(name, a, b, unit)


def scratch_project(parent: Path) -> Path:
    """A copy of this checkout (tracked and untracked, not ignored) committed into a fresh
    git repository, so that logged runs pass the gate whatever state the checkout is in."""
    root = parent / "project"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "bench"}
    env["GIT_COMMITTER_EMAIL"] = "b@x"
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "bench"]):
        subprocess.run(["git", *args], cwd=root, check=True, env=env)
    return root


def python() -> str:
    return sys.executable


def in_process_trainer(config_text: str, run_directory: Path | None, mini: bool, show_progress: bool = False):
    """A Trainer built from YAML text as run.py builds one, logging into `run_directory` (None:
    nothing), for benchmarks that time its parts (their modules put the project on sys.path,
    as every benchmark that imports src does)."""
    import torch

    from src.core.config.loader import parse_yaml
    from src.core.config.schema import project_schema
    from src.core.config.validation import finalize
    from src.core.distributed import DistContext
    from src.core.training.build import Task, build_datasets, build_model, resolve_loss_function
    from src.core.training.console import Console
    from src.core.training.output import NullOutput, RunOutput
    from src.core.training.start import FRESH
    from src.core.training.trainer import build_trainer

    config = finalize(parse_yaml(config_text, "benchmark"), project_schema())
    torch.manual_seed(0)
    model = build_model(config)
    task = Task(model, resolve_loss_function(config.loss_function), build_datasets(config, config.data_directory, mini))
    if run_directory is None:
        output = NullOutput(Console(progress_bar=show_progress))
    else:
        output = RunOutput.open(run_directory, config, FRESH.log_position, {"commit": None, "config_hash": None}, {})
        output.console = Console(progress_bar=show_progress)
    return build_trainer(config, task, DistContext(), output)
