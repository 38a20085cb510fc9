"""Steps 6 to 8 of the config pipeline: the schema's defaults, cerberus validation, and the
immutable `Config`; and what of a config can change a run's results (its hash, the keys
that changed between two configs)."""

import copy
import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import cerberus

from src.core.config.edits import ConfigEdits, apply_edits, lookup, schema_rule
from src.core.config.loader import load_yaml_file
from src.core.errors import UserError, nearest

MAX_SWEEP_VALUES = 10_000_000  # a sweep's runs times the values of its config (1000 runs of real configs: 10**5)


# ---------------------------------------------------------------------------------
# Defaults and validation (steps 6 and 7)


def apply_defaults(document: dict, schema: dict) -> dict:
    """Fill in the schema's defaults, nested sections included (a copy)."""
    document = dict(document)
    for key, rule in schema.items():
        if key not in document and "default" in rule:
            document[key] = copy.deepcopy(rule["default"])
        sub_schema = rule.get("schema") if rule.get("type") == "dict" else None
        if isinstance(sub_schema, dict) and isinstance(document.get(key), dict):
            document[key] = apply_defaults(document[key], sub_schema)
    return document


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _flatten_errors(errors: dict, prefix: str = "") -> Iterator[tuple[str, str]]:
    for key, messages in errors.items():
        for message in messages:
            if isinstance(message, dict):
                yield from _flatten_errors(message, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", message


class _Validator(cerberus.Validator):
    """cerberus, except that `true` is not a number (Python's bool is an int)."""

    types_mapping: ClassVar[dict] = {
        **cerberus.Validator.types_mapping,
        "integer": cerberus.TypeDefinition("integer", (int,), (bool,)),
        "float": cerberus.TypeDefinition("float", (float, int), (bool,)),
    }


def validate(document: dict, schema: dict) -> dict:
    """Check `document` against the cerberus schema; return the normalized document."""
    validator = _Validator(schema, allow_unknown=False)
    if validator.validate(document):
        return validator.document
    lines = []
    for dotted, message in sorted(_flatten_errors(validator.errors)):
        if message == "unknown field":
            parent = dotted.rpartition(".")[0]
            rule = schema_rule(schema, parent.split(".")) if parent else None
            siblings = rule["schema"] if rule else schema
            prefix = f"{parent}." if parent else ""
            hint = nearest(dotted, [prefix + key for key in siblings])
            lines.append(f"unknown key {dotted!r}{hint or ' (not in src/schema.py)'}")
        elif message == "required field":
            lines.append(f"missing required key {dotted!r}")
        elif message.endswith("(value not shown)"):  # it holds a secret: never echo it
            lines.append(f"key {dotted!r}: {message}")
        else:
            found = _describe(lookup(document, dotted))
            lines.append(f"key {dotted!r}: {message}, found {found}")
    raise UserError("invalid config:\n  " + "\n  ".join(lines))


# ---------------------------------------------------------------------------------
# The immutable config (step 8)


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return Config(value)
    if isinstance(value, list | tuple):
        return tuple(_freeze(item) for item in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Config):
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_thaw(item) for item in value]
    return value


class Config(Mapping):
    """A read-only nested mapping: `config.optimizer.lr` or `config["optimizer"]["lr"]`.

    Keys are also plain instance attributes, so reading them in a training loop costs
    no more than any attribute (a key named like a method, such as `items`, stays
    reachable as `config["items"]`).
    """

    def __init__(self, data: Mapping):
        frozen = {key: _freeze(value) for key, value in data.items()}
        object.__setattr__(self, "_data", frozen)
        for key, value in frozen.items():
            if isinstance(key, str) and not hasattr(Config, key):
                object.__setattr__(self, key, value)

    def __getattr__(self, name: str) -> Any:  # only reached for names that are not keys
        raise AttributeError(f"config has no key {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the config is read-only; change it in the YAML file or with --key=value")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("the config is read-only; change it in the YAML file or with --delete")

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"

    def __reduce__(self):  # picklable, for DataLoader workers and torch.distributed
        return (Config, (self.to_dict(),))

    def to_dict(self) -> dict:
        """A plain, mutable deep copy (for saving as YAML)."""
        return _thaw(self)


