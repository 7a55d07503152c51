"""What a learner sees in JupyterLab: the notebook list, Run All, figures, and widgets that respond.

Each test drives a real JupyterLab in headless Chromium (see conftest.py); screenshots land in
tests/ui/artifacts/. Run these alone with `make test-ui`.
"""
import re
import time

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]

RUN_ALL_TIMEOUT_S = 240  # smoke budget is 60 s a notebook; the UI and a busy machine add slack


def open_notebook(page, jupyter, name: str) -> None:
    page.goto(jupyter.url(f"/lab/tree/{name}", "reset"))  # reset: no tabs restored from earlier tests
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    wait_kernel_idle(page)


def wait_kernel_idle(page, timeout_s: float = 60) -> None:
    page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]:visible').first.wait_for(
        timeout=timeout_s * 1000)


def run_all(page, timeout_s: float = RUN_ALL_TIMEOUT_S) -> None:
    """Toolbar ⏩ (restart the kernel and run all cells), confirm, then wait until every code
    cell has an execution count."""
    page.locator('.jp-NotebookPanel-toolbar [data-command="notebook:restart-run-all"]').click()
    page.locator(".jp-Dialog .jp-mod-accept").click()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        prompts = page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()
        if prompts and all(re.fullmatch(r"\[\d+\]:", p.strip()) for p in prompts):
            wait_kernel_idle(page)
            return
        time.sleep(1)
    raise AssertionError(f"Run All did not finish in {timeout_s} s; prompts: {prompts}")


def save_and_read(page, jupyter, name: str):
    """Save from the UI, then read the copy JupyterLab wrote (outputs included)."""
    page.keyboard.press("Control+s")
    time.sleep(1.5)
    return nbformat.read(jupyter.root / name, as_version=4)


def error_outputs(nb) -> list[str]:
    return [f"{o.ename}: {o.evalue}" for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.output_type == "error"]


def slider_changes_output(page, output_scope, slider_description: str, timeout_s: float = 30) -> bool:
    """Press → on a slider; True if its readout moved and the image in ``output_scope`` changed."""
    slider = page.locator(".widget-slider", has=page.locator(".widget-label", has_text=slider_description)).first
    readout = slider.locator(".widget-readout")
    before_value = readout.inner_text()
    before_img = output_scope.locator("img").first.get_attribute("src")
    slider.locator(".noUi-handle").first.focus()
    page.keyboard.press("ArrowRight")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        imgs = output_scope.locator("img")
        if readout.inner_text() != before_value and imgs.count() and \
                imgs.first.get_attribute("src") not in (None, before_img):
            return True
        time.sleep(0.3)
    return False


