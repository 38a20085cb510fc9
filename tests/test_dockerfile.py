"""The Dockerfile cannot be built here (no Docker engine): check what it says, and run the
commit-by-environment path it relies on, in a copy of the project without .git."""

import os
import re
import shutil
import subprocess
import sys

import yaml
from helpers import REPO, project_files

from src.core.record.git import COMMIT_ENV_VARIABLE

DOCKERFILE = (REPO / "Dockerfile").read_text()
IGNORED = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def test_image_is_python_311_slim_with_the_pinned_requirements():
    steps = instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert ("COPY", "requirements.txt ./") in steps
    installs = [arg for op, arg in steps if op == "RUN" and "pip install" in arg]
    assert installs == ["pip install --no-cache-dir -r requirements.txt"]
    assert steps.index(("COPY", "requirements.txt ./")) < [op for op, _ in steps].index("RUN", 2)


def test_commit_variable_is_the_one_the_gate_reads():
    assert ("ENV", f"{COMMIT_ENV_VARIABLE}=${{GIT_COMMIT}}") in instructions()
    assert ("ENTRYPOINT", '["python", "run.py"]') in instructions()


def _pattern(pattern: str) -> re.Pattern:
    """Docker's rules: `*` stays within one path element, `**` spans any number."""
    regex = re.escape(pattern.strip("/")).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    return re.compile(regex)


def excluded(path: str) -> bool:
    """Whether .dockerignore leaves `path` out: the last pattern matching it or a parent wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in IGNORED:
        negated = pattern.startswith("!")
        if any(_pattern(pattern.lstrip("!")).fullmatch(prefix) for prefix in prefixes):
            verdict = not negated
    return verdict


def test_build_context_leaves_out_history_environments_results_and_data():
    for path in (".git/HEAD", ".venv/bin/python", "logs/x/config.yaml", "data/pendulum/train/t.npy"):
        assert excluded(path), path
    for path in project_files():
        assert not excluded(path), f"{path} would be missing from the image"


def image_copy(tmp_path):
    """The files `COPY . .` puts in the image, with the example data mounted beside them."""
    root = tmp_path / "image" / "project"
    for name in project_files():
        if not excluded(name):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "data" / "pendulum", root / "data" / "pendulum")
    return root


def run_in_image(root, commit: str | None):
    env = {key: value for key, value in os.environ.items() if key != COMMIT_ENV_VARIABLE}
    if commit:
        env[COMMIT_ENV_VARIABLE] = commit
    return subprocess.run(
        [sys.executable, "run.py", "sample_runconfig.yaml", "--mini", "--epochs=1"],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
    )


def test_a_run_in_the_image_records_the_commit_it_was_built_from(tmp_path):
    root = image_copy(tmp_path)
    refused = run_in_image(root, commit=None)
    assert refused.returncode == 3 and "not inside a git repository" in refused.stderr
    assert COMMIT_ENV_VARIABLE in refused.stderr

    commit = "0123456789abcdef0123456789abcdef01234567"
    result = run_in_image(root, commit)
    assert result.returncode == 0, result.stderr
    (config_file,) = (root / "logs").glob("*/*/config.yaml")
    git = yaml.safe_load(config_file.read_text())["git"]
    assert git["commit"] == commit and git["source"].startswith("environment variable PROVENANCE_GIT_COMMIT")
