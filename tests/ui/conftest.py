"""A real JupyterLab in a real (headless) Chromium, for the interactive side of the lab.

One JupyterLab server per test session, on a free loopback port with a random token and its
own config/runtime/settings dirs (news pop-up off). It serves *copies* of the notebooks with
their outputs cleared, so autosave never touches the committed files and every figure a test
sees was drawn by that test's run, and runs kernels in the smoke profile with
outputs under a temporary directory. Kernels are shut down after every test.

Chromium comes from Debian (`make setup` apt-installs it where it can); Playwright's own
browser download is never used. Without a Chromium the UI tests skip with one message.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"   # screenshots; git-ignored
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    for candidate in (os.environ.get("LABKIT_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


CHROMIUM = find_chromium()
if CHROMIUM is None:
    pytest.skip("UI tests skipped: no Chromium found (make setup apt-installs Debian's chromium "
                "where it can; or set LABKIT_CHROMIUM=/path/to/chromium)", allow_module_level=True)
playwright_sync = pytest.importorskip("playwright.sync_api", reason="UI tests need playwright (make setup)")


def strip_outputs(path: Path) -> None:
    """Clear a notebook copy's outputs and execution counts. The committed notebooks carry the
    full-profile outputs ([1]:, [2]: ... and their figures): left in, a test could mistake them
    for the results of a Run All that had not started yet (the likely cause of a CI run that
    found no figures after Run All)."""
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    path.write_text(json.dumps(nb, indent=1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """A running JupyterLab server: ``url(path)``, ``api(method, path)``, ``root`` (the notebook copies)."""

    def __init__(self, tmp: Path):
        self.root = tmp / "notebooks"
        shutil.copytree(ROOT / "notebooks", self.root,
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        for copy in self.root.glob("*.ipynb"):
            strip_outputs(copy)
        self.port, self.token = free_port(), os.urandom(16).hex()
        # No news pop-up; start the notebook's own kernel without asking; render every cell
        # (JupyterLab's default windowing attaches only visible cells to the page).
        for plugin, values in {
                "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
                "notebook-extension/tracker": {"autoStartDefaultKernel": True, "windowingMode": "none"},
        }.items():
            path = tmp / "settings" / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env = dict(os.environ,
                   JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
                   JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"),
                   JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
                   LABKIT_PROFILE="smoke", LABKIT_OUT=str(tmp / "out"), HF_HUB_OFFLINE="1")
        env.pop("LABKIT_BATCH", None)  # this is an interactive session: live plots are live
        env.pop("MPLBACKEND", None)    # let ipykernel use its inline backend, as for a learner
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={self.port}",
               "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root}", "--ServerApp.open_browser=False"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        self.log = open(tmp / "jupyterlab.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.api("GET", "/api/status")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start; see {tmp / 'jupyterlab.log'}")
                time.sleep(0.3)

    def url(self, path: str, query: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}?token={self.token}{'&' + query if query else ''}"

    def api(self, method: str, path: str):
        req = urllib.request.Request(self.url(path), method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        for k in self.api("GET", "/api/kernels"):
            self.api("DELETE", f"/api/kernels/{k['id']}")

    def stop(self) -> None:
        try:
            self.shutdown_kernels()
        except OSError:
            pass
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="session")
def jupyter(tmp_path_factory):
    server = JupyterLab(tmp_path_factory.mktemp("jupyterlab"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser():
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, jupyter, request):
    """A fresh browser page; kernels are shut down and a screenshot saved after each test."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=False)
    finally:
        context.close()
        jupyter.shutdown_kernels()