def control_changes_output(page, output_scope, description: str, timeout_s: float = 30) -> bool:
    """Move the control labelled exactly ``description`` — a slider (→ key), a dropdown (the next
    option) or a checkbox (a click) — and return True if its value moved and the image in
    ``output_scope`` changed."""
    label = re.compile(rf"^\s*{re.escape(description)}\s*$")
    slider = page.locator(".widget-slider", has=page.locator(".widget-label", has_text=label))
    dropdown = page.locator(".widget-dropdown", has=page.locator(".widget-label", has_text=label))
    checkbox = page.locator(".widget-checkbox", has=page.locator("span", has_text=label))  # its label is a zero-width space
    imgs = output_scope.locator("img")
    before_img = imgs.first.get_attribute("src") if imgs.count() else None    # a broken callback leaves none
    if slider.count():
        value = slider.first.locator(".widget-readout").inner_text
        before = value()
        slider.first.locator(".noUi-handle").first.focus()
        page.keyboard.press("ArrowRight")
    elif dropdown.count():
        select = dropdown.first.locator("select")
        value, before = select.input_value, select.input_value()
        options = select.locator("option").evaluate_all("os => os.map(o => o.value)")
        select.select_option(options[(options.index(before) + 1) % len(options)])
    elif checkbox.count():
        box = checkbox.first.locator("input[type=checkbox]")
        value, before = box.is_checked, box.is_checked()
        box.click()
    else:
        raise AssertionError(f"no slider, dropdown or checkbox labelled {description!r}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value() != before and imgs.count() and imgs.first.get_attribute("src") not in (None, before_img):
            return True
        time.sleep(0.3)
    return False


def open_scratch_notebook(page, jupyter, name: str, source: str) -> None:
    """Write a one-cell notebook (the lab's kernel) next to the notebook copies and open it."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = nbformat.read(ROOT / "notebooks" / "00_setup_and_tools.ipynb", 4).metadata["kernelspec"]
    nbformat.write(nb, jupyter.root / name)
    open_notebook(page, jupyter, name)


def test_lab_lists_every_curriculum_notebook(page, jupyter):
    page.goto(jupyter.url("/lab/tree"))
    page.wait_for_selector(".jp-DirListing-itemText", timeout=60_000)
    listed = set(page.locator(".jp-DirListing-itemText").all_inner_texts())
    expected = {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert expected and expected <= listed, f"missing from the file browser: {sorted(expected - listed)}"


def test_00_runs_all_renders_figures_and_its_sliders_respond(page, jupyter):
    name = "00_setup_and_tools.ipynb"
    open_notebook(page, jupyter, name)
    run_all(page)
    nb = save_and_read(page, jupyter, name)
    assert error_outputs(nb) == [], f"Run All produced errors: {error_outputs(nb)}"
    images = page.locator(".jp-OutputArea-output img")
    assert images.count() >= 5, f"expected the notebook's figures as images, found {images.count()}"
    widths = images.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
    assert all(w > 0 for w in widths), f"some figures did not render: widths {widths}"
    explorer = page.locator(".widget-interact").first
    explorer.scroll_into_view_if_needed()
    for control in ("layer", "head"):  # every control of the attention explorer
        assert slider_changes_output(page, explorer.locator(".widget-output"), control), \
            f"moving the '{control}' slider did not redraw the attention heatmap"


def test_a_broken_widget_callback_is_caught(page, jupyter):
    """The slider check itself must fail when a callback is broken (else it proves nothing)."""
    open_scratch_notebook(page, jupyter, "ui_broken_callback.ipynb",
        "import ipywidgets as widgets, matplotlib.pyplot as plt\n"
        "def draw(head):\n"
        "    if head > 0:\n"
        "        raise RuntimeError('broken callback')\n"
        "    plt.plot([0, 1], [0, head]); plt.show()\n"
        "w = widgets.interactive(draw, head=widgets.IntSlider(value=0, min=0, max=3, description='head'))\n"
        "display(w)")
    run_all(page)
    explorer = page.locator(".widget-interact").first
    page.wait_for_selector(".widget-interact .widget-output img")
    assert not slider_changes_output(page, explorer.locator(".widget-output"), "head", timeout_s=8), \
        "the slider check passed although the callback raises: it cannot catch broken widgets"


def test_live_training_curves_redraw_while_the_loop_runs(page, jupyter):
    """labkit.LiveCurves (used by the training loops in 01, B1, D1) must update in place, live."""
    open_scratch_notebook(page, jupyter, "ui_live_curves.ipynb",
        "import math, time, labkit\n"
        "live = labkit.LiveCurves(['loss'], title='live', every_seconds=0.3)\n"
        "for step in range(60):\n"
        "    live.update(step, loss=math.exp(-step / 20))\n"
        "    time.sleep(0.1)\n"
        "fig = live.close()")
    page.locator('.jp-NotebookPanel-toolbar [data-command="notebook:restart-run-all"]').click()
    page.locator(".jp-Dialog .jp-mod-accept").click()
    seen, deadline = set(), time.monotonic() + 60
    while time.monotonic() < deadline:
        imgs = page.locator(".jp-OutputArea-output img")
        if imgs.count():
            seen.add(imgs.first.get_attribute("src"))
        if page.locator(".jp-CodeCell .jp-InputArea-prompt").first.inner_text().strip() not in ("[*]:", "[ ]:"):
            break
        time.sleep(0.2)
    assert page.locator(".jp-OutputArea-output img").count() == 1, "live curves must redraw in place, not append"
    assert len(seen) >= 3, f"expected the figure to redraw during the loop, saw {len(seen)} distinct frames"


TRAINING_CELL = (
    "import tempfile, torch, labkit\n"
    "from labkit.data import shakespeare_data\n"
    "from labkit.gpt import GPT, GPTConfig\n"
    "from labkit.runs import Run, load_checkpoint\n"
    "from labkit.train import TrainConfig, train\n"
    "labkit.runtime.choose_threads()   # as labkit.setup does: on a busy 2-core box 2 threads ran 50x slower\n"
    "data = shakespeare_data('char', max_chars=50_000)\n"
    "torch.manual_seed(0)\n"
    "model = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32))\n"
    "cfg = TrainConfig(steps=1_000_000, batch_size=4, block_size=32, eval_every=10**7, eval_batches=1)\n"
    "run = Run.create(tempfile.mkdtemp(), 'ui')\n"
    "live = labkit.LiveCurves(['loss'], every_seconds=0.3, stoppable={stoppable})\n"
    "try:\n"
    "    history = train(model, data, cfg, run=run, callbacks=[live])\n"
    "    print('STOPPED', history.stopped, len(history['loss']))\n"
    "finally:\n"
    "    print('CHECKPOINT', load_checkpoint(run.path)[1]['step'], len(run.rows()))\n")


def start_training(page, jupyter, name: str, stoppable: bool) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(TRAINING_CELL.format(stoppable=stoppable)),
                nbformat.v4.new_code_cell("print('NEXT CELL RAN')")]
    nb.metadata["kernelspec"] = nbformat.read(ROOT / "notebooks" / "00_setup_and_tools.ipynb", 4).metadata["kernelspec"]
    nbformat.write(nb, jupyter.root / name)
    open_notebook(page, jupyter, name)
    page.locator('.jp-NotebookPanel-toolbar [data-command="notebook:restart-run-all"]').click()
    page.locator(".jp-Dialog .jp-mod-accept").click()
    frames, deadline = set(), time.monotonic() + 90
    while len(frames) < 3 and time.monotonic() < deadline:   # training is running: curves redraw
        imgs = page.locator(".jp-OutputArea-output img")
        if imgs.count():
            frames.add(imgs.first.get_attribute("src"))
        time.sleep(0.2)
    assert len(frames) >= 3, f"the live monitor did not redraw while training ({len(frames)} frames)"


def cell_text(page, index: int) -> str:
    # the cell's own output area: an ipywidgets Output inside it is a .jp-OutputArea too
    return page.locator(".jp-CodeCell").nth(index).locator(".jp-Cell-outputArea").inner_text()


def wait_for_text(page, index: int, text: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = cell_text(page, index)
        if text in out:
            return out
        time.sleep(0.3)
    raise AssertionError(f"cell {index} never printed {text!r}; it shows: {cell_text(page, index)[-500:]}")


def test_the_monitor_stop_button_ends_training_with_a_checkpoint(page, jupyter):
    """A click reaches the running cell; training stops after the step, checkpointed; Run All goes on."""
    start_training(page, jupyter, "ui_stop_button.ipynb", stoppable=True)
    page.get_by_role("button", name="Stop training").click()
    out = wait_for_text(page, 0, "CHECKPOINT")
    stopped = re.search(r"STOPPED True (\d+)", out)
    checkpoint = re.search(r"CHECKPOINT (\d+) (\d+)", out)
    assert stopped and checkpoint, f"expected a clean stop and a checkpoint: {out[-400:]}"
    assert int(stopped.group(1)) == int(checkpoint.group(1)) == int(checkpoint.group(2)) > 0, \
        "the checkpoint must hold exactly the steps trained and logged"
    wait_for_text(page, 1, "NEXT CELL RAN")            # the queued cells of Run All still run


def test_the_kernel_interrupt_button_saves_a_resumable_checkpoint(page, jupyter):
    start_training(page, jupyter, "ui_interrupt.ipynb", stoppable=False)
    page.locator('.jp-NotebookPanel-toolbar [data-command="notebook:interrupt-kernel"]').click()
    out = wait_for_text(page, 0, "KeyboardInterrupt")     # the traceback comes after the finally's print
    assert "[labkit] interrupted: checkpoint at step" in out, out[-600:]
    checkpoint = re.search(r"CHECKPOINT (\d+) (\d+)", out)
    assert checkpoint and int(checkpoint.group(1)) == int(checkpoint.group(2)) > 0, out[-400:]


# --- labkit.widgets: every control of every explorer redraws its figure --------------------------

WIDGETS = {
    "explore": ("import matplotlib.pyplot as plt, labkit\n"
                "def draw(n=2, kind='linear', grid=True):\n"
                "    fig, ax = plt.subplots(figsize=(4, 3))\n"
                "    ax.plot(range(10), [x * n if kind == 'linear' else x ** n for x in range(10)])\n"
                "    ax.grid(grid); ax.set_title(f'{kind} {n}')\n"
                "    return fig\n"
                "labkit.explore(draw, n=(1, 5), kind=['linear', 'power'], grid=True)",
                ("n", "kind", "grid")),
    "head_explorer": ("import torch, labkit\n"
                      "p = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)).softmax(-1)\n"
                      "labkit.widgets.head_explorer(p, ['<s>', 'a', 'b', 'c', 'd'])",
                      ("layer", "head", "query")),
    "softmax_explorer": ("import labkit\n"
                         "labkit.widgets.softmax_explorer(lambda q, k, scale: (q @ k.transpose(-2, -1) * scale).softmax(-1),"
                         " n_rows=16)",
                         ("d", "temperature", "scaled")),
    "tokenizer_playground": ("import labkit\n"
                             "labkit.widgets.tokenizer_playground({'bytes': lambda t: [bytes([b]) for b in t.encode()],"
                             " 'words': lambda t: [w.encode() for w in t.split(' ')]}, text='to be or not')",
                             ("tokenizer",)),
    "rope_explorer": ("import torch, labkit\n"
                      "def rope(x, base):\n"
                      "    T, hd = x.shape[-2:]\n"
                      "    ang = torch.arange(T)[:, None] * base ** (-torch.arange(0, hd, 2) / hd)\n"
                      "    a, b = x[..., :hd // 2], x[..., hd // 2:]\n"
                      "    return torch.cat([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1)\n"
                      "def table(T, d, base):\n"
                      "    w = base ** (-torch.arange(0, d, 2) / d)\n"
                      "    p = torch.arange(T)[:, None]\n"
                      "    return torch.stack([torch.sin(p * w), torch.cos(p * w)], -1).reshape(T, d)\n"
                      "labkit.widgets.rope_explorer(rope, table, max_distance=128)",
                      ("base", "head_dim", "distance")),
}


@pytest.mark.parametrize("name", sorted(WIDGETS))
def test_every_control_of_a_labkit_widget_redraws_its_figure(page, jupyter, name):
    source, controls = WIDGETS[name]
    open_scratch_notebook(page, jupyter, f"ui_widget_{name}.ipynb", source)
    run_all(page)
    explorer = page.locator(".widget-interact").first
    page.wait_for_selector(".widget-interact .widget-output img")
    for control in controls:
        assert control_changes_output(page, explorer.locator(".widget-output"), control), \
            f"{name}: moving '{control}' did not redraw the figure"


def test_a_broken_explore_callback_is_caught(page, jupyter):
    """The control check must fail when labkit.explore's draw function raises (else it proves nothing)."""
    open_scratch_notebook(page, jupyter, "ui_broken_explore.ipynb",
        "import matplotlib.pyplot as plt, labkit\n"
        "def draw(n=1, kind='a'):\n"
        "    if n > 1 or kind != 'a':\n"
        "        raise RuntimeError('broken draw')\n"
        "    fig, ax = plt.subplots(); ax.plot([0, n]); return fig\n"
        "labkit.explore(draw, n=(1, 5), kind=['a', 'b'])")
    run_all(page)
    explorer = page.locator(".widget-interact").first
    page.wait_for_selector(".widget-interact .widget-output img")
    for control in ("n", "kind"):
        assert not control_changes_output(page, explorer.locator(".widget-output"), control, timeout_s=6), \
            f"the check passed for '{control}' although draw raises: it cannot catch broken widgets"


def test_show_solution_and_the_self_check_widget_respond(page, jupyter):
    """The exercise check's "Show solution" button reveals the reference; the self-check grades what is typed."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
                    "import torch\nfrom labkit import exercises as ex\n"
                    "def causal_mask(T):\n    return torch.ones(T, T, dtype=torch.bool).tril(-1)\n"
                    "ex.check('03.causal_mask', causal_mask)"),
                nbformat.v4.new_code_cell(
                    "quiz = ex.SelfCheck('99', 'Self-check: ui')\n"
                    "quiz.numeric('eight', 'sqrt(64)?', answer=8.0, tol=0.5, explain='8 * 8 = 64')\n"
                    "quiz.widget()")]
    nb.metadata["kernelspec"] = nbformat.read(ROOT / "notebooks" / "00_setup_and_tools.ipynb", 4).metadata["kernelspec"]
    nbformat.write(nb, jupyter.root / "ui_exercise_buttons.ipynb")
    open_notebook(page, jupyter, "ui_exercise_buttons.ipynb")
    run_all(page)
    first = page.locator(".jp-CodeCell").nth(0)
    assert "off by one" in cell_text(page, 0), "the wrong mask should get its hint"
    assert "def causal_mask" not in cell_text(page, 0), "the solution must start hidden"
    first.get_by_role("button", name="Show solution").click()
    wait_for_text(page, 0, "def causal_mask")
    wait_for_text(page, 0, "Typical mistakes")
    second = page.locator(".jp-CodeCell").nth(1)
    second.locator("input[type=text]").fill("7")
    second.get_by_role("button", name="Check my answers").click()
    out = wait_for_text(page, 1, "0/1 right")
    assert "Why: 8 * 8 = 64" in out, out[-300:]
    second.locator("input[type=text]").fill("8")
    second.get_by_role("button", name="Check my answers").click()
    wait_for_text(page, 1, "1/1 right ✓")
