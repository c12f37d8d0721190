"""Packaging: environment.yaml lists the dependencies of pyproject.toml, and every module imports."""
import re
from pathlib import Path

from configs.schema import tomllib

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=\[; ]", requirement.strip().strip('"'), maxsplit=1)[0].lower()


def test_environment_yaml_mirrors_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] if "python_version" not in r}
    wanted |= {_name(r) for r in project["optional-dependencies"]["dev"]}
    lines = (REPO / "environment.yaml").read_text().splitlines()
    pip_section = lines[next(i for i, line in enumerate(lines) if line.strip() == "- pip:") + 1:]
    listed = {_name(line.strip()[2:]) for line in pip_section if line.strip().startswith("- ")}
    listed.discard("-e")
    assert listed == wanted


def test_every_module_of_the_project_imports():
    """A name moved between modules breaks the module that still imports it by its old place;
    many of them run only in child processes (deployment, simulation), so import each here."""
    import importlib
    import pkgutil

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    names = list(project["tool"]["setuptools"]["py-modules"])
    for package in packages:
        module = importlib.import_module(package)
        names += [info.name for info in pkgutil.walk_packages(module.__path__, package + ".")]
    names += [f"benchmarks.{p.stem}" for p in (REPO / "benchmarks").glob("*.py")]
    failures = {}
    for name in sorted(set(names)):
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - each failure is reported by module name
            failures[name] = f"{type(err).__name__}: {err}"
    assert not failures, failures
    assert len(names) > 60  # the walk found the modules
