"""Things a learner plays with in JupyterLab: controls that redraw a figure, progress bars.

    labkit.explore(draw, layer=(0, 29), head=(0, 8))     # sliders; draw(layer=0, head=0) -> Figure
    labkit.widgets.head_explorer(patterns, tokens)       # attention per layer/head over tokens (B1)
    labkit.widgets.softmax_explorer(weights)             # temperature and 1/sqrt(d) (03)
    labkit.widgets.tokenizer_playground(tokenizers)      # where each tokenizer cuts a text (01)
    labkit.widgets.rope_explorer(rope, sinusoidal)       # RoPE's and the sinusoids' clocks (02)
    for batch in labkit.progress(batches, desc="eval"):  # a bar in JupyterLab, silent in batch runs
        ...

Everything works offline: ipywidgets controls and inline PNG figures, no JavaScript from a
CDN (bertviz's views load d3 and require.js from one, so they are blank without network).
The concept stays in the notebook: a widget factory takes the notebook's own by-hand function
(or its measured tensors) and only does the plumbing — controls, redraws, layout.

In batch runs (``make run``, ``make test``: ``$LABKIT_BATCH=1``) no widget is created: the
figure is drawn once with the default values, so a committed notebook shows it.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Iterable, Sequence

import matplotlib.pyplot as plt
import torch

from .plotting import heatmap, in_batch_run


def progress(iterable: Iterable, desc: str | None = None, total: int | None = None,
             live: bool | None = None, **tqdm_kwargs):
    """``iterable`` with a progress bar in JupyterLab (tqdm.auto); the iterable itself in batch runs.

    For notebook loops that take more than ~10 s and are not ``labkit.train`` (which has its own
    bar). ``live`` forces the choice (default: a bar unless ``in_batch_run()``).

    >>> list(progress(range(3), desc="steps", live=False))
    [0, 1, 2]
    """
    if not ((not in_batch_run()) if live is None else live):
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, **tqdm_kwargs)


class Explorer:
    """What ``explore`` made: ``widget`` (the ipywidgets ``interactive``; None in batch runs),
    ``values`` (the controls' current values) and ``figure`` (the last figure drawn)."""

    def __init__(self, draw: Callable, values: dict, widget=None):
        self.draw, self.values, self.widget, self.figure = draw, dict(values), widget, None
        self.redraws = 0

    def _ipython_display_(self):
        """``explore`` has already displayed the widget (or the figure): a cell ending with the
        call must not show it a second time."""

    def __repr__(self) -> str:
        return f"Explorer({getattr(self.draw, '__name__', 'draw')}, {self.values}, live={self.widget is not None})"


def explore(draw: Callable, *, live: bool | None = None, **controls) -> Explorer:
    """Controls that redraw ``draw(**values) -> Figure`` in place on every change.

    ``controls`` are ipywidgets' ``interact`` abbreviations — ``(0, 29)`` an int slider,
    ``(0.1, 5.0, 0.1)`` a float slider, ``["a", "b"]`` or ``[("label", value), ...]`` a dropdown,
    ``True`` a checkbox — or ready-made ipywidgets. Every controlled parameter of ``draw`` needs a
    default (``def draw(layer=0, head=0)``): the controls start there, and in batch runs the
    figure is drawn once with those defaults and no widget is created. ``draw`` returns the
    figure (or draws on the current one); labkit displays it and closes it.

    >>> def draw(power=2):
    ...     fig, ax = plt.subplots(); ax.plot([0, 1, 2], [0, 1, 2 ** power]); return fig
    >>> e = explore(draw, power=(1, 4), live=False)
    >>> e.values, e.redraws
    ({'power': 2}, 1)
    """
    sig = inspect.signature(draw)
    unknown = sorted(set(controls) - set(sig.parameters))
    if unknown:
        raise TypeError(f"explore: {getattr(draw, '__name__', 'draw')}() has no parameter {unknown}; "
                        f"its parameters are {list(sig.parameters)}")
    defaults = {}
    for name, control in controls.items():
        default = sig.parameters[name].default
        if hasattr(control, "value") and hasattr(control, "observe"):   # a ready-made ipywidget
            default = control.value
        if default is inspect.Parameter.empty:
            raise TypeError(f"explore: give {getattr(draw, '__name__', 'draw')}() a default for {name!r} "
                            f"(def draw({name}=...)): the control starts there, and batch runs draw it once")
        defaults[name] = default
    handle = Explorer(draw, defaults)

    def redraw(**values):
        handle.values.update(values)
        fig = draw(**{**defaults, **values})
        fig = fig if isinstance(fig, plt.Figure) else plt.gcf()
        handle.figure, handle.redraws = fig, handle.redraws + 1
        from IPython import get_ipython
        if get_ipython() is not None:
            from IPython.display import display
            display(fig)
        plt.close(fig)          # else the inline backend shows it a second time

    if not ((not in_batch_run()) if live is None else live):
        redraw()
        return handle
    import ipywidgets as widgets
    from IPython.display import display
    # Only the controlled parameters become widgets (interactive would make one for every
    # parameter with a default); each starts at draw's default.
    params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d) for n, d in defaults.items()]
    wrapper = functools.wraps(draw)(lambda **values: redraw(**values))
    del wrapper.__wrapped__
    wrapper.__signature__ = inspect.Signature(params)
    handle.widget = widgets.interactive(wrapper, **controls)
    for w in handle.widget.kwargs_widgets:
        if hasattr(w, "continuous_update"):          # redraw when a drag ends, not at every pixel
            w.continuous_update = False
        if hasattr(getattr(w, "style", None), "description_width"):
            w.style.description_width = "initial"    # the whole name, not "temperat..."
    display(handle.widget)
    return handle


