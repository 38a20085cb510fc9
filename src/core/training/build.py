"""Build your objects from a config: the names in it are looked up, never evaluated.

`model_type` names a class in `src/model.py`, the `*_data_loader_type` keys name
classes in `src/data_loader.py`, and `loss_function` names a function:
`F.mse_loss` (torch.nn.functional), `nn.MSELoss` (torch.nn, instantiated; the original
template's `torch.nn.MSELoss()` and `nn.CrossEntropyLoss(reduction="mean")` are parsed
with `ast`, literal arguments only), or a function defined in `src/model.py` or
`src/data_loader.py`. Keyword arguments from the config are checked against the
constructors before anything runs.
"""

import ast
import functools
import importlib
import inspect
import reprlib
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch.utils.data import Dataset

from src.core.base import BaseDataset, BaseModel
from src.core.config.validation import Config
from src.core.errors import UserError, nearest
from src.core.phases import BUILT_IN_METRICS, EVALUATION_PHASES, PHASES, Phase
from src.core.record.bootstrap import bootstrap_model
from src.core.seeding import apply_torch_threads, configure_determinism, derive_seed, seed_everything

LOSS_NAMESPACES = {"F": "torch.nn.functional", "nn": "torch.nn", "torch": "torch"}
USER_MODULES = ("src.model", "src.data_loader")


def _public_names(module: ModuleType, keep: Callable[[object], bool]) -> list[str]:
    return [name for name, value in vars(module).items() if not name.startswith("_") and keep(value)]


def _check_name(key: str, name: str) -> list[str]:
    """Split a dotted name, accepting only plain public identifiers (so no code can hide in it)."""
    parts = name.split(".") if isinstance(name, str) else []
    if not parts or not all(part.isidentifier() and not part.startswith("_") for part in parts):
        raise UserError(
            f"config key {key!r}: {name!r} is not a name; expected the name of a "
            "class or function, such as 'PendulumModel' or 'F.mse_loss' (config values are "
            "looked up, never evaluated)"
        )
    return parts


def resolve_class(key: str, name: str, module_name: str, base: type) -> type:
    """The class called `name` in `module_name`, which must subclass `base`."""
    parts = _check_name(key, name)
    if len(parts) != 1:
        raise UserError(f"config key {key!r}: {name!r} should be a plain class name, without dots")
    class_name = parts[0]
    module = importlib.import_module(module_name)
    value = getattr(module, class_name, None)
    if value is base:
        raise UserError(
            f"config key {key!r}: {name!r} is the base class itself; expected a subclass of it, "
            f"defined in {module_name.replace('.', '/')}.py"
        )
    if not (inspect.isclass(value) and issubclass(value, base)):
        choices = _public_names(module, lambda v: inspect.isclass(v) and issubclass(v, base) and v is not base)
        raise UserError(
            f"config key {key!r}: {name!r} is not a {base.__name__} class in "
            f"{module_name.replace('.', '/')}.py" + nearest(name, choices) + f" (found: {', '.join(choices)})"
        )
    return value


def _lookup_within(module: ModuleType, parts: list[str]) -> object:
    """getattr along `parts`, never leaving the module's package (so `torch.os.system` is not found)."""
    package = module.__name__.split(".")[0]
    value = module
    for part in parts:
        if inspect.ismodule(value) and not value.__name__.startswith(package):
            return None
        value = getattr(value, part, None)
    defined_in = getattr(value, "__module__", None) or ""
    return value if defined_in.startswith(package) and not inspect.ismodule(value) else None


