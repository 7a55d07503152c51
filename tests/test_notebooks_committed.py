"""Static checks on the committed notebooks (fast; nbval executes them separately)."""
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_profile_is_left_to_the_environment(path):
    """A papermill-injected `PROFILE = "full"` cell would make `make test` run the full profile."""
    nb = nbformat.read(path, as_version=4)
    tags = [t for c in nb.cells for t in c.metadata.get("tags", [])]
    assert "injected-parameters" not in tags, \
        f"{path.name} was committed with papermill's injected-parameters cell: delete that cell"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "PROFILE = None" in params[0].source, \
        f"{path.name} needs one cell tagged 'parameters' with `PROFILE = None`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_executed_without_errors(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code if c.source.strip()), \
        f"{path.name} is committed partly unexecuted: run it (full profile) before committing"
    errors = [o.get("ename") for c in code for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{path.name} is committed with error outputs: {errors}"