def check_sweep_size(document: dict, schema: dict) -> int:
    """The number of runs the `sweep:` section expands to, from its list lengths alone;
    above `max_sweep_size` (1000 by default) it is refused before anything is expanded."""
    sweep = document.get("sweep")
    lists = [values for values in sweep.values() if isinstance(values, list)] if isinstance(sweep, dict) else []
    count = math.prod(len(values) for values in lists)
    maximum = document.get("max_sweep_size", schema.get("max_sweep_size", {}).get("default", 1000))
    if isinstance(maximum, bool) or not isinstance(maximum, int) or maximum < 1:
        raise UserError(f"config key 'max_sweep_size': expected a positive integer, found {_describe(maximum)}")
    lengths = " x ".join(str(len(values)) for values in lists)
    if count > maximum:
        raise UserError(
            f"config key 'sweep': {lengths} values make {count} runs, more than max_sweep_size ({maximum}); "
            "sweep fewer values, or raise max_sweep_size if you mean it"
        )
    values = count_values(document)  # every run is a copy of the whole config
    if count * values > MAX_SWEEP_VALUES:
        raise UserError(
            f"config key 'sweep': {count} runs ({lengths} values) of a config of {values} values make "
            f"{count * values} values to expand, more than {MAX_SWEEP_VALUES}; sweep fewer values or shrink the config"
        )
    return count


def count_values(document: Any) -> int:
    """How many values `document` holds, counting shared (aliased) ones each time they occur."""
    count, stack = 0, [document]
    while stack:
        value = stack.pop()
        count += 1
        if isinstance(value, dict):
            stack.extend(value.values())
            count += len(value)  # the keys
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return count


def map_original_sections(document: dict) -> dict:
    """The original template's `multigpu_parameters` mapped onto `distributed` (which it
    overrides), here and only here, so that every reader (torchrun's launcher, the process
    group, `--print-config`) sees the same values; the section itself stays as given."""
    original, settings = document.get("multigpu_parameters"), document.get("distributed")
    if not original or not isinstance(settings, dict):
        return document
    names = {"ngpus_per_node": "nproc_per_node", "num_nodes": "nnodes", "node_idx": "node_rank", "backend": "backend"}
    mapped = {new: original[old] for old, new in names.items() if original.get(old) is not None}
    if original.get("url"):  # tcp://host:port, the address of node 0
        mapped["rdzv_endpoint"] = original["url"].split("://", 1)[-1]
    if original.get("num_nodes", 1) > 1:  # the original numbered its nodes: a static rendezvous
        mapped.setdefault("node_rank", 0)
    return {**document, "distributed": {**settings, **mapped}}


def finalize(document: dict, schema: dict) -> Config:
    """Steps 6 to 8: defaults, validation (the original template's sections then mapped
    onto the template's), freezing."""
    return Config(map_original_sections(validate(apply_defaults(document, schema), schema)))


def load_config(path: str | Path, edits: ConfigEdits, schema: dict) -> Config:
    """The whole pipeline: file → edits → defaults → validation → `Config`."""
    return finalize(apply_edits(load_yaml_file(path), edits, schema), schema)


def result_affecting_keys(config: Mapping, schema: dict, prefix: str = "") -> dict:
    """The flattened keys whose change can change the results.

    A schema rule with `meta: {affects_results: false}` marks a key that does not
    (the description, `epochs`, checkpoint timing...): `--resume` lets those change.
    """
    keys = {}
    for key, value in config.items():
        rule = (schema or {}).get(key, {})
        if rule.get("meta", {}).get("affects_results", True) is False:
            continue
        sub_schema = rule.get("schema") if rule.get("type") == "dict" else None
        if isinstance(value, Mapping) and sub_schema:
            keys.update(result_affecting_keys(value, sub_schema, f"{prefix}{key}."))
        else:
            keys[prefix + key] = _thaw(value)
    return keys


def changed_keys(before: Mapping, after: Mapping, schema: dict) -> list[str]:
    """The result-affecting keys (dotted) whose values differ between two configs."""
    old, new = result_affecting_keys(before, schema), result_affecting_keys(after, schema)
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))


def config_hash(config: Mapping, schema: dict) -> str:
    """A hash of what the config makes the run compute (stored in every checkpoint)."""
    canonical = json.dumps(result_affecting_keys(config, schema), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