def _layers_heads(patterns) -> torch.Tensor:
    """(layer, head, T, T) from a tensor of that shape or a sequence of per-layer (head, T, T)
    or (1, head, T, T) tensors (what bertviz takes: HF ``output_attentions``)."""
    if isinstance(patterns, (list, tuple)):
        patterns = torch.stack([torch.as_tensor(p).reshape(p.shape[-3:]) for p in patterns])
    p = torch.as_tensor(patterns).detach().float().cpu()
    while p.ndim > 4 and p.shape[1] == 1:        # a cache.stack(...) of one sequence: (layer, 1, head, T, T)
        p = p[:, 0]
    if p.ndim != 4 or p.shape[-1] != p.shape[-2]:
        raise ValueError(f"head_explorer needs attention patterns (layer, head, T, T), or a list of "
                         f"(head, T, T) per layer; got shape {tuple(p.shape)}")
    return p


def head_explorer(patterns, tokens: Sequence[str], *, layer: int = 0, head: int = 0,
                  title: str = "Where does each token look?", live: bool | None = None) -> Explorer:
    """Attention weights per layer and head over the tokens, with one query's row as bars.

    ``patterns``: (layer, head, T, T) weights the notebook measured (e.g.
    ``cache.stack("attn.hook_pattern")[:, 0]``), or HF's per-layer tuple; ``tokens``: T labels.
    Controls: layer, head and the query token (its row is outlined and drawn as bars below).
    This replaces bertviz's head view, which needs a CDN and is blank offline.
    """
    p = _layers_heads(patterns)
    n_layer, n_head, T, _ = p.shape
    tokens = [str(t) for t in tokens]
    if len(tokens) != T:
        raise ValueError(f"head_explorer: {len(tokens)} tokens for patterns over {T} positions")
    queries = [(f"{i}: {t!r}", i) for i, t in enumerate(tokens)]

    def draw(layer=layer, head=head, query=T - 1):
        """Heatmap of one head's (T, T) weights, the chosen query's row outlined, and that row as bars."""
        w = p[layer, head]                                            # (T, T): row = query, column = key
        fig, (ax, bars) = plt.subplots(2, 1, figsize=(7.5, 8.2), layout="constrained",
                                       gridspec_kw={"height_ratios": [3, 1.1]})
        im = heatmap(ax, w, xlabels=tokens, ylabels=tokens, vmin=0, vmax=1, colorbar=False,
                     title=f"{title} (layer {layer}, head {head})")
        fig.colorbar(im, ax=[ax, bars], fraction=0.04, pad=0.02, label="attention weight")  # one bar: x stays aligned
        ax.add_patch(plt.Rectangle((-0.5, query - 0.5), T, 1, fill=False, ec="red", lw=2))
        ax.set_xlabel("key (attended to)"); ax.set_ylabel("query (attending)")
        top = int(w[query].argmax())
        bars.bar(range(T), w[query].numpy(), color="C0")
        bars.set_xlim(-0.5, T - 0.5); bars.set_ylim(0, 1); bars.set_ylabel("weight")
        bars.set_xticks(range(T)); bars.set_xticklabels(tokens if T <= 48 else [], rotation=90, fontsize=8)
        bars.set_title(f"query {query} {tokens[query]!r} (red row): top key {top} {tokens[top]!r} "
                       f"({w[query, top]:.2f})", fontsize=10)
        return fig

    return explore(draw, live=live, layer=(0, n_layer - 1), head=(0, n_head - 1), query=queries)


