"""Where a notebook runs: profile, device, CPU threads, seed, and where its outputs go.

Every notebook starts with one call::

    lab = labkit.setup("01_tokenization", profile=PROFILE, seed=0)
    # prints: [labkit] 01_tokenization | profile=full | device=cpu | threads=2 (measured) | seed=0
    n_merges = lab.pick(smoke=200, full=5_000)    # sizes that differ between profiles -> 5000
    lab.save_figure(fig, "compression")           # -> figures/01_tokenization/compression.png

Two profiles exist. ``full`` is what a learner runs (the default); ``smoke`` is what the
tests run: tiny sizes, few steps, and outputs written under ``build/smoke/`` so a test
run never overwrites the committed full-profile figures. The profile comes from, in order:
the ``profile=`` argument (a papermill parameter), ``$LABKIT_PROFILE``, else ``full``.
"""
from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

PROFILES = ("smoke", "full")


def repo_root() -> Path:
    """The LLM Lab checkout labkit was imported from (editable install), else the cwd.

    >>> (repo_root() / "labkit").is_dir()   # doctest: +SKIP
    True
    """
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file() and (here / "notebooks").is_dir():
        return here
    return Path.cwd()


def resolve_profile(profile: str | None = None) -> str:
    """``profile`` if given, else ``$LABKIT_PROFILE``, else ``"full"``; anything else is an error.

    >>> resolve_profile("smoke")
    'smoke'
    """
    chosen = profile or os.environ.get("LABKIT_PROFILE") or "full"
    if chosen not in PROFILES:
        raise ValueError(f"unknown profile {chosen!r}: use one of {PROFILES} "
                         f"(set by the PROFILE parameter or $LABKIT_PROFILE)")
    return chosen


def in_batch_run() -> bool:
    """True under ``make run`` / ``make test`` (papermill, nbval) or outside a Jupyter kernel:
    no live redraws, no progress bars.

    >>> os.environ.get("LABKIT_BATCH") != "1" or in_batch_run()
    True
    """
    if os.environ.get("LABKIT_BATCH") == "1":
        return True
    try:
        from IPython import get_ipython
        shell = get_ipython()
    except ImportError:
        return True
    return shell is None or "IPKernelApp" not in shell.config


def pick_device(prefer: str | None = None) -> torch.device:
    """cuda → mps → cpu, unless ``prefer`` (or ``$LABKIT_DEVICE``) names one that exists.

    >>> pick_device("cpu")
    device(type='cpu')
    """
    prefer = prefer or os.environ.get("LABKIT_DEVICE")
    available = {"cpu": True,
                 "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None
                        and torch.backends.mps.is_available()}
    if prefer:
        kind = prefer.split(":")[0]
        if kind not in available:
            raise ValueError(f"unknown device {prefer!r}: use one of {sorted(available)}")
        if not available[kind]:
            have = [k for k, ok in available.items() if ok]
            raise RuntimeError(f"device {prefer!r} is not available on this machine "
                               f"(available: {have}); unset LABKIT_DEVICE or pass device=None")
        return torch.device(prefer)
    for kind in ("cuda", "mps"):
        if available[kind]:
            return torch.device(kind)
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a torch Generator with that seed.

    >>> _ = seed_everything(0); a = torch.rand(2)
    >>> _ = seed_everything(0); bool((a == torch.rand(2)).all())
    True
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds cuda and mps
    return torch.Generator().manual_seed(seed)


