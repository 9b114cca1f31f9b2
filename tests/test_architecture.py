"""The shape of the package: one job per module, no import circle, nothing imports the master.

Read from the source (every import, at the top or inside a function), without importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "expertd"
MAX_LINES = 500
# The master's parts: a worker (and what runs in a worker or a generation's parent) imports none of them.
MASTER_SIDE = {"master", "accept", "admin", "connections", "dispatch", "intake", "pool", "reloads", "serving",
               "backoff"}
WORKER_SIDE = {"worker", "generation", "loader", "calls", "worker_http"}


def _imports() -> dict[str, set[str]]:
    """expertd module name -> the expertd modules it imports."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        name = path.stem
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "expertd":
                    found.update(alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").exists())
                elif node.module.startswith("expertd."):
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("expertd."))
        graph[name] = found - {name}
    return graph


def test_no_module_of_the_package_is_over_a_few_hundred_lines():
    sizes = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert {name: lines for name, lines in sizes.items() if lines > MAX_LINES} == {}


def test_nothing_imports_the_master():
    graph = _imports()
    assert sorted(name for name, imported in graph.items() if "master" in imported and name != "main") == []


@pytest.mark.parametrize("module", sorted(WORKER_SIDE))
def test_the_worker_side_imports_nothing_of_the_masters(module):
    graph = _imports()
    if module not in graph:
        pytest.skip(f"no module {module}")
    assert graph[module] & MASTER_SIDE == set()


def test_there_is_no_import_circle():
    graph = _imports()
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        for imported in sorted(graph.get(name, ())):
            if imported in path:
                cycles.append([*path[path.index(imported):], imported])
            elif imported not in done:
                visit(imported, [*path, imported])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert cycles == []


def test_every_module_says_what_it_does_in_a_docstring():
    missing = [path.name for path in PACKAGE.glob("*.py")
               if path.name != "__main__.py" and not ast.get_docstring(ast.parse(path.read_text()))]
    assert missing == []
