"""The package's shape, read from its source with `ast` (nothing imported): no module-level import cycle, the
registry a leaf, the training loop free of methods and tasks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "transferctl"


def module_files() -> dict[str, Path]:
    """Every module of transferctl by its dotted name (a package by its own name, for its __init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = module_files()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_statements(tree: ast.Module, *, module_level: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module. `module_level`: only those that run when it is imported: not inside a
    function, nor under `if TYPE_CHECKING:` (class bodies, other ifs, try and with blocks run, so they count)."""
    if not module_level:
        return [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.If):
                if not _type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, ast.With | ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    return found


def _absolute(node: ast.ImportFrom, importer: str) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package(importer) else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(importer: str, *, module_level: bool = True) -> set[str]:
    """The transferctl modules that importing `importer` imports (module_level) or that it names anywhere.

    `import a.b.c` runs a, a.b and a.b.c; `from a.b import c` runs a, a.b and, when c is a module, a.b.c. A package
    that holds the importer is left out when only its submodules are taken from it: it is already being imported
    (`from transferctl.methods import base` in a method's module), which is no cycle."""
    tree = ast.parse(MODULES[importer].read_text(encoding="utf-8"))
    found: set[str] = set()

    def add(name: str) -> None:
        """`name` and the packages above it, but not the importer nor a package that holds it."""
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if prefix in MODULES and prefix != importer and not importer.startswith(prefix + "."):
                found.add(prefix)

    for node in import_statements(tree, module_level=module_level):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
            continue
        source = _absolute(node, importer)
        submodules = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in MODULES]
        add(source)
        if len(submodules) < len(node.names) and source in MODULES and importer.startswith(source + "."):
            found.add(source)  # names defined by a package that holds the importer: its __init__ must have run first
        for name in submodules:
            add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: imported_modules(name) for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_checker_finds_a_cycle_through_a_package_init():
    """The shape of the data <-> modalities cycle this test guards against: a package whose __init__ imports a module
    that needs a second package, whose modules take the first one's submodules (which runs its __init__)."""
    graph = {"data": {"data.sets"}, "data.sets": {"modalities"}, "modalities": {"data"}, "data.samples": set()}
    assert cycles(graph) == [["data", "data.sets", "modalities"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    described = ["; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(c)))}" for m in c) for c in found]
    assert not found, "module-level import cycles:\n" + "\n".join(described)


# registry.py may import these, and they must be leaves themselves: `errors` (ConfigError, did_you_mean) and
# `plugins` (`origin`, which tells a plugin's component from a built-in; it imports only `errors` at module level).
REGISTRY_MAY_IMPORT = {"transferctl.errors", "transferctl.plugins"}


def test_the_registry_is_a_leaf():
    named = imported_modules("transferctl.registry", module_level=False)  # anywhere in it, functions included
    assert named <= REGISTRY_MAY_IMPORT, f"registry.py imports {sorted(named - REGISTRY_MAY_IMPORT)}"
    for leaf in sorted(REGISTRY_MAY_IMPORT):
        below = imported_modules(leaf)
        assert below <= {"transferctl.errors"}, f"{leaf} (imported by registry.py) imports {sorted(below)} when imported"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n == "transferctl.engine" or n.startswith("transferctl.engine.")))
def test_the_engine_names_no_method_or_task(name):
    named = imported_modules(name, module_level=False)  # anywhere: functions and TYPE_CHECKING blocks too
    forbidden = sorted(m for m in named if m.split(".")[:2] in (["transferctl", "methods"], ["transferctl", "tasks"]))
    assert not forbidden, f"{name} imports {forbidden}: the loop knows no method or task by name"


def test_the_config_schema_asks_no_registry():
    """schema.py (the config's schema, YAML, overrides) imports no transferctl module but errors: runs_index and the
    like read stored configs without loading a component."""
    named = imported_modules("transferctl.schema", module_level=False)
    assert named <= {"transferctl.errors"}, f"schema.py imports {sorted(named)}"


def test_the_license_is_an_spdx_string_that_setuptools_takes_without_a_warning():
    """A `{text = ...}` table made setuptools print a deprecation wall on every install (issue 35)."""
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert "setuptools>=77" in project["build-system"]["requires"]  # the first to read an SPDX expression
