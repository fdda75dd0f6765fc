"""environment.yml pins exactly what pyproject.toml pins; the README shows the two commands; CI calls the test command."""
import re
import tomllib

import yaml

from conftest import ROOT


def test_environment_yml_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = set(py["project"]["dependencies"]) | set(py["project"]["optional-dependencies"]["test"]) \
        | set(py["project"]["optional-dependencies"]["lab"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(p for p in pip if "==" in p) == pins


def test_readme_and_ci_use_the_same_commands():
    readme = (ROOT / "README.md").read_text()
    assert "./run_all.sh" in readme and "./run_tests.sh" in readme
    assert re.search(r"^\./run_tests\.sh", (ROOT / ".ci" / "run").read_text(), re.M)
