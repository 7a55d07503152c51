"""Plot helpers: shape checks, saved PNGs, live curves that degrade to one static figure."""
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from labkit.plotting import LiveCurves, heatmap, plot_curves, save_figure

matplotlib.use("Agg")


def test_heatmap_accepts_tensors_and_checks_labels():
    fig, ax = plt.subplots()
    im = heatmap(ax, torch.eye(3), xlabels=list("abc"), ylabels=list("abc"), annotate=True)
    assert im.get_array().shape == (3, 3)
    colours = {t.get_text(): t.get_color() for t in ax.texts}
    assert colours == {"1.00": "black", "0.00": "white"}, "dark cells get white text, light cells black"
    fig, ax = plt.subplots()
    heatmap(ax, np.array([[np.nan, 1.0]]), annotate=True)
    assert [t.get_text() for t in ax.texts] == ["NaN", "1.00"]
    with pytest.raises(ValueError, match="needs a 2-D matrix"):
        heatmap(ax, np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="2 labels for an axis of length 3"):
        heatmap(ax, np.zeros((3, 3)), xlabels=["a", "b"])


def test_plot_curves_smooths_and_labels():
    fig, ax = plt.subplots()
    zigzag = np.array([0.0, 3.0, 0.0, 3.0, 0.0, 3.0])
    plot_curves(ax, {"a": (range(6), zigzag), "b": (range(6), np.ones(6))}, smooth=3, logy=True)
    labelled = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert list(labelled) == ["a", "b"] and ax.get_yscale() == "log"
    a = labelled["a"]
    np.testing.assert_allclose(a.get_ydata(), [1.0, 2.0, 1.0, 2.0], err_msg="running mean over 3 points")
    np.testing.assert_allclose(a.get_xdata(), [2, 3, 4, 5], err_msg="each mean sits at its window's last step")
    raw = [line for line in ax.get_lines() if line.get_alpha() == 0.25]
    assert len(raw) == 2 and np.array_equal(raw[0].get_ydata(), zigzag), "the raw curve stays, faint"
    assert raw[0].get_color() == a.get_color()


def test_save_figure_writes_png(tmp_path):
    fig, ax = plt.subplots()
    path = save_figure(fig, tmp_path / "a" / "b.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_live_curves_in_batch_keep_history_and_draw_once(monkeypatch):
    monkeypatch.setenv("LABKIT_BATCH", "1")
    live = LiveCurves(panels={"loss": ["loss", "val_loss"], "lr": ["lr"]}, title="t")
    assert not live.live
    for step in range(5):
        live.update(step, loss=1.0 / (step + 1), lr=1e-3, val_loss=None if step % 2 else 0.5)
    fig = live.close()
    assert live.history["loss"][0] == [0, 1, 2, 3, 4]
    assert live.history["val_loss"][0] == [0, 2, 4]
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 1]
    with pytest.raises(ValueError, match="needs metrics"):
        LiveCurves()
