"""Profiles, devices, threads, seeds and where a run's outputs go."""
import os

import pytest
import torch

from labkit import runtime


def test_profile_argument_beats_env_beats_default(monkeypatch):
    monkeypatch.delenv("LABKIT_PROFILE", raising=False)
    assert runtime.resolve_profile() == "full"
    monkeypatch.setenv("LABKIT_PROFILE", "smoke")
    assert runtime.resolve_profile() == "smoke"
    assert runtime.resolve_profile("full") == "full"


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown profile 'fast': use one of \('smoke', 'full'\)"):
        runtime.resolve_profile("fast")


def test_device_choice_and_errors(monkeypatch):
    monkeypatch.delenv("LABKIT_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert runtime.pick_device().type == expected
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        runtime.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available on this machine"):
            runtime.pick_device("cuda")


def test_seed_everything_reproduces_torch_numpy_python():
    import random

    import numpy as np
    runtime.seed_everything(7)
    a = (torch.randn(3), np.random.rand(3), random.random())
    runtime.seed_everything(7)
    b = (torch.randn(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def test_threads_are_measured_or_taken_from_env(monkeypatch):
    monkeypatch.delenv("LABKIT_THREADS", raising=False)
    n, timings = runtime.choose_threads()
    assert 1 <= n <= (os.cpu_count() or 1)
    assert n in timings and all(t > 0 for t in timings.values())
    assert timings[n] <= 1.10 * min(timings.values()) + 1e-12
    monkeypatch.setenv("LABKIT_THREADS", "1")
    assert runtime.choose_threads() == (1, {})
    assert torch.get_num_threads() == 1


def test_outputs_of_smoke_runs_never_land_in_committed_figures(monkeypatch, tmp_path):
    monkeypatch.delenv("LABKIT_OUT", raising=False)
    monkeypatch.setenv("LABKIT_THREADS", "1")
    smoke = runtime.setup("99_test", profile="smoke", quiet=True)
    full = runtime.setup("99_test", profile="full", quiet=True)
    assert smoke.figures_dir == smoke.root / "build" / "smoke" / "figures" / "99_test"
    assert full.figures_dir == full.root / "figures" / "99_test"
    assert smoke.pick(smoke=1, full=2) == 1 and full.pick(smoke=1, full=2) == 2
    monkeypatch.setenv("LABKIT_OUT", str(tmp_path))
    import matplotlib.pyplot as plt
    fig, _ = plt.subplots()
    smoke.save_figure(fig, "empty")
    assert (tmp_path / "figures" / "99_test" / "empty.png").stat().st_size > 0
