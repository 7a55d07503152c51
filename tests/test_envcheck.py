"""The environment check reads the one dependency list in pyproject.toml."""
import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
from pathlib import Path

from packaging.requirements import Requirement

from labkit.envcheck import DependencyStatus, check_environment, format_report


def test_checked_list_is_the_pyproject_list():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    assert {r.name for r in check_environment()} == declared


def test_everything_is_installed_in_the_lab_venv():
    rows = check_environment()
    assert all(r.ok for r in rows), format_report(rows)


def test_report_names_the_fix():
    text = format_report([DependencyStatus("torch", ">=2.4", "2.13.0", True),
                          DependencyStatus("gguf", ">=0.17", None, False)])
    assert "[FAIL] gguf" in text and "missing" in text and "make setup" in text
