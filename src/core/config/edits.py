"""Steps 2 to 5 of the config pipeline: the command line's edits, in this order:
`--find-replace OLD NEW` (substrings of every string value, at any depth), `--delete KEY`,
`--modify KEY VALUE` (a whole value, parsed as YAML), then `--a.b.c=VALUE` overrides."""

import copy
from dataclasses import dataclass, field
from typing import Any

from src.core.config.loader import parse_yaml
from src.core.errors import UserError, nearest


@dataclass(frozen=True)
class ConfigEdits:
    """The edits the command line asks for, applied in the documented order (lists of pairs)."""

    find_replace: list[tuple[str, str]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    modify: list[tuple[str, str]] = field(default_factory=list)
    overrides: list[tuple[str, str]] = field(default_factory=list)

    def sets(self, key: str) -> bool:
        """Whether --modify or an override sets `key` (a dotted name)."""
        return any(name == key for name, _ in (*self.modify, *self.overrides))


def lookup(document: Any, dotted: str) -> Any:
    """The value at a dotted key of a plain nested dict, or None."""
    for name in dotted.split("."):
        if not isinstance(document, dict) or name not in document:
            return None
        document = document[name]
    return document


def find_replace(value: Any, old: str, new: str) -> Any:
    """Replace `old` by `new` in every string value (not in keys), at any depth."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, dict):
        return {key: find_replace(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [find_replace(item, old, new) for item in value]
    return value


def schema_rule(schema: dict, path: list[str]) -> dict | None:
    """The cerberus rule for a dotted path, or None where the schema does not say."""
    rules = schema
    rule = None
    for name in path:
        if rules is None or name not in rules:
            return None
        rule = rules[name]
        rules = rule.get("schema") if rule.get("type") == "dict" else None
    return rule


def all_paths(document: Any, schema: dict | None, prefix: str = "") -> set[str]:
    """Every dotted key in the document or the schema: the candidates for "did you mean"."""
    paths = set()
    if isinstance(document, dict):
        for key, value in document.items():
            paths.add(prefix + str(key))
            paths |= all_paths(value, None, f"{prefix}{key}.")
    for key, rule in (schema or {}).items():
        paths.add(prefix + key)
        if rule.get("type") == "dict" and isinstance(rule.get("schema"), dict):
            paths |= all_paths(None, rule["schema"], f"{prefix}{key}.")
    return paths


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
            return schema_rule(schema, path) is not None
        node = node[name]
    return True


def delete_key(document: dict, dotted: str, schema: dict) -> None:
    path = dotted.split(".")
    if not _key_exists(document, schema, path):
        raise UserError(
            f"--delete {dotted}: no such key in the config or the schema" + nearest(dotted, all_paths(document, schema))
        )
    parent = _walk(document, path, f"--delete {dotted}", create=False)
    if parent is not None:
        parent.pop(path[-1], None)


def _in_free_section(schema: dict, path: list[str]) -> bool:
    """Whether `path` lies in a section of free keys (`model_parameters`, `optimizer.parameters`...),
    whose keys are checked later against the constructors they are passed to."""
    rule = schema_rule(schema, path[:-1]) if len(path) > 1 else None
    return bool(rule) and rule.get("type") == "dict" and "schema" not in rule and "keysrules" not in rule


def set_key(document: dict, dotted: str, value: Any, schema: dict, where: str) -> None:
    """Set an existing key (in the config, or known to the schema) to `value`; in a section of
    free keys such as `model_parameters`, a new key may be added."""
    path = dotted.split(".")
    if not all(path) or not (_key_exists(document, schema, path) or _in_free_section(schema, path)):
        raise UserError(
            f"{where}: no such key in the config or the schema"
            + nearest(dotted, all_paths(document, schema))
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
