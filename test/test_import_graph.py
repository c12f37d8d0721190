"""The project's modules import each other without a cycle.

Every ``import`` statement of every project source counts: at module level, inside functions
and under ``if TYPE_CHECKING:`` alike (a cycle that only lazy imports hide still ties the
modules together). The graph is built from the sources, so the test needs no import to work.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmarks", "clients", "configs", "dataloaders", "deployment", "losses",
            "methods", "networks", "strategies")
TOP_LEVEL = ("flower_runner", "test_client", "preflight")


def project_modules() -> Dict[str, Path]:
    found: Dict[str, Path] = {name: REPO / f"{name}.py" for name in TOP_LEVEL
                              if (REPO / f"{name}.py").is_file()}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: Set[str]) -> Set[str]:
    """The project modules ``module`` imports (``from pkg import mod`` counts ``pkg.mod``
    when that is a module, else ``pkg``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    targets: Set[str] = set()
    for node in ast.walk(tree):
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        for name in names:
            while name and name not in known:  # a name inside a module: the module
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``graph`` as a list of modules (first repeated last), or []."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_finder_sees_a_cycle_and_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_relative_and_lazy_imports_are_edges(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n"
                      "def f():\n    from pkg import c\n")
    known = {"pkg", "pkg.m", "pkg.b", "pkg.c"}
    assert imports_of("pkg.m", source, known) == {"pkg.b", "pkg.c"}


def test_no_import_cycle_among_the_project_modules():
    modules = project_modules()
    assert "methods.registry" in modules and "flower_runner" in modules
    known = set(modules)
    graph = {name: imports_of(name, path, known) for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)
