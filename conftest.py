"""The test environment, in one place: `pytest`, `make test` and an IDE's test button all run
the lab the same way (smoke profile, batch mode, offline).

Set here, when pytest imports this file: before any test module imports labkit or
transformers (huggingface_hub reads HF_HUB_OFFLINE once, when it is imported), and in
``os.environ``, so the Jupyter kernels that nbval starts for the notebooks inherit it too.
The values are set, not defaulted: a LABKIT_PROFILE=full left in a shell would otherwise run
every notebook test in the full profile.
"""
import os

TEST_ENV = {
    "LABKIT_PROFILE": "smoke",               # tiny sizes: each notebook within its 60 s budget
    "LABKIT_BATCH": "1",                     # live plots degrade to one static figure
    "HF_HUB_OFFLINE": "1",                   # no hub traffic: models come from the asset cache
    "TRANSFORMERS_OFFLINE": "1",
    "MPLBACKEND": "Agg",                     # no display
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",   # no debugger "frozen modules" warning in each kernel
}
os.environ.update(TEST_ENV)


# Where the time goes, per file: nbval reports one item per notebook cell, so pytest's own
# --durations cannot say which notebook is slow. The budget is 60 s per notebook in smoke.
_seconds_per_file: dict = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    _seconds_per_file[path] = _seconds_per_file.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if not _seconds_per_file:
        return
    slowest = sorted(_seconds_per_file.items(), key=lambda kv: -kv[1])
    terminalreporter.write_sep("=", f"seconds per file (slowest 25 of {len(slowest)}; "
                                    f"total {sum(_seconds_per_file.values()):.0f} s)")
    for path, seconds in slowest[:25]:
        terminalreporter.write_line(f"{seconds:8.1f} s  {path}")


def pytest_collection_modifyitems(items):
    """The browser tests last: their JupyterLab server and Chromium live for the rest of the session
    (session fixtures), and started first they would share the CPU with every notebook test after them."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/ui/"))   # stable: the order is kept otherwise
