"""Test session setup: the measured thread count, as notebooks use."""
from labkit.runtime import choose_threads


def pytest_sessionstart(session):
    """Use the measured thread count, as notebooks do: on a 2-core machine with a busy
    neighbour, torch's default of 2 threads was measured 10x slower than 1."""
    choose_threads()
