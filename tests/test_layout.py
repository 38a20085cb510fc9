"""Where things live: your files hold only your code; the machinery is in packages by job whose
imports point only downward (LEVELS); nothing is too large to read; the command line reaches
the core as a typed record; and a fork that rewrote its files merges template fixes cleanly."""

import ast
import dataclasses
import shutil
from pathlib import Path

import pytest
from helpers import REPO

from src.core.commands.cli import CommandLine, parse_command_line

USER_FILES = ("src/model.py", "src/data_loader.py", "src/schema.py")

# The packages of src/core, lowest first. A module may import the leaves (src/core/*.py: base,
# errors, faults, phases, tables, seeding, distributed; and your files), its own package, and
# packages of a lower level; never a higher one, nor another package of its own level.
LEVELS = {
    "src.core.config": 1,  # the bounded YAML loader, the edits, validation, the schema
    "src.core.record": 2,  # the run directory, checkpoints, git and the environment
    "src.core.tracking": 3,  # metrics.jsonl, TensorBoard, W&B, MLflow
    "src.core.archive": 3,  # object storage: store, upload, mirror, restore
    "src.core.training": 4,  # the Trainer and its parts, the data, building your objects
    "src.core.commands": 5,  # what run.py's flags do: plan, resume, session, evaluation...
    "run": 6,
}
LIMITS = {"file lines": 500, "class lines": 300, "function lines": 60, "Trainer.__init__ parameters": 6}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project's modules `path` imports, at any depth of its code (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in known}
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    paths = [REPO / "run.py", *sorted((REPO / "src").rglob("*.py"))]
    known = {module_name(path) for path in paths}
    return {module_name(path): imports_of(path, known) for path in paths}


