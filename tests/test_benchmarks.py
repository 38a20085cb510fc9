"""The benchmarks stay runnable: each script imports as `make bench` and its own command start
it (python benchmarks/NAME.py), in a fresh interpreter, so that a helper moved in tests/ or
src/ cannot break them unseen (their measurements themselves are not tests)."""

import subprocess
import sys

from helpers import REPO

# Not importable here by design: the plain classifier imports the classes the benchmark writes
# into a clone of the project; Lightning's loop runs in the benchmarks' own environment.
ELSEWHERE = {"plain_classifier", "lightning_loop"}


def test_every_benchmark_script_imports_as_its_command_starts_it():
    names = sorted(path.stem for path in (REPO / "benchmarks").glob("*.py") if path.stem not in ELSEWHERE)
    assert "run_all" in names and "fixed_costs" in names
    imports = "; ".join(f"import {name}" for name in names)  # one interpreter: torch is imported once
    result = subprocess.run([sys.executable, "-c", imports], cwd=REPO / "benchmarks", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
