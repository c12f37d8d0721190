"""environment.yaml must list exactly the dependencies of pyproject.toml (plus the dev extra)."""
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
