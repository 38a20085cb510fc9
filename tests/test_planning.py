"""The plan of a run: its config is read and validated once per process."""

import json
import sys

import pytest

# Runs run.main(argv) in this process while counting, by a profile hook (no patching), the
# calls of the functions that read a config file and of the one that validates a config.
COUNTING = """
import json, sys
import run
from src.core.config import loader, validation
from src.core.record import rundir
watched = {
    loader.read_config_file.__code__: "read",  # a config file given on the command line
    rundir.read_run_files.__code__: "read",  # a run's config.yaml (--resume)
    validation.validate.__code__: "validate",
}
counts = {"read": 0, "validate": 0}
def profile(frame, event, arg):
    if event == "call" and frame.f_code in watched:
        counts[watched[frame.f_code]] += 1
sys.setprofile(profile)
status = run.main(sys.argv[1:])
sys.setprofile(None)
print("COUNTS " + json.dumps(counts))
sys.exit(status)
"""


def counted(project, *args: str) -> dict:
    result = project.python("-c", COUNTING, *args)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("COUNTS "))
    return json.loads(line.removeprefix("COUNTS "))


@pytest.mark.check
def test_a_new_run_and_its_resume_each_read_and_validate_the_config_once(project):
    quick = ("sample_runconfig.yaml", "--mini", "--cpu", "--epochs=1", "--batch_size=50", "--run_name=once")
    assert counted(project, *quick) == {"read": 1, "validate": 1}
    run = project.root / "logs" / "PendulumModel" / "once"
    assert counted(project, "--resume", str(run), "--epochs=2") == {"read": 1, "validate": 1}


def test_the_counter_sees_every_read(project):
    """The check above could not pass by counting nothing: --print-config of a sweep of two
    reads once and validates each member."""
    (project.root / "sweep.yaml").write_text(
        (project.root / "sample_runconfig.yaml").read_text() + "sweep: {seed: [1, 2]}\n"
    )
    project.commit("a sweep")
    assert counted(project, "sweep.yaml", "--print-config") == {"read": 1, "validate": 2}
    assert sys.executable
