"""The search form of a `sweep:` section, read and checked before anything runs (Optuna is
not needed for this, so a bad section is reported the same way with or without it):

    sweep:
      search: {sampler: tpe, seed: 0, trials: 12, parallel: 2, objective: null, mode: null,
               pruner: {type: median, n_startup_trials: 3, n_warmup_steps: 1}}
      parameters:
        optimizer.lr: {log_uniform: [1.0e-4, 1.0e-2]}
        model_parameters.hidden_size: {choice: [16, 32, 64]}

A parameter is a config key (dotted, as in the grid form) and one distribution: `uniform` or
`log_uniform` (floats), `int` or `log_int` (integers), each [low, high], or `choice` (a list).
The objective defaults to `checkpoint.monitor` and `checkpoint.mode` (docs/search.md).
"""

import copy
from dataclasses import dataclass, field

from src.core.config.edits import set_key
from src.core.config.validation import finalize
from src.core.errors import UserError, nearest
from src.core.training.build import check_config_names

SAMPLERS = ("tpe", "random", "grid")
DISTRIBUTIONS = ("uniform", "log_uniform", "int", "log_int", "choice")
# Each pruner's options (Optuna's keyword arguments), all integers.
PRUNERS = {
    "median": ("n_startup_trials", "n_warmup_steps", "interval_steps"),
    "successive_halving": ("min_resource", "reduction_factor", "min_early_stopping_rate"),
    "hyperband": ("min_resource", "max_resource", "reduction_factor"),
    "none": (),
}
SEARCH_KEYS = ("sampler", "seed", "trials", "parallel", "objective", "mode", "pruner")


@dataclass(frozen=True)
class Parameter:
    key: str  # a dotted config key
    kind: str  # one of DISTRIBUTIONS
    values: list  # [low, high], or the choices


@dataclass(frozen=True)
class SearchSpec:
    parameters: list[Parameter]
    sampler: str = "tpe"
    seed: int = 0
    trials: int = 10
    parallel: int = 1
    objective: str | None = None  # None: the trials' checkpoint.monitor
    mode: str | None = None  # None: checkpoint.mode
    pruner: dict = field(default_factory=lambda: {"type": "median"})


def is_search(document: dict) -> bool:
    """Whether the config's `sweep:` section is the search form (else it is a grid)."""
    sweep = document.get("sweep")
    return isinstance(sweep, dict) and "search" in sweep


def _fail(where: str, message: str) -> UserError:
    return UserError(f"config key 'sweep.{where}': {message} (docs/search.md)")


def _count(search: dict, key: str, default: int, minimum: int = 1) -> int:
    value = search.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(f"search.{key}", f"expected an integer >= {minimum}, found {value!r}")
    return value


def _choice(search: dict, key: str, allowed: tuple, default):
    value = search.get(key, default)
    if value not in allowed:
        raise _fail(f"search.{key}", f"expected one of {', '.join(map(str, allowed))}, found {value!r}")
    return value


