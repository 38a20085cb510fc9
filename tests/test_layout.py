"""Where things live: your files hold only your code, the machinery has no import cycle
and never imports run.py, and a fork that rewrote its files merges template fixes cleanly."""

import ast
import shutil
from pathlib import Path

import pytest
from helpers import REPO

USER_FILES = ("src/model.py", "src/data_loader.py", "src/schema.py")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


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


def import_graph() -> dict[str, set[str]]:
    paths = [REPO / "run.py", *sorted((REPO / "src").rglob("*.py"))]
    known = {module_name(path) for path in paths}
    return {module_name(path): imports_of(path, known) for path in paths}


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
    assert graph["run"] and graph["src.core.trainer"]  # the scan sees imports at all
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    importers_of_run = [module for module, imported in graph.items() if "run" in imported]
    assert importers_of_run == []


def test_tests_share_one_helper_module_and_never_import_each_other():
    tests = sorted((REPO / "tests").glob("*.py"))
    for path in tests:
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            modules += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for module in modules:
                assert not module.startswith(("test_", "tests.", "conftest")), f"{path.name} imports {module}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


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
    for path in sorted(core.glob("*.py")):  # the template fixes its machinery, everywhere
        path.write_text(path.read_text() + "\n# a later fix of the template\n")
    shutil.copy(core / "base.py", core / "base_extra.py")
    project.commit("template: fixes in src/core")
    project.git("checkout", "-q", "fork")
    project.git("merge", "-q", "--no-edit", "main")  # raises on a conflict
    assert project.git("merge-base", "HEAD", "main") == project.git("rev-parse", "main") != template
    assert (project.root / "src" / "model.py").read_text().startswith("# the fork's own code")
    assert (project.root / "src" / "core" / "base.py").read_text().endswith("# a later fix of the template\n")