def softmax_explorer(weights: Callable, *, n_keys: int = 16, dims: Sequence[int] = tuple(2 ** i for i in range(1, 11)),
                     d: int = 64, temperature: float = 1.0, n_rows: int = 256, seed: int = 0,
                     live: bool | None = None) -> Explorer:
    """How the head size d, the 1/sqrt(d) scale and a temperature shape attention weights.

    ``weights(q, k, scale) -> (..., Tq, Tk)`` is the notebook's own by-hand attention weights,
    e.g. ``lambda q, k, scale: softmax(q @ k.transpose(-2, -1) * scale)``. The explorer draws
    unit-variance random q (n_rows, 1, d) and k (n_rows, n_keys, d) per head size (fixed by
    ``seed``) and calls it with ``scale = (1/sqrt(d) if scaled else 1) / temperature``. Left: one
    query's weights over the keys; right: mean entropy over ``n_rows`` queries vs d, scaled and
    unscaled, at this temperature. Controls: d, temperature, divide by sqrt(d).
    """
    dims = list(dims)
    if d not in dims:
        raise ValueError(f"softmax_explorer: d={d} is not one of dims={dims}")
    g = torch.Generator().manual_seed(seed)
    qk = {dd: (torch.randn(n_rows, 1, dd, generator=g), torch.randn(n_rows, n_keys, dd, generator=g)) for dd in dims}

    def entropy(w):                                                   # nats, mean over rows
        return float(-(w * w.clamp_min(1e-30).log()).sum(-1).mean())

    def draw(d=d, temperature=temperature, scaled=True):
        """Left: one query's weights over the keys; right: entropy vs head size at this temperature."""
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
        q, k = qk[d]
        w = weights(q, k, (1 / math.sqrt(d) if scaled else 1.0) / temperature)[:, 0]   # (n_rows, n_keys)
        left.bar(range(n_keys), w[0].numpy())
        left.axhline(1 / n_keys, color="k", ls="--", lw=1, label=f"uniform (1/{n_keys})")
        left.set_ylim(0, 1); left.set_xlabel("key"); left.set_ylabel("attention weight")
        left.set_title(f"one query, d={d}, {'÷√d' if scaled else 'no ÷√d'}, temperature {temperature:.2g}: "
                       f"top {w[0].max():.2f}", fontsize=10)
        left.legend(frameon=False, loc="upper right")
        for on, style in ((True, "o-"), (False, "s--")):
            ent = [entropy(weights(*qk[dd], (1 / math.sqrt(dd) if on else 1.0) / temperature)) for dd in dims]
            right.plot(dims, ent, style, label="÷√d" if on else "no ÷√d")
        right.plot([d], [entropy(w)], "o", ms=14, mfc="none", mec="red", label="this setting")
        right.axhline(math.log(n_keys), color="k", ls="--", lw=1, label=f"uniform (ln {n_keys})")
        right.set_xscale("log", base=2); right.set_ylim(0, math.log(n_keys) * 1.08)
        right.set_xlabel("head size d"); right.set_ylabel("mean entropy (nats)")
        right.set_title(f"mean entropy over {n_rows} random queries, temperature {temperature:.2g}", fontsize=10)
        right.legend(frameon=False, fontsize=8)
        fig.suptitle("Does the softmax saturate? head size, 1/√d and temperature", fontweight="bold")
        fig.tight_layout()
        return fig

    return explore(draw, live=live, d=dims, temperature=(0.1, 10.0, 0.1), scaled=True)


def tokenizer_playground(tokenizers: dict[str, Callable[[str], list[bytes]]], *, text: str = "To be, or not to be",
                         colours: Sequence[str] = ("#cfe2f3", "#fce5cd", "#d9ead3", "#ead1dc", "#fff2cc", "#d0e0e3"),
                         width: int = 60, live: bool | None = None) -> Explorer:
    """Type a text, pick a tokenizer, see where the cuts fall (01).

    ``tokenizers`` maps a name to the notebook's own ``text -> list of token bytes`` (the by-hand
    BPE, tiktoken, an HF tokenizer). Each token is drawn as a coloured box (spaces as ␣, newlines
    as ⏎), wrapped at ``width`` characters; the title gives the token count and bytes per token.
    Controls: a text box and a tokenizer dropdown.

    >>> pg = tokenizer_playground({"bytes": lambda t: [bytes([b]) for b in t.encode()]}, text="hi", live=False)
    >>> pg.figure.axes[0].get_title(loc="left")
    'How does bytes cut this text? 2 tokens, 1.00 bytes/token'
    """
    if not tokenizers:
        raise ValueError("tokenizer_playground: give at least one tokenizer {name: text -> list of bytes}")
    names = list(tokenizers)

    def show(piece: bytes) -> str:
        return piece.decode("utf-8", errors="backslashreplace").replace(" ", "␣").replace("\n", "⏎")

    def draw(text=text, tokenizer=names[0]):
        pieces = tokenizers[tokenizer](text)
        placed, x, y = [], 0.0, 0.0                          # layout in character cells, one row = 1.3
        for piece in pieces:
            label = show(piece)
            if x + len(label) > width and x > 0:
                x, y = 0.0, y - 1.3
            placed.append((x, y, label))
            x += max(1, len(label)) + 0.6
        rows = round(-y / 1.3) + 1
        fig, ax = plt.subplots(figsize=(11, 0.7 + 0.42 * rows))
        for k, (x, y, label) in enumerate(placed):
            ax.text(x, y, label, family="monospace", fontsize=11, va="center",
                    bbox=dict(boxstyle="square,pad=0.15", fc=colours[k % len(colours)], ec="#999"))
        ax.set(xlim=(-0.5, width + 2), ylim=(-1.3 * (rows - 1) - 0.7, 0.7))
        ax.axis("off")
        n_bytes = len(text.encode("utf-8"))
        ax.set_title(f"How does {tokenizer} cut this text? {len(pieces)} tokens, "
                     f"{n_bytes / max(1, len(pieces)):.2f} bytes/token", loc="left")
        fig.tight_layout()
        return fig

    if live is False or (live is None and in_batch_run()):
        return explore(draw, live=live, tokenizer=names)
    import ipywidgets as widgets
    box = widgets.Text(value=text, description="text", continuous_update=False, layout={"width": "90%"})
    return explore(draw, live=live, text=box, tokenizer=names)