def read_pruner(pruner) -> dict:
    """`{type: median, n_warmup_steps: 1}`, checked: a known type and its own integer options."""
    pruner = {"type": pruner} if isinstance(pruner, str) else pruner
    if not isinstance(pruner, dict):
        raise _fail("search.pruner", f"expected a mapping such as {{type: median}}, found {pruner!r}")
    kind = pruner.get("type", "median")
    if kind not in PRUNERS:
        raise _fail("search.pruner.type", f"expected one of {', '.join(PRUNERS)}, found {kind!r}")
    for key, value in pruner.items():
        if key == "type":
            continue
        if key not in PRUNERS[kind]:
            options = ", ".join(PRUNERS[kind]) or "none"
            raise _fail(f"search.pruner.{key}", f"not an option of the {kind} pruner (its options: {options})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _fail(f"search.pruner.{key}", f"expected an integer >= 0, found {value!r}")
    return {"type": kind, **{key: value for key, value in pruner.items() if key != "type"}}


def read_parameter(key: str, rule) -> Parameter:
    """One parameter: exactly one distribution, with its bounds in order."""
    if not isinstance(rule, dict) or len(rule) != 1 or next(iter(rule)) not in DISTRIBUTIONS:
        raise _fail(
            f"parameters.{key}",
            f"expected one distribution such as {{log_uniform: [1.0e-4, 1.0e-2]}} or {{choice: [16, 32]}} "
            f"(one of {', '.join(DISTRIBUTIONS)}), found {rule!r}",
        )
    kind, values = next(iter(rule.items()))
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise _fail(f"parameters.{key}.choice", f"expected a non-empty list of values, found {values!r}")
        return Parameter(key, kind, values)
    integer = kind.endswith("int")
    number = int if integer else (int, float)
    if (
        not isinstance(values, list)
        or len(values) != 2
        or any(isinstance(value, bool) or not isinstance(value, number) for value in values)
    ):
        raise _fail(
            f"parameters.{key}.{kind}",
            f"expected [low, high] ({'integers' if integer else 'numbers'}), found {values!r}",
        )
    low, high = values
    if low > high:
        raise _fail(f"parameters.{key}.{kind}", f"low {low!r} is greater than high {high!r}")
    if kind.startswith("log") and low <= 0:
        raise _fail(f"parameters.{key}.{kind}", f"a log scale needs low > 0, found {low!r}")
    return Parameter(key, kind, [low, high] if integer else [float(low), float(high)])


def read_search(document: dict) -> SearchSpec:
    """The `sweep:` section's search form, checked option by option."""
    sweep = document["sweep"]
    unknown = sorted(set(sweep) - {"search", "parameters"})
    if unknown:
        raise _fail(unknown[0], "a search has only 'search' and 'parameters' (a grid has no 'search')")
    search, parameters = sweep.get("search") or {}, sweep.get("parameters")
    if not isinstance(search, dict):
        raise _fail("search", f"expected a mapping of search options, found {search!r}")
    for key in search:
        if key not in SEARCH_KEYS:
            raise _fail(f"search.{key}", f"not a search option{nearest(str(key), SEARCH_KEYS)}")
    if not isinstance(parameters, dict) or not parameters:
        raise _fail("parameters", "expected a mapping of dotted config keys to distributions")
    objective = search.get("objective")
    if objective is not None and not isinstance(objective, str):
        raise _fail("search.objective", f"expected a metric name such as rollout/loss, found {objective!r}")
    spec = SearchSpec(
        parameters=[read_parameter(str(key), rule) for key, rule in parameters.items()],
        sampler=_choice(search, "sampler", SAMPLERS, "tpe"),
        seed=_count(search, "seed", 0, minimum=0),
        trials=_count(search, "trials", 10),
        parallel=_count(search, "parallel", 1),
        objective=objective,
        mode=_choice(search, "mode", ("min", "max", None), None),
        pruner=read_pruner(search.get("pruner", {"type": "median"})),
    )
    if spec.sampler == "grid" and any(parameter.kind != "choice" for parameter in spec.parameters):
        raise _fail("search.sampler", "the grid sampler needs every parameter as a choice list")
    return spec


def trial_document(document: dict, values: dict, schema: dict) -> dict:
    """The config of one trial: the document without its sweep section, with `values` set."""
    trial = copy.deepcopy({key: value for key, value in document.items() if key != "sweep"})
    for key, value in values.items():
        if str(key).split(".")[0] in ("slurm", "sweep", "run_name"):
            raise _fail(f"parameters.{key}", "a search cannot vary this key")
        set_key(trial, key, value, schema, f"config key 'sweep.parameters.{key}'")
    return trial


def check_search(document: dict, schema: dict) -> SearchSpec:
    """The search section, and the configs at both ends of every range (their low values, then
    their high values): a key that is not a config key, or a value of the wrong type, is found
    before anything runs."""
    spec = read_search(document)
    for end in (0, -1):
        values = {parameter.key: parameter.values[end] for parameter in spec.parameters}
        try:
            config = finalize(trial_document(document, values, schema), schema)
            check_config_names(config)
        except UserError as error:
            raise UserError(f"a search trial with {values}: {error}") from None
    return spec
