"""Names in a config resolve by lookup only; arguments are checked before anything runs."""

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import DATA, MINIMAL

from src.core.base import BaseDataset, BaseModel
from src.core.config.loader import parse_yaml
from src.core.config.schema import project_schema
from src.core.config.validation import finalize
from src.core.errors import UserError
from src.core.training.build import (
    build_datasets,
    build_model,
    check_config_names,
    resolve_class,
    resolve_loss_function,
)
from src.data_loader import PendulumSteps, PendulumTrajectories
from src.model import PendulumModel, loss_function_example

SCHEMA = project_schema()


def config_with(extra: str):
    return finalize(parse_yaml(MINIMAL + extra, "test"), SCHEMA)


def message_of(function, *args) -> str:
    with pytest.raises(UserError) as caught:
        function(*args)
    return str(caught.value)


def test_loss_function_namespaces_and_user_functions():
    assert resolve_loss_function("F.mse_loss") is F.mse_loss
    assert resolve_loss_function("torch.nn.functional.l1_loss") is F.l1_loss
    assert isinstance(resolve_loss_function("nn.SmoothL1Loss"), torch.nn.SmoothL1Loss)
    assert resolve_loss_function("loss_function_example") is loss_function_example


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("F.mse_los", "did you mean 'F.mse_loss'"),
        ("np.mean", "unknown namespace 'np'"),
        ("torch.os.system", "'torch.os.system' is not a loss function"),
        ("torch.save", "'torch.save' is not a loss function"),  # in torch, but not a loss
        ("torch.hub.load", "is not a loss function"),
        ("PendulumModel", "is not a loss function"),  # a model, not a loss
        ("nn.Linear", "an nn.Module but not a loss"),
        ("nn.Module", "an nn.Module but not a loss"),  # the base class: calling it raises NotImplementedError
        ("nn.Sequential", "an nn.Module but not a loss"),  # a container
        ("nn.ModuleList", "an nn.Module but not a loss"),
        ("nn.TripletMarginLoss", "forward does not take (prediction, target)"),  # three tensors
        ("F.relu", "a torch function but not a loss"),  # binds two arguments (input, inplace)
        ("F.gaussian_nll_loss", "cannot be called as loss(prediction, target)"),
        ("nn.init.normal_", "a torch function but not a loss"),
        ("loss_function_exampel", "did you mean 'loss_function_example'"),
        ("F._reduction", "is not a name"),
    ],
)
def test_bad_loss_names(name, expected):
    assert expected in message_of(resolve_loss_function, name)


@pytest.mark.parametrize(
    "code",
    [
        "__import__('os').system('touch {marker}')",
        "F.mse_loss; import os",
        "(lambda: 0)()",
        "eval('1')",
    ],
)
def test_code_in_a_name_is_rejected_and_never_run(tmp_path, code):
    marker = tmp_path / "ran"
    code = code.format(marker=marker)
    for key in ("loss_function", "model_type", "train_data_loader_type"):
        config = finalize({**parse_yaml(MINIMAL, "t"), key: code}, SCHEMA)
        message = message_of(check_config_names, config)
        # `eval('1')` has the form of a loss call with a literal argument: refused as no loss of torch or yours
        assert "is not a name" in message or (key == "loss_function" and "not a loss function (not found)" in message)
    assert not marker.exists()


def test_the_original_templates_loss_calls_are_parsed_with_their_literal_arguments():
    assert isinstance(resolve_loss_function("torch.nn.MSELoss()"), torch.nn.MSELoss)
    assert resolve_loss_function('nn.CrossEntropyLoss(reduction="sum")').reduction == "sum"
    huber = resolve_loss_function("nn.HuberLoss('none', 0.5)")  # positional, as the class takes them
    assert (huber.reduction, huber.delta) == ("none", 0.5)
    weighted = resolve_loss_function("nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=-1)")
    assert (weighted.label_smoothing, weighted.ignore_index) == (0.1, -1)
    smooth = resolve_loss_function("F.smooth_l1_loss(beta=0.5)")  # a function: its settings fixed
    prediction, target = torch.zeros(3), torch.tensor([0.2, 1.0, 3.0])
    assert torch.equal(smooth(prediction, target), F.smooth_l1_loss(prediction, target, beta=0.5))
    assert resolve_loss_function("F.mse_loss()") is F.mse_loss


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("torch.nn.MSELoss(__import__('os').system('touch {marker}'))", "argument 1 is not a literal"),
        ("nn.MSELoss(reduction=__import__('os').system('touch {marker}'))", "argument 'reduction' is not a literal"),
        ("nn.MSELoss(*__import__('os').system('touch {marker}'))", "argument 1 is not a literal"),
        ("nn.MSELoss(**{{'reduction': 'sum'}})", "unpacks a mapping"),
        ("nn.MSELoss(reduction={{'sum'}})", "argument 'reduction' is not a literal"),  # a set
        ("nn.MSELoss()()", "is not a name"),
        ("nn.MSELoss(bogus=1)", "nn.MSELoss(bogus=1) cannot be built: TypeError"),
        ("F.mse_loss(1)", "gives a function positional arguments"),
        ("F.mse_loss(bogus=1)", "unexpected keyword argument 'bogus'"),
        ("nn._Loss()", "is not a name"),
    ],
)
def test_loss_calls_with_anything_but_literals_are_refused_and_never_run(tmp_path, text, expected):
    marker = tmp_path / "ran"
    assert expected in message_of(resolve_loss_function, text.format(marker=marker))
    assert not marker.exists()


