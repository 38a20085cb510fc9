"""The documentation cannot drift from the code: every `python run.py` line of README.md and
docs/ parses with the real command-line parser, every flag they name is one of its flags (or
a `--key=value` override of a real config key), every config key they name is in the schema,
every YAML block of config validates key by key, the flag table matches the parser's, and
the Python snippets call nothing they do not define. (Numbers cannot be checked this way:
the benchmark tables state their date and command.)"""

import ast
import builtins
import re
import shlex
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from src.core.commands.cli import FLAG_MODES, MODES, NEW_RUN, build_parser, parse_command_line
from src.core.config.edits import schema_rule
from src.core.config.schema import project_schema
from src.core.errors import UserError

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCHEMA = project_schema()
COMMAND = re.compile(r"(?:^|[\s`(])(?:\.venv/bin/)?python run\.py ([^`\n#]*)")
# A flag named on its own in backticks: `--mini`, `--from-step N`, `--optimizer.lr=3e-4` (flags
# of other tools come after their command's name: `torchrun --standalone`).
FLAG = re.compile(r"`--([A-Za-z][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_]+)*)")
# Named as examples of syntax or of a typo's message, not as real keys.
NOT_KEYS = {"sizes", "optimizer.lrr", "a.b", "a.b.c", "KEY", "key", "KEY.PATH", "key.path", "mlflow.source.git.commit"}
OTHER_TOOLS = {"build-arg", "skip-worktree", "cpus-per-task", "signal"}  # docker's, git's, Slurm's
DOTTED_KEY = re.compile(r"`([a-z_]+(?:\.[a-z_]+)+)`")
KNOWN_MODULES = {"torch", "nn", "F", "np", "numpy", "plt"}  # what snippets may use without importing


def flags_of_parser() -> set[str]:
    return {option[2:] for action in build_parser()._actions for option in action.option_strings}


def commands_in(text: str) -> list[str]:
    """The arguments of every `python run.py ...` written out (usage patterns with `...` or `[` aside)."""
    found = []
    for match in COMMAND.finditer(text):
        arguments = match.group(1).strip().rstrip("`").strip()
        if "..." in arguments or " [" in arguments or "|" in arguments or "<" in arguments:
            continue  # a usage pattern, not a command
        found.append(arguments)
    return found


def key_exists(dotted: str) -> bool:
    """A dotted config key the schema declares, or a key inside a free section (model_parameters...)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        rule = schema_rule(SCHEMA, parts[:end])
        if rule is not None:
            free = rule.get("type") == "dict" and "schema" not in rule
            return end == len(parts) or free
    return False


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_run_py_line_parses_with_the_real_parser(document):
    commands = commands_in(document.read_text())
    for arguments in commands:
        try:
            parse_command_line(shlex.split(arguments))
        except UserError as error:
            raise AssertionError(f"{document.name}: python run.py {arguments}: {error}") from None
    if document.name == "README.md":
        assert len(commands) >= 5  # the scan finds them


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_flag_and_config_key_named_exists(document):
    text = document.read_text()
    flags = flags_of_parser()
    unknown = []
    overrides = [
        argument[2:].split("=")[0]
        for arguments in commands_in(text)
        for argument in shlex.split(arguments)
        if argument.startswith("--") and "=" in argument
    ]
    for name in [*FLAG.findall(text), *overrides]:
        if name in flags or name in NOT_KEYS or name in OTHER_TOOLS:
            continue
        if "-" in name or not key_exists(name):  # a flag that does not exist, or an override of no key
            unknown.append(f"--{name}")
    for dotted in DOTTED_KEY.findall(text):
        if dotted.split(".")[0] in SCHEMA and dotted not in NOT_KEYS and not key_exists(dotted):
            unknown.append(dotted)
    assert unknown == [], f"{document.name} names flags or keys that do not exist"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_config_block_uses_real_keys(document):
    blocks = re.findall(r"```yaml\n(.*?)```", document.read_text(), re.DOTALL)
    unknown = []
    for block in blocks:
        config = yaml.safe_load(block)
        if not isinstance(config, dict) or not set(config) & set(SCHEMA):
            continue  # not a config (a run directory's files, say)
        stack = [("", config)]
        while stack:
            prefix, section = stack.pop()
            for key, value in section.items():
                dotted = f"{prefix}{key}"
                if not key_exists(dotted):
                    unknown.append(dotted)
                rule = schema_rule(SCHEMA, dotted.split("."))
                if isinstance(value, dict) and rule and "schema" in rule:
                    stack.append((f"{dotted}.", value))
    assert unknown == [], f"{document.name}: config keys that do not exist"


def test_the_flag_table_is_the_parsers():
    """docs/command-line.md's table of where each flag applies, against cli.FLAG_MODES."""
    text = (REPO / "docs" / "command-line.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| flag | new run"))
    columns = [cell.strip().strip("`") for cell in header.strip("|").split("|")][1:]
    assert columns == ["new run", *MODES[::-1]]
    table = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `--") and len(cells) == len(columns) + 1:
            modes = {
                NEW_RUN if column == "new run" else column
                for column, cell in zip(columns, cells[1:], strict=True)
                if cell
            }
            table[cells[0].strip("`")] = modes
    assert table == {flag: set(modes) for flag, modes in FLAG_MODES.items()}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_python_snippets_call_only_what_they_define(document):
    """A snippet that calls a helper it never defines (or imports) cannot be copied as it is."""
    blocks = re.findall(r"```python\n(.*?)```", document.read_text(), re.DOTALL)
    defined = set(dir(builtins)) | KNOWN_MODULES
    trees = [ast.parse(block.replace("\n    ...\n", "\n    pass\n")) for block in blocks]
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                defined.add(node.name)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                defined |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, ast.arg):
                defined.add(node.arg)
    called = {
        node.func.id
        for tree in trees
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert called - defined == set(), f"{document.name}: snippets call undefined names"


def test_the_readme_stays_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300
    assert all(Path(path).read_text().startswith("# ") for path in DOCUMENTS)
