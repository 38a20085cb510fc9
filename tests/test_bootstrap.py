"""bootstrap_model_file: initial weights found from the project root, fingerprinted in config.yaml,
checked by --resume and --reproduce, selected inside larger checkpoints, loaded with weights_only."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import MINIMAL, QUICK_RUN, logged_values, run_directory

from src.core.config.loader import parse_yaml
from src.core.config.schema import project_schema
from src.core.config.validation import finalize
from src.core.errors import UserError
from src.core.record.bootstrap import bootstrap_model, bootstrap_path, file_sha256
from src.core.record.git import PROJECT_ROOT
from src.model import PendulumModel

SCHEMA = project_schema()


def config_for(path, **keys):
    extra = "".join(f"{key}: {value!r}\n" for key, value in {"bootstrap_model_file": str(path), **keys}.items())
    return finalize(parse_yaml(MINIMAL + extra, "test"), SCHEMA)


def trained_weights() -> dict:
    torch.manual_seed(1)
    return PendulumModel().state_dict()


def loaded(path, **keys) -> dict:
    model = PendulumModel()
    bootstrap_model(model, config_for(path, **keys))
    return model.state_dict()


def message_of(path, **keys) -> str:
    with pytest.raises(UserError) as caught:
        loaded(path, **keys)
    return str(caught.value)


def test_relative_paths_start_at_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bootstrap_path("logs/p/r/checkpoints/best.pt") == PROJECT_ROOT / "logs/p/r/checkpoints/best.pt"
    assert bootstrap_path(str(tmp_path / "w.pt")) == tmp_path / "w.pt"


def test_a_state_dict_under_a_key_with_a_prefix_loads(tmp_path):
    weights = trained_weights()
    # The original template's checkpoints, saved from a DDP-wrapped model: {"state_dict": {"module.x": ...}}
    original = {"epoch": 3, "state_dict": {f"module.{name}": value for name, value in weights.items()}}
    torch.save(original, tmp_path / "original.pt")
    state = loaded(tmp_path / "original.pt", bootstrap_model_key="state_dict", bootstrap_model_prefix="module.")
    assert all(torch.equal(state[name], weights[name]) for name in weights)
    torch.save({"model": weights, "optimizer": {}}, tmp_path / "nested.pt")  # a dotted key reaches deeper
    torch.save({"checkpoint": {"model": weights}}, tmp_path / "deeper.pt")
    deeper = loaded(tmp_path / "deeper.pt", bootstrap_model_key="checkpoint.model")
    assert all(torch.equal(deeper[name], weights[name]) for name in weights)
    bare = loaded(tmp_path / "nested.pt")  # without a key: the `model` entry, as this template saves it
    assert all(torch.equal(bare[name], weights[name]) for name in weights)


def test_what_does_not_fit_is_one_clear_error(tmp_path):
    weights = trained_weights()
    torch.save({"epoch": 3, "state_dict": weights}, tmp_path / "keyed.pt")
    unkeyed = message_of(tmp_path / "keyed.pt")
    assert "holds no state dict" in unkeyed and "found: 'epoch', 'state_dict'" in unkeyed
    wrong_key = message_of(tmp_path / "keyed.pt", bootstrap_model_key="model")
    assert "has no entry 'model'" in wrong_key and "found: 'epoch', 'state_dict'" in wrong_key
    prefix = message_of(tmp_path / "keyed.pt", bootstrap_model_key="state_dict", bootstrap_model_prefix="module.")
    assert "no parameter name" in prefix and "starts with 'module.'" in prefix
    torch.save({f"module.{name}": value for name, value in weights.items()}, tmp_path / "ddp.pt")
    unfit = message_of(tmp_path / "ddp.pt")
    assert "do not fit PendulumModel" in unfit and "bootstrap_model_prefix" in unfit
    assert "is not a file" in message_of(tmp_path / "missing.pt")


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_with_code_in_it_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": RunsCode(marker)}, tmp_path / "evil.pt")
    assert "cannot be loaded safely (weights_only=True)" in message_of(tmp_path / "evil.pt")
    assert not marker.exists()


def validation_losses(run) -> list[float]:
    return [value for _, _, phase, name, value in logged_values(run) if (phase, name) == ("val", "loss")]


def test_a_run_bootstrapped_through_a_relative_path_records_it_and_reproduces_bitwise(project):
    assert project.run(*QUICK_RUN, "--epochs=1", "--run_name=source").returncode == 0
    source = run_directory(project, "source")
    weights = "logs/PendulumModel/source/checkpoints/best.pt"
    # Started from a subdirectory: the relative path still starts at the project root.
    child_run = [sys.executable, "../run.py", "../sample_runconfig.yaml", *QUICK_RUN[1:], "--epochs=1"]
    child_run += [f"--bootstrap_model_file={weights}", "--evaluate_before_training=true", "--run_name=child"]
    started = subprocess.run(child_run, cwd=project.root / "src", capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr
    child = run_directory(project, "child")
    recorded = yaml.safe_load((child / "config.yaml").read_text())
    best = (project.root / weights).resolve()
    assert recorded["bootstrap"] == {"path": str(best), "sha256": file_sha256(best)}
    assert recorded["bootstrap_model_file"] == weights  # the config as given
    # The child starts from the source's best weights: its untrained validation is the source's last.
    assert validation_losses(child)[0] == validation_losses(source)[-1]

    reproduced = project.run("--reproduce", str(child))
    assert reproduced.returncode == 0, reproduced.stdout + reproduced.stderr
    assert "identical (bitwise)" in reproduced.stdout

    best.unlink()  # best.pt is a hard link: replace it, leaving the step checkpoint as it was
    torch.save({"model": trained_weights()}, best)
    for command in (("--reproduce", str(child)), ("--resume", str(child), "--epochs=2")):
        refused = project.run(*command)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "file changed since" in refused.stderr and "Traceback" not in refused.stderr
    assert len(list((child / "reproductions").iterdir())) == 1  # the refused reproduction made nothing
