"""Size limits of the command line: ``flower_runner.py`` is the flags and a dispatch table."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def function_lengths(path: Path):
    tree = ast.parse(path.read_text())
    return {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_flower_runner_is_small():
    path = REPO / "flower_runner.py"
    assert len(path.read_text().splitlines()) < 300
    long = {name: n for name, n in function_lengths(path).items() if n > 60}
    assert not long, f"functions over 60 lines in flower_runner.py: {long}"


def test_flower_runner_imports_at_the_top():
    tree = ast.parse((REPO / "flower_runner.py").read_text())
    nested = [node.lineno for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef,))
              for inner in ast.walk(node) if isinstance(inner, (ast.Import, ast.ImportFrom))]
    assert not nested, f"imports inside functions of flower_runner.py at lines {nested}"


def test_the_measure_sees_a_long_function(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n" + "    x = 1\n" * 70 + "def g():\n    return 1\n")
    assert function_lengths(source) == {"f": 71, "g": 2}
