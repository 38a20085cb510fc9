"""The config pipeline, in this order (README, "Config"):

1. load the YAML file (safe loader; `1e-3` is a float; a duplicate key is an error)
2. `--find-replace OLD NEW`: replace substrings in every string value, at any depth
3. `--delete KEY`: remove keys (top-level names or dotted paths)
4. `--modify KEY VALUE`: replace a key's whole value (VALUE parsed as YAML)
5. `--a.b.c=VALUE`: dotted overrides (VALUE parsed as YAML)
6. defaults from the schema
7. cerberus validation against `src/schema.py`
8. an immutable `Config` with attribute access

Every mistake is a `UserError` naming the key, what was expected and what was
found, with the nearest real key for typos.
"""

import copy
import difflib
import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import cerberus
import yaml

from src.core.errors import UserError

# Keys that `run.py` adds to a run's saved config.yaml. They describe a run rather
# than configure one, so they are dropped when a saved config is loaded again.
PROVENANCE_KEYS = ("git", "flags", "command_line", "environment", "data_fingerprint", "bootstrap", "parent")


# Bounds on any YAML the template reads (config files, command-line values, run files), far
# above any real config, so that a document cannot grow without bound once it is parsed.
MAX_YAML_BYTES = 1024 * 1024  # a config file (real ones are a few KiB)
MAX_YAML_DEPTH = 32  # nesting levels, counted through aliases (real configs use 2 to 5)
MAX_YAML_VALUES = 100_000  # values once every alias (*name) and merge (<<) is expanded
MAX_SWEEP_VALUES = 10_000_000  # a sweep's runs times the values of its config (1000 runs of real configs: 10**5)
MAX_INT_BITS = 14_000  # about 4,200 decimal digits: Python cannot print an int over 4,300


def _yaml_error(problem: str, mark) -> yaml.YAMLError:
    return yaml.constructor.ConstructorError(None, None, problem, mark)


def check_yaml_size(root: yaml.Node) -> None:
    """Refuse a composed document whose aliases nest into themselves, nest deeper than
    MAX_YAML_DEPTH or expand to more than MAX_YAML_VALUES values: PyYAML shares an aliased
    object, but every later step (edits, validation, saving) walks the expanded tree.

    Iterative, memoized per node: an alias bomb of 10**30 values is refused in milliseconds.
    """
    size: dict[int, int] = {}  # id(node) -> expanded number of values
    depth: dict[int, int] = {}  # id(node) -> expanded nesting depth below it
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        if children_done:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size[id(child)] for child in children)
            depth[id(node)] = 1 + max((depth[id(child)] for child in children), default=0)
            if size[id(node)] > MAX_YAML_VALUES:
                raise _yaml_error(
                    f"expands to more than {MAX_YAML_VALUES} values through aliases (*name) or merges (<<); "
                    "expected a config far smaller than that",
                    node.start_mark,
                )
            if depth[id(node)] > MAX_YAML_DEPTH:
                raise _yaml_error(
                    f"nests deeper than {MAX_YAML_DEPTH} levels through aliases (*name); expected a flatter config",
                    node.start_mark,
                )
            continue
        if id(node) in size:
            continue
        on_path.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                raise _yaml_error(
                    "a recursive alias: this value contains itself (&name ... *name inside it); "
                    "expected a value that ends",
                    child.start_mark,
                )
            if id(child) not in size:
                stack.append((child, False))


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2 floats (`1e-3`), no duplicate keys, and bounds:
    nesting depth, size after alias expansion, no recursive aliases, hashable keys, ints
    that Python can print."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        # PyYAML composes recursively: refuse deep nesting before Python's recursion limit.
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _yaml_error(
                    f"nests deeper than {MAX_YAML_DEPTH} levels; expected a flatter config",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            check_yaml_size(node)
        return node

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise _yaml_error(
                    f"a {'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'} used as a key; "
                    "expected a plain key such as 'hidden_size'",
                    key_node.start_mark,
                )
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first set on line {seen[key]})",
                    mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        too_large = _yaml_error("an integer of over 4000 digits; expected a number a config can use", node.start_mark)
        try:
            value = super().construct_yaml_int(node)
        except ValueError:  # Python refuses to read over 4300 decimal digits
            raise too_large from None
        if value.bit_length() > MAX_INT_BITS:  # 0x..., 0b... or 1:2:3 reach it without decimal digits
            raise too_large
        return value


_YamlLoader.add_constructor("tag:yaml.org,2002:int", _YamlLoader.construct_yaml_int)
# PyYAML follows YAML 1.1, where a float needs a dot: `1e-3` would be a string.
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely; a syntax error names `source`, the line and the column."""
    if len(text) > MAX_YAML_BYTES:
        raise UserError(f"{source}: {len(text)} characters of YAML; expected at most {MAX_YAML_BYTES} for a config")
    try:
        return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise UserError(f"{source}: invalid YAML{where}: {problem}") from None


def load_yaml_file(path: str | Path) -> dict:
    """Read a config file into a plain dict, with a clear error for every way it can be wrong.
    A run's saved config.yaml can be run again: its provenance sections are dropped."""
    return split_provenance(read_config_file(path))[0]


def read_config_file(path: str | Path) -> dict:
    """The whole YAML mapping of a config file (a run's config.yaml with its provenance)."""
    path = Path(path)
    if not path.is_file():
        kind = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
        raise UserError(f"config file {str(path)!r} {kind}; expected a YAML file")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise UserError(f"config file {str(path)!r} holds {size} bytes; expected at most {MAX_YAML_BYTES} for a config")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"config file {str(path)!r} cannot be read: {error}") from None
    document = parse_yaml(text, str(path))
    if document is None:
        raise UserError(f"config file {str(path)!r} is empty; expected a mapping of config keys")
    if not isinstance(document, dict):
        raise UserError(
            f"config file {str(path)!r} holds a {type(document).__name__}; "
            "expected a mapping of config keys (key: value lines)"
        )
    return document


