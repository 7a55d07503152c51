"""Shared fixtures: a throwaway asset store with a fake registry and a fake fetcher (no network)."""
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from labkit.assets import Asset, AssetStore, PinnedFile
from labkit.runtime import choose_threads


def pytest_sessionstart(session):
    """Use the measured thread count, as notebooks do: on a 2-core machine with a busy
    neighbour, torch's default of 2 threads was measured 10x slower than 1."""
    choose_threads()


def make_sdist(text: str = "to be or not to be\n") -> bytes:
    """A tiny .tar.gz standing in for a PyPI sdist."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = text.encode()
        info = tarfile.TarInfo("pkg-1.0/play.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_upper(src: Path, out: Path) -> None:
    with tarfile.open(src) as tf:
        text = tf.extractfile("pkg-1.0/play.txt").read().decode()
    (out / "play.txt").write_text(text.upper())


class FakeFetcher:
    """Plays `pip download`: writes `payload` as `filename`; `offline=True` fails like pip does."""

    def __init__(self, filename: str, payload: bytes):
        self.filename, self.payload, self.calls, self.offline = filename, payload, 0, False

    def __call__(self, requirement: str, dest: Path) -> None:
        self.calls += 1
        if self.offline:
            raise OSError(f"`pip download --no-deps {requirement}` failed: "
                          f"ERROR: No matching distribution found for {requirement}")
        (dest / self.filename).write_bytes(self.payload)


@pytest.fixture
def fake_store(tmp_path):
    payload = make_sdist()
    pin = PinnedFile("pkg==1.0", "pkg-1.0.tar.gz", hashlib.sha256(payload).hexdigest())
    registry = {"tiny": Asset("tiny", "a tiny test asset", pin, build_upper)}
    fetcher = FakeFetcher(pin.filename, payload)
    return AssetStore(tmp_path / "cache", registry=registry, fetcher=fetcher), fetcher