def test_a_config_in_the_original_templates_form_trains_and_a_loss_with_code_runs_nothing(project):
    original = {"ngpus_per_node": 1, "num_nodes": 1, "node_idx": 0, "backend": "gloo", "url": "tcp://127.0.0.1:1"}
    project.write_config("original.yaml", loss_function="torch.nn.MSELoss()", multigpu_parameters=original)
    project.write_config("unsafe.yaml", loss_function="torch.nn.MSELoss(__import__('os').system('touch MARKER'))")
    project.commit("configs in the original template's form")
    shown = project.run("original.yaml", "--print-config")
    assert shown.returncode == 0, shown.stderr
    printed = yaml.safe_load(shown.stdout)  # the mapped values, and the original section as given
    assert printed["distributed"]["backend"] == "gloo" and printed["distributed"]["rdzv_endpoint"] == "127.0.0.1:1"
    assert printed["multigpu_parameters"] == original
    result = project.run("original.yaml", "--mini", "--cpu", "--epochs=1", "--batch_size=50", "--run_name=original")
    assert result.returncode == 0, result.stderr
    assert (project.root / "logs/PendulumModel/original/checkpoints/last.pt").exists()
    refused = project.run("unsafe.yaml", "--mini", "--cpu", "--epochs=1")
    assert refused.returncode == 2 and "argument 1 is not a literal" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (project.root / "MARKER").exists()
    assert project.run_directories() == [project.root / "logs/PendulumModel/original"]  # nothing else written


def test_classes_resolve_in_the_users_files():
    assert resolve_class("model_type", "PendulumModel", "src.model", BaseModel) is PendulumModel
    assert resolve_class("t", "PendulumSteps", "src.data_loader", BaseDataset) is PendulumSteps
    message = message_of(resolve_class, "model_type", "PendulumModle", "src.model", BaseModel)
    assert "did you mean 'PendulumModel'" in message and "src/model.py" in message
    message = message_of(resolve_class, "model_type", "BaseDataset", "src.model", BaseModel)
    assert "is not a BaseModel class" in message  # imported names that are not models do not count


def test_model_parameters_are_checked_against_the_constructor():
    message = message_of(check_config_names, config_with("model_parameters: {hiden_size: 3}\n"))
    assert "'model_parameters.hiden_size'" in message and "did you mean 'hidden_size'" in message
    assert "its parameters: hidden_size, num_layers" in message


def test_dataset_parameters_are_checked_per_phase():
    message = message_of(check_config_names, config_with("data_loader_parameters: {train: {input_nois: 0.1}}\n"))
    assert "data_loader_parameters.train.input_nois" in message and "did you mean 'input_noise'" in message
    check_config_names(config_with("data_loader_parameters: {all: {input_noise: 0.1}}\n"))


def test_unknown_optimizer():
    message = message_of(check_config_names, config_with("optimizer: {type: SGDD}\n"))
    assert "'SGDD' is not an optimizer in torch.optim; did you mean 'SGD'?" in message


def test_optimizer_must_be_an_optimizer_that_takes_the_parameters():
    message = message_of(check_config_names, config_with("optimizer: {type: lr_scheduler}\n"))
    assert "'lr_scheduler' is not an optimizer in torch.optim" in message and "AdamW" in message
    message = message_of(check_config_names, config_with("optimizer: {type: AdamW, parameters: {momentum: 0.9}}\n"))
    assert "'optimizer.parameters.momentum': AdamW has no parameter 'momentum'" in message
    check_config_names(config_with("optimizer: {type: SGD, parameters: {momentum: 0.9, nesterov: true}}\n"))


