"""Step 1 of the config pipeline: YAML read safely and within bounds (config files,
command-line values, and the YAML files of a run directory), and written for humans."""

import re
from pathlib import Path
from typing import Any

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


# libyaml's emitter when PyYAML was built with it (the same text, a fifth of the time: metadata.yaml
# is written again at every checkpoint).
FAST_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump_yaml(data: Any) -> str:
    """YAML for humans: keys in config order, block style."""
    return yaml.dump(data, Dumper=FAST_DUMPER, sort_keys=False, default_flow_style=False, allow_unicode=True)
