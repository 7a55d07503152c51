"""`make run`'s runner: executed copies + a summary, failures reported, notebooks never overwritten."""
import json
import os

import nbformat
import pytest

from labkit import runner


def write_notebook(path, source):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('PROFILE = None')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_run_writes_executed_copies_and_summary(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    write_notebook(nbs / "good.ipynb", "from labkit.runtime import resolve_profile\n"
                   "print('ran', resolve_profile(PROFILE))")
    write_notebook(nbs / "bad.ipynb", "raise ValueError('broken on purpose')")
    out = tmp_path / "out"
    code = runner.main(["--profile", "smoke", "--out", str(out), "--kernel", "python3",
                        str(nbs / "good.ipynb"), str(nbs / "bad.ipynb")])
    assert code == 1, "a failing notebook makes the run fail"
    summary = {r["notebook"]: r for r in json.loads((out / "summary.json").read_text())}
    assert summary["good.ipynb"]["passed"] and not summary["bad.ipynb"]["passed"]
    assert "broken on purpose" in summary["bad.ipynb"]["error"]
    executed = nbformat.read(out / "good.ipynb", as_version=4)
    assert "ran smoke" in executed.cells[1].outputs[0].text, "the profile reaches the kernel by env"
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells), \
        "the executed copy must stay profile-neutral (no papermill-injected PROFILE cell)"
    assert "| bad.ipynb | smoke |" in (out / "summary.md").read_text()
    assert "ran smoke" not in (nbs / "good.ipynb").read_text(), "sources are never overwritten"


def test_run_refuses_to_write_over_the_notebooks(tmp_path):
    write_notebook(tmp_path / "a.ipynb", "1")
    with pytest.raises(SystemExit):
        runner.main(["--out", str(tmp_path), str(tmp_path / "a.ipynb")])


def test_run_sets_the_kernels_environment_without_leaking_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_PROFILE", "full")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("LABKIT_BATCH", raising=False)
    write_notebook(tmp_path / "env.ipynb", "import os\nfor k in ('LABKIT_PROFILE', 'LABKIT_BATCH', "
                   "'MPLBACKEND'):\n    print(k, os.environ.get(k))")
    out = tmp_path / "out"
    assert runner.main(["--profile", "smoke", "--out", str(out), "--kernel", "python3",
                        str(tmp_path / "env.ipynb")]) == 0
    seen = nbformat.read(out / "env.ipynb", as_version=4).cells[1].outputs[0].text.split("\n")
    assert seen[:2] == ["LABKIT_PROFILE smoke", "LABKIT_BATCH 1"], "the asked profile, in batch mode"
    assert seen[2].startswith("MPLBACKEND") and "inline" in seen[2], \
        f"figures need ipykernel's inline backend, not the caller's Agg; the kernel saw {seen[2]}"
    assert (os.environ["LABKIT_PROFILE"], os.environ["MPLBACKEND"]) == ("full", "Agg")
    assert "LABKIT_BATCH" not in os.environ, "the runner's settings must not outlive the run"
