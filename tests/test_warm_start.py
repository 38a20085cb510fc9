"""The tests' warm start (tests/warm_start.py) runs a command as a cold `python run.py` does."""

import os
import subprocess
import sys

import warm_start


def test_a_warm_command_prints_and_exits_as_the_cold_one(project):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    for argv in (["run.py", "sample_runconfig.yaml", "--print-config"], ["run.py", "--no-such-flag"]):
        warm = warm_start.run(argv, str(project.root), env, timeout=120)
        cold = subprocess.run([sys.executable, *argv], cwd=project.root, env=env, capture_output=True, text=True)
        assert warm is not None and (warm.returncode, warm.stdout, warm.stderr) == (
            cold.returncode,
            cold.stdout,
            cold.stderr,
        )
    assert cold.returncode == 2 and "unknown flag '--no-such-flag'" in cold.stderr
