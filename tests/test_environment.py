"""The lab's environment: requirements.lock in step with pyproject.toml, the Makefile,
environment.yml and the venv; and the test environment conftest.py sets for every pytest run."""
import os
import re
from importlib import metadata
from pathlib import Path

import huggingface_hub.constants
import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[1]
FIX = "run `make lock` and commit requirements.lock"


def locked() -> list[Requirement]:
    return [Requirement(line) for line in (ROOT / "requirements.lock").read_text().splitlines()
            if line and not line[0].isspace() and not line.startswith("#")]


def pins(name: str) -> set[str]:
    return {str(r.specifier) for r in locked() if canonicalize_name(r.name) == canonicalize_name(name)}


def test_every_pin_is_exact():
    bad = [str(r) for r in locked() if len(r.specifier) != 1 or next(iter(r.specifier)).operator != "=="]
    assert not bad, f"a lock pins exact versions; these do not: {bad}"


def test_lock_covers_pyproject_and_satisfies_its_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    by_name = {}
    for r in locked():
        by_name.setdefault(canonicalize_name(r.name), []).append(next(iter(r.specifier)).version)
    missing = [r.name for r in declared if canonicalize_name(r.name) not in by_name]
    assert not missing, f"pyproject.toml declares {missing}, the lock does not pin them: {FIX}"
    outside = [f"{r.name}=={v} (wants {r.specifier})" for r in declared
               for v in by_name[canonicalize_name(r.name)] if not r.specifier.contains(v, prereleases=True)]
    assert not outside, f"the lock pins versions pyproject.toml rules out: {outside}: {FIX}"


def test_torch_is_pinned_alike_in_makefile_lock_and_environment_yml():
    makefile = re.search(r"^TORCH\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    conda = re.findall(r"^\s*-\s*(torch\S*)\s*$", (ROOT / "environment.yml").read_text(), re.M)
    assert pins("torch") == {makefile.removeprefix("torch")} and conda == [makefile], \
        f"Makefile TORCH={makefile}, lock torch{pins('torch')}, environment.yml {conda}: make them agree"


def test_cuda_libraries_are_left_to_torch():
    """torch pins its CUDA libraries exactly itself; pinning them again would make a CUDA build
    other than PyPI's default (`make setup TORCH=...` with a CUDA index) conflict with the lock."""
    cuda = [r.name for r in locked() if re.match(r"(nvidia-|cuda-|triton$)", canonicalize_name(r.name))]
    assert not cuda, f"CUDA packages in the lock: {cuda}"


def test_environment_yml_and_makefile_install_through_the_lock():
    assert "-c requirements.lock" in (ROOT / "environment.yml").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK\s*\?=\s*requirements\.lock", makefile, re.M)
    assert re.search(r"^\$\(VENV\)/\.installed: pyproject\.toml \$\(LOCK\)", makefile, re.M), \
        "a changed lock must re-install the venv"


def test_installed_versions_are_the_locked_ones():
    drift = []
    for r in locked():
        if r.marker is not None and not r.marker.evaluate():
            continue
        try:
            version = metadata.version(r.name)
        except metadata.PackageNotFoundError:
            continue  # optional extras (llamacpp); a missing dependency is test_envcheck's to report
        if not r.specifier.contains(version, prereleases=True):  # ==2.13.0 accepts 2.13.0+cpu
            drift.append(f"{r.name} {version} (locked {r.specifier})")
    if drift:
        pytest.fail(f"this environment is not the locked one: {drift}. Fix: "
                    f"pip install -c requirements.lock -e '.[dev]' (or rm .venv/.installed && make setup)")


def test_pytest_runs_in_the_test_environment_whoever_starts_it():
    """conftest.py, not the Makefile, sets it: a bare `pytest` (or an IDE) runs the smoke profile
    offline, and early enough for huggingface_hub, which reads HF_HUB_OFFLINE when imported."""
    expected = {"LABKIT_PROFILE": "smoke", "LABKIT_BATCH": "1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    assert {k: os.environ.get(k) for k in expected} == expected
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True, "set after huggingface_hub was imported"
    assert "LABKIT_PROFILE" not in (ROOT / "Makefile").read_text(), "one place for the test environment"
