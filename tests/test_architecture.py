"""docs/architecture.md, kept true: who may import whom, read from the source with ``ast``.

Every import counts, also the lazy ones inside functions: a lazy import still has to be
installed on the node that runs it. Relative imports are resolved to their package.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: the parts, and the parts each may import (itself always)
ALLOWED: dict[str, set[str]] = {
    "panda_core": set(),
    "copytools": {"panda_core"},
    "pilot": {"panda_core", "copytools"},
    "site_configs": {"panda_core"},
    "storage_element": {"panda_core", "copytools"},
    "schedulers": {"panda_core", "site_configs"},
    "server": {"panda_core", "site_configs", "copytools"},
    "panda_wms": {"panda_core", "copytools", "pilot", "site_configs", "storage_element",
                  "schedulers", "server"},
}
PARTS = set(ALLOWED)
#: what a worker node must never need: the server's and the sysadmin's dependencies
SERVER_ONLY = {"tornado", "sqlalchemy", "alembic", "prometheus_client", "jsonschema", "yaml",
               "psycopg", "pymysql", "jwt"}
WORKER_NODE = ("panda_core", "copytools", "pilot")
#: panda_core's one import outside the standard library: the plugin loader asks stevedore,
#: lazily, only when a plugin is loaded
CORE_EXCEPTIONS = {("panda_core/drivers.py", "stevedore")}


def _modules(part: str) -> list[Path]:
    root = REPO / part
    return sorted(root.rglob("*.py")) if root.is_dir() else []


def _imports(path: Path) -> set[str]:
    """Top-level names of everything ``path`` imports (relative imports resolved)."""
    rel = path.relative_to(REPO).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                names.add(base[0] if base else (node.module or "").split(".")[0])
            elif node.module:
                names.add(node.module.split(".")[0])
    return names


def _stdlib(name: str) -> bool:
    return name in sys.stdlib_module_names or name == "__future__"


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_parts_import_only_what_the_architecture_allows(part):
    bad = []
    for path in _modules(part):
        for name in _imports(path) & (PARTS - {part}):
            if name not in ALLOWED[part]:
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_ground_imports_only_the_standard_library():
    bad = []
    for path in _modules("panda_core"):
        rel = str(path.relative_to(REPO))
        for name in _imports(path):
            if not _stdlib(name) and name != "panda_core" and (rel, name) not in CORE_EXCEPTIONS:
                bad.append(f"{rel} imports {name}")
    assert not bad, "\n".join(bad)


def test_nothing_on_the_worker_node_needs_the_server_dependencies():
    bad = [f"{path.relative_to(REPO)} imports {name}"
           for part in WORKER_NODE for path in _modules(part)
           for name in _imports(path) & SERVER_ONLY]
    assert not bad, "\n".join(bad)


def _module_name(path: Path) -> tuple[str, tuple[str, ...]]:
    rel = path.relative_to(REPO).with_suffix("")
    package = rel.parts[:-1]
    return ".".join(package if rel.name == "__init__" else rel.parts), package


def _module_level_graph(part: str) -> dict[str, set[str]]:
    """module -> modules of the same part it imports at module level (what a cycle is made of).
    ``from pkg import name`` depends on ``pkg.name`` when that is a module, else on ``pkg``."""
    paths = _modules(part)
    known = {_module_name(p)[0] for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        mod, package = _module_name(path)
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = list(package[:len(package) - (node.level - 1)])
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.split(".")[0] == part:
                    target = node.module
                else:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in known else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == part)
        graph[mod] = deps
    return {m: {d for d in deps if d in known and d != m} for m, deps in graph.items()}


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_no_import_cycles_inside_a_part(part):
    graph = _module_level_graph(part)
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(mod: str, stack: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, "\n".join(cycles)
