"""One look for every figure in the lab: a seaborn theme, heatmaps, curves, live curves.

    fig, ax = plt.subplots()
    heatmap(ax, weights, xlabels=tokens, ylabels=tokens, title="Who attends to whom?")
    plot_curves(ax, {"train": (steps, loss)}, xlabel="step", ylabel="loss (nats)")
    lab.save_figure(fig, "attention")                     # figures/<notebook>/attention.png

Figures answer one question each: put the question in the title and units on the axes.
"""
from __future__ import annotations

import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .runtime import in_batch_run  # noqa: F401  (also importable from here, as notebooks did)

PALETTE = "colorblind"


def set_theme() -> None:
    """The lab's seaborn theme: white grid, colour-blind palette, readable at notebook width."""
    import seaborn as sns
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    plt.rcParams.update({"figure.figsize": (7.5, 4.2), "figure.dpi": 90, "axes.titlesize": 12,
                         "axes.titleweight": "bold", "savefig.bbox": "tight"})


def heatmap(ax, matrix, xlabels=None, ylabels=None, title: str = "", cmap: str = "viridis",
            vmin=None, vmax=None, annotate: bool = False, colorbar: bool = True, fmt: str = ".2f"):
    """Draw a 2-D array (tensor or ndarray) with optional tick labels; returns the image.

    Labels are shown only when there are at most 48 of them (more are unreadable).
    """
    m = np.asarray(matrix.detach().cpu() if hasattr(matrix, "detach") else matrix, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D matrix, got shape {m.shape}")
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    for labels, set_ticks, set_labels, n, rot in (
            (xlabels, ax.set_xticks, ax.set_xticklabels, m.shape[1], 90),
            (ylabels, ax.set_yticks, ax.set_yticklabels, m.shape[0], 0)):
        if labels is not None:
            if len(labels) != n:
                raise ValueError(f"{len(labels)} labels for an axis of length {n}")
            if n <= 48:
                set_ticks(range(n))
                set_labels([str(s) for s in labels], rotation=rot, fontsize=8)
    if annotate:  # text colour from the cell's own luminance, so it reads on any colormap
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isnan(m[i, j]):
                    ax.text(j, i, "NaN", ha="center", va="center", fontsize=7, color="red")
                    continue
                r, g, b, _ = im.cmap(im.norm(m[i, j]))
                ax.text(j, i, format(m[i, j], fmt), ha="center", va="center", fontsize=7,
                        color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
    ax.grid(False)
    if title:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return im


def plot_curves(ax, curves: dict, xlabel: str = "step", ylabel: str = "", title: str = "",
                logx: bool = False, logy: bool = False, smooth: int = 1, marker=None):
    """Plot named ``(x, y)`` series on one axis; ``smooth`` > 1 adds a running mean over that window.

    >>> fig, ax = plt.subplots()
    >>> plot_curves(ax, {"train": ([0, 1, 2], [3.0, 2.0, 1.5])}, ylabel="loss")
    >>> [line.get_label() for line in ax.get_lines()]
    ['train']
    """
    for name, (x, y) in curves.items():
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if smooth > 1 and len(y) >= smooth:
            raw = ax.plot(x, y, alpha=0.25, linewidth=1)[0]
            ys = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            ax.plot(x[smooth - 1:], ys, label=name, color=raw.get_color(), marker=marker)
        else:
            ax.plot(x, y, label=name, marker=marker)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(curves) > 1:
        ax.legend(frameon=False)


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG to ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


class LiveCurves:
    """Training curves that redraw while a loop runs in JupyterLab; one static plot in batch runs.

    live = LiveCurves(["loss", "lr"], title="Is it learning?")
    for step in range(100):
        live.update(step, loss=loss, lr=lr)     # redraws at most every 0.5 s
    fig = live.close()                          # the final figure

    Each metric gets its own panel; a metric updated only sometimes (e.g. ``val_loss``)
    can share a panel with another by passing ``panels={"loss": ["loss", "val_loss"]}``.

    It is a training-loop callback: ``labkit.train.train(..., callbacks=[live])`` calls
    ``live.on_step(step, row)`` after every step (= ``update`` with the row's metrics), and
    ``close()`` at the end.

    ``stoppable=True`` adds a Stop button (live only). A running cell normally cannot see a
    click until it finishes, so ``update`` processes pending widget events (jupyter-ui-poll)
    and ``stop_requested`` turns True; ``train`` then ends after the current step and saves a
    resumable checkpoint.
    """

    def __init__(self, metrics: list[str] | None = None, panels: dict[str, list[str]] | None = None,
                 title: str = "", xlabel: str = "step", every_seconds: float = 0.5,
                 live: bool | None = None, stoppable: bool = False):
        self.panels = panels or {m: [m] for m in (metrics or [])}
        if not self.panels:
            raise ValueError("LiveCurves needs metrics=[...] or panels={...}")
        self.title, self.xlabel = title, xlabel
        self.every_seconds = every_seconds
        self.live = (not in_batch_run()) if live is None else live
        self.history: dict[str, tuple[list, list]] = {}
        self._last_draw = 0.0
        self._handle = None
        n = len(self.panels)
        self.fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
        self.axes = dict(zip(self.panels, axes[0]))
        plt.close(self.fig)  # drawn on demand, not by the inline backend at cell end
        self.stop_button = self._poll = self._events = None
        if stoppable and self.live:
            import ipywidgets as widgets
            from IPython.display import display
            self.stop_button = widgets.ToggleButton(description="Stop training", icon="stop",
                                                    button_style="danger", tooltip="finish this step, "
                                                    "save a checkpoint and stop")
            display(self.stop_button)

    @property
    def stop_requested(self) -> bool:
        """True once the Stop button was clicked (always False in batch runs)."""
        if self.stop_button is None:
            return False
        self._process_clicks()
        return bool(self.stop_button.value)

    def _process_clicks(self) -> None:
        if time.monotonic() - getattr(self, "_last_poll", 0.0) < 0.2:   # a click needs no faster
            return
        self._last_poll = time.monotonic()
        if self._poll is None:
            from jupyter_ui_poll import ui_events
            self._events = ui_events()
            self._poll = self._events.__enter__()
        self._poll(10)

    def update(self, step: int, **values: float) -> None:
        for name, v in values.items():
            if v is None:
                continue
            xs, ys = self.history.setdefault(name, ([], []))
            xs.append(step)
            ys.append(float(v))
        if self.live and time.monotonic() - self._last_draw >= self.every_seconds:
            self._show()

    def on_step(self, step: int, row: dict) -> None:
        """The training-loop callback: plot this step's row (``update`` with its values)."""
        self.update(step, **{k: v for k, v in row.items() if k != "step"})

    def _draw(self) -> None:
        for panel, ax in self.axes.items():
            ax.clear()
            curves = {m: self.history[m] for m in self.panels[panel] if m in self.history}
            plot_curves(ax, curves, xlabel=self.xlabel, title=panel)
        if self.title:
            self.fig.suptitle(self.title, fontweight="bold")
        self.fig.tight_layout()

    def _show(self) -> None:
        from IPython.display import display
        self._draw()
        if self._handle is None:
            self._handle = display(self.fig, display_id=True)
        else:
            self._handle.update(self.fig)
        self._last_draw = time.monotonic()

    def close(self):
        """Draw the final state once (in place when live, else as one output) and return the figure."""
        if self._events is not None:
            self._events.__exit__(None, None, None)
            self._poll = self._events = None
        if self.stop_button is not None:
            self.stop_button.disabled = True
            self.stop_button.description = "stopped" if self.stop_button.value else "finished"
        self._draw()
        if self._handle is not None:
            self._handle.update(self.fig)
        else:
            from IPython import get_ipython
            if get_ipython() is not None:
                from IPython.display import display
                display(self.fig)
        return self.fig