def package_of(module: str) -> str:
    """`src.core.training.trainer` -> `src.core.training`; a leaf (`src.core.errors`, `src.model`) -> ''."""
    return next((package for package in LEVELS if module == package or module.startswith(package + ".")), "")


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points upward, or across to another package of the same level."""
    found = []
    for module, imported in sorted(graph.items()):
        own = package_of(module)
        for target in sorted(imported):
            other = package_of(target)
            if other in ("", own):  # a leaf, or its own package
                continue
            if not own or LEVELS[other] >= LEVELS[own]:
                found.append(f"{module} imports {target} ({other or 'a leaf'} is not below {own or 'a leaf'})")
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports, as the list of modules along it, or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return [*path[path.index(imported) :], imported]
            if imported not in state and (cycle := visit(imported, [*path, imported])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_the_modules_import_no_cycle_and_the_machinery_never_imports_run_py():
    graph = import_graph()
    assert graph["run"] and graph["src.core.training.trainer"]  # the scan sees imports at all
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    importers_of_run = [module for module, imported in graph.items() if "run" in imported]
    assert importers_of_run == []


def test_imports_point_only_downward_through_the_packages():
    graph = import_graph()
    assert {package_of(module) for module in graph} >= set(LEVELS)  # every package holds modules
    assert forbidden_imports(graph) == []


def test_the_layer_check_finds_an_upward_and_a_sideways_import():
    graph = {
        "src.core.record.rundir": {"src.core.training.trainer", "src.core.errors"},
        "src.core.tracking.metrics": {"src.core.archive.store", "src.core.record.rundir"},
        "src.core.errors": {"src.core.config.loader"},
        "src.core.commands.session": {"src.core.training.output", "src.core.commands.cli"},
    }
    assert forbidden_imports(graph) == [
        "src.core.errors imports src.core.config.loader (src.core.config is not below a leaf)",
        "src.core.record.rundir imports src.core.training.trainer (src.core.training is not below src.core.record)",
        "src.core.tracking.metrics imports src.core.archive.store (src.core.archive is not below src.core.tracking)",
    ]


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def sizes() -> dict[str, tuple[int, str]]:
    """The largest file, class and function of src/ and run.py (lines, where), and the number of
    parameters of Trainer.__init__ (self left out)."""
    largest = {"file lines": (0, ""), "class lines": (0, ""), "function lines": (0, "")}
    trainer_parameters = (0, "")
    for path in [REPO / "run.py", *sorted((REPO / "src").rglob("*.py"))]:
        text = path.read_text()
        name = str(path.relative_to(REPO))
        largest["file lines"] = max(largest["file lines"], (len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                kind = "class lines" if isinstance(node, ast.ClassDef) else "function lines"
                length = node.end_lineno - node.lineno + 1
                largest[kind] = max(largest[kind], (length, f"{name}:{node.name}"))
            if isinstance(node, ast.ClassDef) and node.name == "Trainer":
                init = next(item for item in node.body if getattr(item, "name", "") == "__init__")
                arguments = init.args
                count = len(arguments.args) - 1 + len(arguments.kwonlyargs)
                trainer_parameters = (count, f"{name}:Trainer.__init__")
    return {**largest, "Trainer.__init__ parameters": trainer_parameters}


def test_nothing_is_too_large_to_read_in_an_afternoon():
    measured = sizes()
    assert measured["Trainer.__init__ parameters"][0] > 0  # the scan found the Trainer
    too_large = {kind: value for kind, value in measured.items() if value[0] > LIMITS[kind]}
    assert too_large == {}


def test_the_command_line_reaches_the_core_as_a_frozen_record():
    """argparse stays in cli.py: no other module imports it, and no function takes its Namespace."""
    command = parse_command_line(["c.yaml", "--cpu", "--epochs=3"])
    assert isinstance(command, CommandLine) and dataclasses.is_dataclass(command)
    with pytest.raises(dataclasses.FrozenInstanceError):
        command.cpu = False
    importers, takers = [], []
    for path in [REPO / "run.py", *sorted((REPO / "src").rglob("*.py"))]:
        tree = ast.parse(path.read_text())
        name = str(path.relative_to(REPO))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                if "argparse" in modules and name != "src/core/commands/cli.py":
                    importers.append(name)
            if isinstance(node, ast.FunctionDef):
                for argument in [*node.args.args, *node.args.kwonlyargs]:
                    annotation = ast.unparse(argument.annotation) if argument.annotation else ""
                    if "Namespace" in annotation or (argument.arg == "args" and not annotation):
                        takers.append(f"{name}:{node.name}({argument.arg})")
    assert importers == [] and takers == []


def test_tests_share_one_helper_module_and_never_import_each_other():
    tests = sorted((REPO / "tests").glob("*.py"))
    for path in tests:
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            modules += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for module in modules:
                assert not module.startswith(("test_", "tests.", "conftest")), f"{path.name} imports {module}"


def test_the_users_files_hold_no_machinery():
    """Only the example's classes and functions, and USER_SCHEMA: no base class, no loader rules."""
    for name in USER_FILES:
        tree = ast.parse((REPO / name).read_text())
        defined = {node.name for node in tree.body if isinstance(node, ast.ClassDef | ast.FunctionDef)}
        assert not {"BaseModel", "BaseDataset", "get_dataloader"} & defined, name
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert imported <= {"src.core.base", "pathlib", "torch", "torch.utils.data"}, (name, imported)
    schema = ast.parse((REPO / "src/schema.py").read_text())
    assigned = [target.id for node in schema.body if isinstance(node, ast.Assign) for target in node.targets]
    assert assigned == ["USER_SCHEMA"]


@pytest.mark.check
def test_a_fork_that_rewrote_its_files_merges_a_later_template_fix_without_conflicts(project):
    """The README's promise: template fixes (in src/core/) merge into a fork cleanly."""
    template = project.git("rev-parse", "HEAD")
    project.git("checkout", "-q", "-b", "fork")
    for name in USER_FILES:  # the fork rewrites every line of its own files
        path = project.root / name
        path.write_text("# the fork's own code\n" + "".join(f"# {line}\n" for line in path.read_text().splitlines()))
    project.commit("fork: my model, my data, my keys")
    project.git("checkout", "-q", "main")
    core = project.root / "src" / "core"
    for path in sorted(core.rglob("*.py")):  # the template fixes its machinery, everywhere
        path.write_text(path.read_text() + "\n# a later fix of the template\n")
    shutil.copy(core / "base.py", core / "base_extra.py")
    project.commit("template: fixes in src/core")
    project.git("checkout", "-q", "fork")
    project.git("merge", "-q", "--no-edit", "main")  # raises on a conflict
    assert project.git("merge-base", "HEAD", "main") == project.git("rev-parse", "main") != template
    assert (project.root / "src" / "model.py").read_text().startswith("# the fork's own code")
    assert (project.root / "src" / "core" / "base.py").read_text().endswith("# a later fix of the template\n")