def rope_explorer(rope: Callable, sinusoidal: Callable, *, bases: Sequence[float] = (100.0, 1_000.0, 10_000.0, 100_000.0, 1_000_000.0),
                  head_dims: Sequence[int] = (16, 32, 64, 128), base: float = 10_000.0, head_dim: int = 64,
                  max_distance: int = 512, n_vectors: int = 64, seed: int = 0, live: bool | None = None) -> Explorer:
    """How the base θ and the head size set RoPE's and the sinusoids' clocks (02).

    ``rope(x, base) -> x`` rotates ``x`` (..., T, hd), the row at position p by p·θ_i per pair (the
    notebook's by-hand RoPE); ``sinusoidal(T, d, base) -> (T, d)`` is its by-hand table. Left: the
    table (which dimension ticks fast, which barely moves); right: how similar a position is to
    one Δ tokens away — the sinusoids' p_0·p_Δ / (d/2), and RoPE's q·k for the same random vector
    placed Δ apart, averaged over ``n_vectors`` (1 at Δ = 0, then falling with ripples).
    Controls: base θ, head size, maximum distance.

    >>> def rope(x, base):        # a toy 'RoPE' that rotates nothing: similarity stays 1
    ...     return x
    >>> def table(T, d, base):
    ...     return torch.ones(T, d)
    >>> ex = rope_explorer(rope, table, live=False)
    >>> ex.values, ex.redraws
    ({'base': 10000.0, 'head_dim': 64, 'distance': 512}, 1)
    """
    if base not in bases or head_dim not in head_dims:
        raise ValueError(f"rope_explorer: base={base} must be one of {list(bases)} and head_dim={head_dim} one of {list(head_dims)}")
    g = torch.Generator().manual_seed(seed)
    vectors = {d: torch.randn(n_vectors, 1, d, generator=g) for d in head_dims}

    def draw(base=base, head_dim=head_dim, distance=max_distance):
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.9))
        table = sinusoidal(distance, head_dim, base)                                   # (T, d)
        heatmap(left, table.T, title=f"sinusoidal table, base {base:g}, d={head_dim}", cmap="RdBu_r", vmin=-1, vmax=1)
        left.set_xlabel("position (tokens)"); left.set_ylabel("dimension (fast → slow)")
        delta = torch.arange(distance)
        sin_sim = (table[0] * table).sum(-1) / (head_dim / 2)                          # (T,)
        q = vectors[head_dim]                                                          # (n, 1, d)
        rotated = rope(q.expand(-1, distance, -1).contiguous(), base)                  # (n, T, d)
        rope_sim = ((rotated[:, :1] * rotated).sum(-1) / (q * q).sum(-1)).mean(0)      # (T,)
        right.plot(delta, sin_sim, label="sinusoidal: p₀·p_Δ / (d/2)")
        right.plot(delta, rope_sim, label="RoPE: q·k, same vector Δ apart")
        right.axhline(0, color="k", lw=0.8)
        right.set(xlabel="distance Δ (tokens)", ylabel="similarity (1 at Δ = 0)", ylim=(-1.05, 1.05),
                  title=f"How fast does position similarity fall? base {base:g}, d={head_dim}")
        right.legend(frameon=False, fontsize=9)
        fig.tight_layout()
        return fig

    return explore(draw, live=live, base=list(bases), head_dim=list(head_dims),
                   distance=(16, max(16, max_distance), 16))