def split_provenance(document: dict) -> tuple[dict, dict]:
    """A saved config.yaml's config keys, and the sections that describe the run (git, flags...)."""
    config = {key: value for key, value in document.items() if key not in PROVENANCE_KEYS}
    return config, {key: document[key] for key in PROVENANCE_KEYS if key in document}


# ---------------------------------------------------------------------------------
# Command-line edits (steps 2 to 5)


@dataclass
class ConfigEdits:
    """The edits the command line asks for, applied in the documented order."""

    find_replace: list[tuple[str, str]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    modify: list[tuple[str, str]] = field(default_factory=list)
    overrides: list[tuple[str, str]] = field(default_factory=list)


def find_replace(value: Any, old: str, new: str) -> Any:
    """Replace `old` by `new` in every string value (not in keys), at any depth."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, dict):
        return {key: find_replace(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [find_replace(item, old, new) for item in value]
    return value


def _schema_rule(schema: dict, path: list[str]) -> dict | None:
    """The cerberus rule for a dotted path, or None where the schema does not say."""
    rules = schema
    rule = None
    for name in path:
        if rules is None or name not in rules:
            return None
        rule = rules[name]
        rules = rule.get("schema") if rule.get("type") == "dict" else None
    return rule


def _all_paths(document: Any, schema: dict | None, prefix: str = "") -> set[str]:
    """Every dotted key in the document or the schema: the candidates for "did you mean"."""
    paths = set()
    if isinstance(document, dict):
        for key, value in document.items():
            paths.add(prefix + str(key))
            paths |= _all_paths(value, None, f"{prefix}{key}.")
    for key, rule in (schema or {}).items():
        paths.add(prefix + key)
        if rule.get("type") == "dict" and isinstance(rule.get("schema"), dict):
            paths |= _all_paths(None, rule["schema"], f"{prefix}{key}.")
    return paths


def nearest(word: str, candidates) -> str:
    """' Did you mean ...?' for the closest candidate, or '' when nothing is close."""
    matches = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean {matches[0]!r}?" if matches else ""


def _walk(document: dict, path: list[str], where: str, create: bool) -> dict | None:
    """The dict that holds the last key of `path`, or None where a section is missing."""
    node = document
    for depth, name in enumerate(path[:-1]):
        child = node.get(name)
        if child is None and create:
            child = node[name] = {}
        if child is None:
            return None
        if not isinstance(child, dict):
            section = ".".join(path[: depth + 1])
            raise UserError(f"{where}: {section!r} holds a {type(child).__name__}, not a section of keys")
        node = child
    return node


def _key_exists(document: dict, schema: dict, path: list[str]) -> bool:
    node = document
    for name in path:
        if not isinstance(node, dict) or name not in node:
            return _schema_rule(schema, path) is not None
        node = node[name]
    return True


def delete_key(document: dict, dotted: str, schema: dict) -> None:
    path = dotted.split(".")
    if not _key_exists(document, schema, path):
        raise UserError(
            f"--delete {dotted}: no such key in the config or the schema"
            + nearest(dotted, _all_paths(document, schema))
        )
    parent = _walk(document, path, f"--delete {dotted}", create=False)
    if parent is not None:
        parent.pop(path[-1], None)


def _in_free_section(schema: dict, path: list[str]) -> bool:
    """Whether `path` lies in a section of free keys (`model_parameters`, `optimizer.parameters`...),
    whose keys are checked later against the constructors they are passed to."""
    rule = _schema_rule(schema, path[:-1]) if len(path) > 1 else None
    return bool(rule) and rule.get("type") == "dict" and "schema" not in rule and "keysrules" not in rule


def set_key(document: dict, dotted: str, value: Any, schema: dict, where: str) -> None:
    """Set an existing key (in the config, or known to the schema) to `value`; in a section of
    free keys such as `model_parameters`, a new key may be added."""
    path = dotted.split(".")
    if not all(path) or not (_key_exists(document, schema, path) or _in_free_section(schema, path)):
        raise UserError(
            f"{where}: no such key in the config or the schema"
            + nearest(dotted, _all_paths(document, schema))
            + " (from the command line, keys can only be changed, or added in model_parameters,"
            " data_loader_parameters.* and optimizer.parameters)"
        )
    _walk(document, path, where, create=True)[path[-1]] = value


def apply_edits(document: dict, edits: ConfigEdits, schema: dict) -> dict:
    """Steps 2 to 5 of the pipeline, on a copy of `document`."""
    document = copy.deepcopy(document)
    for old, new in edits.find_replace:
        document = find_replace(document, old, new)
    for dotted in edits.delete:
        delete_key(document, dotted, schema)
    for dotted, text in edits.modify:
        set_key(document, dotted, parse_yaml(text, f"--modify {dotted}"), schema, f"--modify {dotted}")
    for dotted, text in edits.overrides:
        set_key(document, dotted, parse_yaml(text, f"--{dotted}"), schema, f"--{dotted}={text}")
    return document


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


def lookup(document: Any, dotted: str) -> Any:
    """The value at a dotted key of a plain nested dict, or None."""
    for name in dotted.split("."):
        if not isinstance(document, dict) or name not in document:
            return None
        document = document[name]
    return document


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
            rule = _schema_rule(schema, parent.split(".")) if parent else None
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


def dump_yaml(data: Any) -> str:
    """YAML for humans: keys in config order, block style."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


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


def config_hash(config: Mapping, schema: dict) -> str:
    """A hash of what the config makes the run compute (stored in every checkpoint)."""
    canonical = json.dumps(result_affecting_keys(config, schema), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