def _takes_two_tensors(function: Callable, bound_self: bool = False) -> bool:
    """Whether `function(prediction, target)` binds (`self` first for an unbound method)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some builtins have none: give them the benefit of the doubt
        return True
    try:
        signature.bind(*([None] if bound_self else []), None, None)
    except TypeError:
        return False
    return True


def loss_problem(value: object) -> str | None:
    """Why `value` cannot be a loss, or None when it can: a function called as
    `loss(prediction, target)`, or an nn.Module class (not a model) whose instances are.
    In torch that means a loss class (a subclass of torch.nn's `_Loss`) or a function whose
    second parameter is `target`; in your files, anything callable on two tensors."""
    defined_in = getattr(value, "__module__", None) or ""
    in_torch = defined_in.startswith("torch.nn")
    if not (in_torch or defined_in in USER_MODULES):
        return "neither in torch.nn nor in your files"
    if inspect.isclass(value):
        if not issubclass(value, torch.nn.Module) or issubclass(value, BaseModel):
            return "a class that is not a loss module"
        if in_torch and not issubclass(value, torch.nn.modules.loss._Loss):
            return "an nn.Module but not a loss; torch's loss classes, such as nn.MSELoss, derive from its _Loss"
        if value.forward is torch.nn.Module.forward or not _takes_two_tensors(value.forward, bound_self=True):
            return "a module whose forward does not take (prediction, target)"
        return None
    if not (inspect.isfunction(value) or inspect.isbuiltin(value)):
        return "not a function"
    if not _takes_two_tensors(value):
        return "a function that cannot be called as loss(prediction, target)"
    if in_torch:
        parameters = list(inspect.signature(value).parameters)
        if not defined_in.startswith("torch.nn.functional") or parameters[1:2] != ["target"]:
            return "a torch function but not a loss; a loss of torch.nn.functional takes (input, target)"
    return None


LITERALS = (int, float, str, bool, type(None))
CALL_FORM = (
    "expected a name, optionally called with literal arguments, such as 'F.mse_loss', "
    "'torch.nn.MSELoss()' or 'nn.CrossEntropyLoss(reduction=\"mean\")' (config values are parsed, never evaluated)"
)


def _is_literal(value: object) -> bool:
    """Numbers, strings, booleans, None, and tuples or lists of those."""
    if isinstance(value, tuple | list):
        return all(_is_literal(item) for item in value)
    return isinstance(value, LITERALS)


def _literal_argument(text: str, node: ast.AST, which: str) -> object:
    """The value of one argument node, which must be a plain literal (ast.literal_eval: no calls)."""
    try:
        value = None if isinstance(node, ast.Starred) else ast.literal_eval(node)
        literal = not isinstance(node, ast.Starred) and _is_literal(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        literal = False
    if not literal:
        raise UserError(f"config key 'loss_function': in {text!r}, {which} is not a literal; {CALL_FORM}")
    return value


def _dotted_name(node: ast.AST) -> str | None:
    """`torch.nn.MSELoss` from its Name/Attribute nodes; None for any other expression."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def parse_loss_expression(text: str) -> tuple[str, tuple, dict, bool]:
    """The original template's `loss_function: torch.nn.MSELoss()` form, read with `ast` and
    never evaluated: (dotted name, positional arguments, keyword arguments, whether it is a call).
    Only a dotted name, optionally called with literal arguments, is accepted."""
    try:
        node = ast.parse(text.strip(), mode="eval").body if isinstance(text, str) else None
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        node = None
    arguments, keywords, called = (), {}, isinstance(node, ast.Call)
    if called:
        arguments = tuple(
            _literal_argument(text, argument, f"argument {index}") for index, argument in enumerate(node.args, 1)
        )
        for keyword in node.keywords:
            if keyword.arg is None:  # **mapping
                raise UserError(f"config key 'loss_function': {text!r} unpacks a mapping; {CALL_FORM}")
            keywords[keyword.arg] = _literal_argument(text, keyword.value, f"argument {keyword.arg!r}")
        node = node.func
    name = _dotted_name(node) if node is not None else None
    if name is None:
        raise UserError(f"config key 'loss_function': {text!r} is not a name; {CALL_FORM}")
    _check_name("loss_function", name)
    return name, arguments, keywords, called


def _instantiate_loss(text: str, loss_class: type, arguments: tuple, keywords: dict) -> Callable:
    try:
        return loss_class(*arguments, **keywords)
    except (TypeError, ValueError) as error:
        problem = f"{type(error).__name__}: {error}"
        raise UserError(f"config key 'loss_function': {text} cannot be built: {problem}") from None


def _with_keywords(text: str, function: Callable, arguments: tuple, keywords: dict) -> Callable:
    """A loss function with keyword arguments fixed (`F.smooth_l1_loss(beta=0.5)`)."""
    if arguments:
        raise UserError(
            f"config key 'loss_function': {text!r} gives a function positional arguments, but it is called as "
            "loss(prediction, target); name its settings instead, e.g. 'F.smooth_l1_loss(beta=0.5)'"
        )
    if not keywords:
        return function
    try:
        inspect.signature(function).bind(None, None, **keywords)
    except TypeError as error:
        raise UserError(f"config key 'loss_function': {text}: {error}") from None
    except ValueError:  # no signature to check: the call itself will say
        pass
    return functools.partial(function, **keywords)


def resolve_loss_function(text: str) -> Callable:
    """The loss function a config names; a class such as `nn.MSELoss` is instantiated, with the
    literal arguments of `nn.CrossEntropyLoss(reduction="mean")` if the config gives them."""
    name, arguments, keywords, _ = parse_loss_expression(text)
    parts = name.split(".")
    if len(parts) == 1:
        modules = [importlib.import_module(module_name) for module_name in USER_MODULES]
    elif parts[0] in LOSS_NAMESPACES:
        modules = [importlib.import_module(LOSS_NAMESPACES[parts[0]])]
        parts = parts[1:]
    else:
        raise UserError(
            f"config key 'loss_function': {name!r} starts with an unknown namespace "
            f"{parts[0]!r}; expected one of {', '.join(LOSS_NAMESPACES)} or a function in src/model.py"
        )
    problem = "not found"
    for module in modules:
        value = _lookup_within(module, parts)
        if value is None:
            continue
        problem = loss_problem(value)
        if problem is None:
            if inspect.isclass(value):
                return _instantiate_loss(text, value, arguments, keywords)
            return _with_keywords(text, value, arguments, keywords)
    functional = torch.nn.functional
    choices = [f"F.{n}" for n in dir(functional) if not n.startswith("_") and not loss_problem(getattr(functional, n))]
    choices += [n for m in USER_MODULES for n in _public_names(importlib.import_module(m), inspect.isfunction)]
    raise UserError(
        f"config key 'loss_function': {name!r} is not a loss function ({problem}); expected a function of "
        "torch.nn.functional ('F.mse_loss'), a loss class of torch.nn ('nn.MSELoss') or a function "
        "in src/model.py" + nearest(name, choices)
    )


def check_arguments(key: str, cls: type, arguments: Mapping, given_elsewhere: tuple[str, ...] = ()) -> None:
    """Check that `cls(**arguments)` binds, so a typo in a parameter fails before anything runs."""
    signature = inspect.signature(cls)
    accepted = [name for name in signature.parameters if name not in given_elsewhere]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    for name in arguments:
        if name not in accepted and not takes_any:
            raise UserError(
                f"config key '{key}.{name}': {cls.__name__} has no parameter {name!r}"
                + nearest(name, accepted)
                + f" (its parameters: {', '.join(accepted) or 'none'})"
            )
    try:
        signature.bind(**{name: None for name in given_elsewhere}, **arguments)
    except TypeError as error:
        raise UserError(f"config key {key!r}: {cls.__name__}: {error}") from None


def dataset_arguments(config: Config, phase: Phase) -> dict:
    """Keyword arguments for the dataset of `phase`: `all`, then the phase's own."""
    parameters = config.data_loader_parameters
    return {**parameters.all.to_dict(), **parameters[phase.split].to_dict()}


def takes_mini(dataset_class: type) -> bool:
    """Whether the constructor wants to know about --mini before it loads (BaseDataset's docstring)."""
    return "mini" in inspect.signature(dataset_class).parameters


def check_config_names(config: Config) -> None:
    """Resolve every name in the config and check every argument list (builds nothing)."""
    model_class = resolve_class("model_type", config.model_type, "src.model", BaseModel)
    check_arguments("model_parameters", model_class, config.model_parameters)
    resolve_loss_function(config.loss_function)
    for phase in PHASES:
        if config[phase.loader_key] is not None:
            dataset_class = resolve_class(phase.loader_key, config[phase.loader_key], "src.data_loader", BaseDataset)
            check_dataset_methods(phase.loader_key, dataset_class, BaseDataset)
            check_arguments(
                f"data_loader_parameters.{phase.split}",
                dataset_class,
                dataset_arguments(config, phase),
                given_elsewhere=("data_directory", "split", *(["mini"] if takes_mini(dataset_class) else [])),
            )
    check_optimizer(config.optimizer)
    check_monitor(config)


def check_dataset_methods(key: str, dataset_class: type, base: type) -> None:
    """A dataset needs its own `__len__` and `__getitem__` (torch's Dataset only raises in hers)."""
    for method in ("__len__", "__getitem__"):
        inherited = getattr(Dataset, method, None), getattr(base, method, None)
        if getattr(dataset_class, method, None) in (None, *inherited):
            raise UserError(
                f"config key {key!r}: {dataset_class.__name__} does not define {method}; "
                "expected a dataset with __len__ (its size) and __getitem__ (a dict of tensors)"
            )


def check_optimizer(optimizer: Config) -> None:
    """`optimizer.type` must be a torch.optim optimizer that takes `optimizer.parameters`."""
    optimizer_class = getattr(torch.optim, optimizer.type, None) if not optimizer.type.startswith("_") else None
    if not (inspect.isclass(optimizer_class) and issubclass(optimizer_class, torch.optim.Optimizer)):
        choices = [
            name
            for name, value in vars(torch.optim).items()
            if inspect.isclass(value)
            and issubclass(value, torch.optim.Optimizer)
            and value is not torch.optim.Optimizer
        ]
        raise UserError(
            f"config key 'optimizer.type': {optimizer.type!r} is not an optimizer in torch.optim"
            + nearest(optimizer.type, choices)
            + f" (found: {', '.join(sorted(choices))})"
        )
    check_arguments(
        "optimizer.parameters", optimizer_class, optimizer.parameters, given_elsewhere=("params", "lr", "weight_decay")
    )
    # The names bind; the values are checked by building it once over a single parameter
    # (betas: 5 is a TypeError deep inside torch.optim, a negative lr a ValueError).
    construct(
        "optimizer.parameters",
        optimizer_class,
        {"lr": optimizer.lr, "weight_decay": optimizer.weight_decay, **optimizer.parameters.to_dict()},
        (TypeError, ValueError, OverflowError),
        [torch.nn.Parameter(torch.zeros(1))],
    )


def logged_metrics(config: Config) -> list[str]:
    """What a run with this config logs whatever its model: the built-in names (your model's
    metrics and loss terms add theirs, known once they ran; see Evaluator.check_monitor)."""
    phases = [phase.name for phase in EVALUATION_PHASES if config[phase.loader_key]]
    return [*BUILT_IN_METRICS, *(f"{phase}/loss" for phase in phases)]


def check_monitor(config: Config) -> None:
    """A `checkpoint.monitor` that is never logged would silently never pick a best checkpoint.
    Here: its phase must be one this run has; the Trainer checks the name before training."""
    monitor = config.checkpoint.monitor
    if monitor is None or monitor in logged_metrics(config):
        return
    phases = ["train"] + [phase.name for phase in EVALUATION_PHASES if config[phase.loader_key]]
    phase, _, name = monitor.partition("/")
    if phase not in phases or not name:
        names = logged_metrics(config)
        raise UserError(
            f"config key 'checkpoint.monitor': {monitor!r} is not a metric this run logs"
            + nearest(monitor, names)
            + f"; expected '<phase>/<name>' with a phase of this run ({', '.join(phases)}), such as "
            + ", ".join(names)
        )


def _call_text(cls: type, arguments: Mapping) -> str:
    """`PendulumModel(hidden_size='big')`, with long values shortened."""
    shorten = reprlib.Repr()
    shorten.maxstring = shorten.maxother = 40
    return f"{cls.__name__}({', '.join(f'{name}={shorten.repr(value)}' for name, value in arguments.items())})"


def construct(key: str, cls: type, arguments: Mapping, errors: tuple[type[BaseException], ...], *positional):
    """`cls(*positional, **arguments)`; an error of the given kinds, raised while the user's class is
    built from the config, becomes a UserError naming the config key (training errors never pass here)."""
    try:
        return cls(*positional, **arguments)
    except errors as error:
        frames = traceback.extract_tb(error.__traceback__)
        yours = [f for f in frames[1:] if "site-packages" not in f.filename and "/core/" not in f.filename]
        where = (yours or frames)[-1]
        detail = (str(error).strip().splitlines() or [""])[0][:300]
        out_of_memory = isinstance(error, MemoryError) or "allocate" in detail
        hint = " (is a size in it too large for memory?)" if out_of_memory else ""
        if isinstance(error, OSError):  # a file the constructor reads: missing, unreadable
            hint = f" (is data_directory {str(positional[0])[:200]!r} the right directory?)" if positional else ""
        raise UserError(
            f"config key {key!r}: {_call_text(cls, arguments)} failed{hint}: {type(error).__name__}: {detail} "
            f"(raised at {Path(where.filename).name}:{where.lineno}); check the values under {key!r}"
        ) from None


def build_model(config: Config) -> torch.nn.Module:
    model_class = resolve_class("model_type", config.model_type, "src.model", BaseModel)
    return construct(
        "model_parameters",
        model_class,
        config.model_parameters.to_dict(),
        (TypeError, ValueError, OverflowError, RuntimeError, MemoryError),
    )


def build_datasets(config: Config, data_directory: str, mini: bool) -> dict[str, tuple[type, Dataset]]:
    """(class, dataset) of each configured phase, by phase name; `--mini` takes a subset (and
    reaches the constructor first, as `mini=True`, when it has a `mini` parameter)."""
    datasets = {}
    for phase in PHASES:
        if config[phase.loader_key] is None:
            continue
        dataset_class = resolve_class(phase.loader_key, config[phase.loader_key], "src.data_loader", BaseDataset)
        dataset = construct(
            f"data_loader_parameters.{phase.split}",
            dataset_class,
            {**dataset_arguments(config, phase), **({"mini": mini} if takes_mini(dataset_class) else {})},
            (TypeError, ValueError, OverflowError, MemoryError, OSError),
            data_directory,
            phase.split,
        )
        datasets[phase.name] = (dataset_class, dataset.mini_subset() if mini else dataset)
    return datasets


@dataclass
class Task:
    """What your files give a run: the model, its loss function and its datasets by phase
    (each a (class, dataset) pair: the class batches it, see BaseDataset.get_dataloader)."""

    model: BaseModel
    loss_function: Callable
    datasets: dict[str, tuple[type, Dataset]]


def build_task(config: Config, data_directory: str, mini: bool, device: torch.device, rank: int = 0) -> Task:
    """The model (the same initial weights on every rank), its datasets and its loss function."""
    seed_everything(config.seed)
    apply_torch_threads(config.torch_threads)
    configure_determinism(config.deterministic, device)
    model = build_model(config)
    if config.bootstrap_model_file:
        bootstrap_model(model, config)
    datasets = build_datasets(config, data_directory, mini=mini)
    seed_everything(derive_seed(config.seed, "rank", rank))  # each rank its own dropout and augmentations
    return Task(model, resolve_loss_function(config.loss_function), datasets)