def _matmul_seconds(threads: int, size: int = 384, repeats: int = 5) -> float:
    """Median wall time of one fp32 (size x size) matmul with ``threads`` intra-op threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool start, allocation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class Timing:
    """Wall times of repeated calls: report ``median`` and the spread ``lo``..``hi``."""
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def lo(self) -> float:
        return min(self.times)

    @property
    def hi(self) -> float:
        return max(self.times)

    def __str__(self) -> str:
        return f"{self.median * 1e3:.2f} ms (range {self.lo * 1e3:.2f}-{self.hi * 1e3:.2f}, n={len(self.times)})"


def time_it(fn, repeats: int = 5, warmup: int = 1) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls (allocation, thread pool).

    Neighbours on a shared machine add noise: compare two things as the ratio of medians
    measured in the same run, and show the spread.

    >>> t = time_it(lambda: sum(range(1000)), repeats=3)
    >>> len(t.times), t.lo <= t.median <= t.hi
    (3, True)
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(times)


def choose_threads(max_threads: int | None = None, margin: float = 0.10) -> tuple[int, dict[int, float]]:
    """Measure fp32 matmul time at 1..N threads and keep the fewest within ``margin`` of the best.

    On a 2-core machine a neighbour busy on one core makes the second thread a *loss*
    (the two threads wait on each other), so this is measured at start-up, never assumed.
    ``$LABKIT_THREADS`` skips the measurement. Returns (threads, {threads: seconds}).
    """
    if os.environ.get("LABKIT_THREADS"):
        n = int(os.environ["LABKIT_THREADS"])
        torch.set_num_threads(n)
        return n, {}
    max_threads = max_threads or os.cpu_count() or 1
    candidates = sorted({1, max_threads} | {t for t in (2, 4, 8, 16) if t < max_threads})
    seconds = {t: _matmul_seconds(t) for t in candidates}
    best = min(seconds.values())
    chosen = min(t for t, s in seconds.items() if s <= best * (1 + margin))
    torch.set_num_threads(chosen)
    return chosen, seconds


@dataclass
class Lab:
    """What ``setup`` decided for one notebook run; also where that run's outputs go."""
    notebook: str
    profile: str
    device: torch.device
    seed: int
    threads: int
    thread_timings: dict[int, float] = field(default_factory=dict, repr=False)
    root: Path = field(default_factory=repo_root)

    @property
    def smoke(self) -> bool:
        return self.profile == "smoke"

    @property
    def out_dir(self) -> Path:
        """Root of what this run writes: the repo for ``full``; ``build/smoke`` (ignored) for ``smoke``.

        ``$LABKIT_OUT`` overrides both (the tests point it at a temporary directory).
        """
        if os.environ.get("LABKIT_OUT"):
            return Path(os.environ["LABKIT_OUT"])
        return self.root if self.profile == "full" else self.root / "build" / "smoke"

    @property
    def figures_dir(self) -> Path:
        return self.out_dir / "figures" / self.notebook

    @property
    def runs_dir(self) -> Path:
        """Checkpoints and logs a notebook makes (git-ignored ``runs/`` in either profile)."""
        return self.out_dir / "runs" / self.notebook

    def pick(self, *, smoke, full):
        """The value for this profile: ``lab.pick(smoke=2, full=200)``."""
        return smoke if self.smoke else full

    def save_figure(self, fig, name: str, dpi: int = 110) -> None:
        """Save ``fig`` as ``<figures_dir>/<name>.png`` (returns nothing, so a cell ending with
        it shows the figure and no path)."""
        from .plotting import save_figure
        save_figure(fig, self.figures_dir / f"{name}.png", dpi=dpi)

    def __str__(self) -> str:
        how = "set by $LABKIT_THREADS" if not self.thread_timings else "measured"
        return (f"[labkit] {self.notebook} | profile={self.profile} | device={self.device} | "
                f"threads={self.threads} ({how}) | seed={self.seed}")


def setup(notebook: str, profile: str | None = None, seed: int = 0,
          device: str | None = None, quiet: bool = False) -> Lab:
    """Resolve profile and device, pick CPU threads by measurement, seed everything, theme plots."""
    from .plotting import set_theme
    profile = resolve_profile(profile)
    dev = pick_device(device)
    threads, timings = choose_threads() if dev.type == "cpu" else (torch.get_num_threads(), {})
    seed_everything(seed)
    set_theme()
    lab = Lab(notebook=notebook, profile=profile, device=dev, seed=seed,
              threads=threads, thread_timings=timings)
    if not quiet:
        print(lab)
    return lab
