"""Names in a config resolve by lookup only; arguments are checked before anything runs."""

import pytest
import torch
import torch.nn.functional as F
from helpers import MINIMAL

from src.core.base import BaseDataset, BaseModel
from src.core.config import finalize, parse_yaml
from src.core.errors import UserError
from src.core.resolve import build_datasets, build_model, check_config_names, resolve_class, resolve_loss_function
from src.core.template_schema import project_schema
from src.data_loader import PendulumSteps
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
        assert "is not a name" in message_of(check_config_names, config)
    assert not marker.exists()


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