def test_checkpoint_monitor_must_be_a_logged_metric():
    message = message_of(check_config_names, config_with("checkpoint: {monitor: val/los}\n"))
    assert "'val/los' is not a metric this run logs" in message
    check_config_names(config_with("checkpoint: {monitor: train/epoch_loss, mode: max}\n"))


# --- the kind of a resolved name, and errors while building the user's classes -------------


def test_the_base_classes_themselves_are_refused():
    for extra, key in (("model_type: BaseModel\n", "'model_type'"), ("test_data_loader_type: BaseDataset\n", "")):
        config = finalize({**parse_yaml(MINIMAL, "t"), **parse_yaml(extra, "t")}, SCHEMA)
        message = message_of(check_config_names, config)
        assert "is the base class itself; expected a subclass of it" in message and key in message


def test_mini_reaches_a_constructor_that_asks_for_it_before_it_loads(monkeypatch):
    import src.data_loader

    seen = []

    class Large(PendulumSteps):
        def __init__(self, data_directory, split, mini: bool = False):
            seen.append(mini)
            super().__init__(data_directory, split, mini=mini)

    monkeypatch.setattr(src.data_loader, "Large", Large, raising=False)
    config = finalize({**parse_yaml(MINIMAL, "t"), "train_data_loader_type": "Large"}, SCHEMA)
    check_config_names(config)
    (_, dataset), *_ = build_datasets(config, str(DATA), mini=True).values()
    assert seen == [True] and len(dataset) == 100
    build_datasets(config, str(DATA), mini=False)
    assert seen == [True, False]
    # `mini` is the flag's to set, not the config's
    setting = {**config.to_dict(), "data_loader_parameters": {"all": {"mini": True}}}
    assert "has no parameter 'mini'" in message_of(check_config_names, finalize(setting, SCHEMA))


@pytest.mark.parametrize("dataset_class", [PendulumSteps, PendulumTrajectories])
def test_the_examples_load_only_what_mini_keeps_and_keep_the_same_items(dataset_class):
    full, small = dataset_class(str(DATA), "train"), dataset_class(str(DATA), "train", mini=True)
    assert len(small) < len(full)
    kept, expected = small.mini_subset(), full.mini_subset()
    assert len(kept) == len(expected) == 100
    for index in range(100):  # --mini trains on exactly the items it trained on before
        assert all(torch.equal(kept[index][key], expected[index][key]) for key in expected[index])


def test_a_dataset_needs_len_and_getitem(monkeypatch):
    import src.data_loader

    class Sizeless(BaseDataset):
        def __getitem__(self, index):
            return {}

    monkeypatch.setattr(src.data_loader, "Sizeless", Sizeless, raising=False)
    config = finalize({**parse_yaml(MINIMAL, "t"), "train_data_loader_type": "Sizeless"}, SCHEMA)
    message = message_of(check_config_names, config)
    assert "'train_data_loader_type': Sizeless does not define __len__" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("big", "PendulumModel(hidden_size='big') failed: TypeError"),
        ("[1]", "PendulumModel(hidden_size=[1]) failed: TypeError"),
        ("1000000000000", "failed (is a size in it too large for memory?): RuntimeError"),  # 8 TB of weights
        ("-3", "failed: RuntimeError: Trying to create tensor with negative dimension"),
    ],
)
def test_constructor_errors_name_the_config_key(value, expected):
    config = config_with(f"model_parameters: {{hidden_size: {value}}}\n")
    message = message_of(build_model, config)
    assert message.startswith("config key 'model_parameters': ") and expected in message
    assert "(raised at model.py:" in message


def test_dataset_constructor_errors_name_the_phase(monkeypatch, tmp_path):
    import src.data_loader

    class Picky(BaseDataset):
        def __init__(self, data_directory, split, window: int = 1):
            super().__init__(data_directory, split)
            if window < 1:
                raise ValueError(f"window must be at least 1, got {window}")

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return {}

    monkeypatch.setattr(src.data_loader, "Picky", Picky, raising=False)
    config = config_with("data_loader_parameters: {train: {window: 0}}\n")
    config = finalize({**config.to_dict(), "train_data_loader_type": "Picky"}, SCHEMA)
    message = message_of(build_datasets, config, str(tmp_path), False)
    assert "config key 'data_loader_parameters.train': Picky(window=0) failed: ValueError: window must be" in message
