"""Run directories, metric logs and checkpoints: nothing a learner trained is lost or overwritten.

One run = one directory, created fresh and never reused silently::

    run = Run.create(lab.runs_dir, "baseline")   # runs/11_pretraining_lab/baseline, or baseline-2 if taken
    run.path / "config.json"                     # model + training config, written by train()
    run.path / "launch.json"                     # the config file, when python -m labkit.train made it
    run.path / "metrics.csv"                     # one row per step: the columns train() declares
    run.path / "metrics.jsonl"                   # the same rows plus every per-layer / per-group number
    run.path / "checkpoints" / "step_000200.safetensors"   # weights, optimizer state, RNG states
    run.path / "checkpoints" / "step_000200.json"          # config, step, data position, sha256 of the above
    run.path / "checkpoints" / "latest.json"               # which checkpoint is the newest complete one

Checkpoints are written atomically: each file goes to a temporary name, is flushed to disk and
then renamed (``os.replace`` is atomic on POSIX and Windows), and ``latest.json`` moves last.
A run killed mid-save leaves ``latest.json`` pointing at the previous complete checkpoint;
loading re-checks the weights' sha256 against the JSON, so a damaged file is reported, never
silently loaded.

A checkpoint of a model whose parameters are partly frozen (LoRA, peft: only the adapters
require grad) holds only the trainable parameters and buffers: the frozen weights come from
where the model was loaded, and resuming rebuilds it the same way.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import random
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from .assets import sha256_of


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, damaged, or from a different model/config."""


# ----------------------------------------------------------------------------- atomic files

def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)``, flush it to disk, then rename it to ``path`` in one step.

    >>> import tempfile; d = Path(tempfile.mkdtemp())
    >>> _ = atomic_write(d / "a.txt", lambda p: p.write_text("hello"))
    >>> (d / "a.txt").read_text(), sorted(p.name for p in d.iterdir())
    ('hello', ['a.txt'])
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable (POSIX; not possible on Windows)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def to_jsonable(obj):
    """Dataclasses, tuples and paths as plain JSON values (configs go into config.json)."""
    if is_dataclass(obj):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ----------------------------------------------------------------------------- run directory

def new_run_dir(root, name: str = "run") -> Path:
    """A fresh directory ``root/name``; if that exists, ``name-2``, ``name-3``, ... (printed).

    For anything a notebook saves (checkpoints, activation caches): an earlier run's files are
    kept, never overwritten. ``run_dirs`` lists them, newest first.

    >>> import tempfile; root = Path(tempfile.mkdtemp())
    >>> new_run_dir(root, "baseline").name
    'baseline'
    >>> new_run_dir(root, "baseline").name   # the first one is kept
    [labkit] runs: .../baseline exists and is kept; this run writes to baseline-2
    'baseline-2'
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path, n = root / name, 1
    while True:
        try:
            path.mkdir()        # atomic: two runs started at once never share a directory
            break
        except FileExistsError:
            n += 1
            path = root / f"{name}-{n}"
    if n > 1:
        print(f"[labkit] runs: .../{name} exists and is kept; this run writes to {path.name}")
    return path


def run_dirs(root, name: str = "run") -> list[Path]:
    """The directories ``new_run_dir(root, name)`` made, newest first (none: an empty list).

    >>> import tempfile; root = Path(tempfile.mkdtemp())
    >>> _ = new_run_dir(root, "tunnel"); _ = new_run_dir(root, "tunnel")
    [labkit] runs: .../tunnel exists and is kept; this run writes to tunnel-2
    >>> [p.name for p in run_dirs(root, "tunnel")]
    ['tunnel-2', 'tunnel']
    """
    def number(p: Path) -> int:
        suffix = p.name[len(name):]
        return 1 if suffix == "" else int(suffix[1:])
    root = Path(root)
    found = [p for p in root.glob(f"{name}*") if p.is_dir() and
             (p.name == name or (p.name.startswith(name + "-") and p.name[len(name) + 1:].isdigit()))]
    return sorted(found, key=number, reverse=True)


class Run:
    """A run directory. ``Run.create`` makes a new one; ``Run(path)`` opens an existing one."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no run directory at {self.path}: create one with "
                                    f"Run.create(root, name)")
        self.columns: list[str] | None = None     # the CSV header, once the log has one
        self._declared: list[str] = []

    @classmethod
    def create(cls, root, name: str = "run") -> "Run":
        """A fresh run directory (``new_run_dir``) with an empty ``checkpoints/``.

        >>> import tempfile; root = Path(tempfile.mkdtemp())
        >>> Run.create(root, "baseline").path.name
        'baseline'
        >>> Run.create(root, "baseline").path.name   # the first one is kept
        [labkit] runs: .../baseline exists and is kept; this run writes to baseline-2
        'baseline-2'
        """
        path = new_run_dir(root, name)
        (path / "checkpoints").mkdir()
        return cls(path)

    # -- config and metrics -------------------------------------------------------------

    def write_config(self, **configs) -> None:
        atomic_write(self.path / "config.json",
                     lambda p: p.write_text(json.dumps(to_jsonable(configs), indent=2)))

    def read_config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def start_log(self, columns: list[str] = ()) -> None:
        """Declare the CSV columns, in order (the JSONL keeps every key of every row).

        A new log's header is written with its first row: the declared columns, then the first
        row's other keys (metrics a callback adds at evaluations). An existing log keeps its header.

        >>> import tempfile; run = Run.create(tempfile.mkdtemp(), "log")
        >>> run.start_log(["step", "loss", "lr"])
        >>> run.log({"step": 0, "loss": 4.2, "kl": 0.5}); run.log({"step": 1, "loss": 3.9, "lr": 0.1})
        >>> print((run.path / "metrics.csv").read_text(), end="")
        step,loss,lr,kl
        0,4.2,,0.5
        1,3.9,0.1,
        """
        self._declared = list(columns)
        self.columns = self._header()

    def _header(self) -> list[str] | None:
        csv_path = self.path / "metrics.csv"
        if not csv_path.exists():
            return None
        with open(csv_path, newline="") as f:
            return next(csv.reader(f), None)

    def log(self, row: dict) -> None:
        """Append one step's row to metrics.jsonl (all keys) and metrics.csv (its columns)."""
        if self.columns is None:
            self.columns = self._header()
        if self.columns is None:                       # the first row of a new log
            self.columns = list(dict.fromkeys([*self._declared, *row]))
            with open(self.path / "metrics.csv", "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.path / "metrics.csv", "a", newline="") as f:
            csv.writer(f).writerow(["" if row.get(c) is None else row[c] for c in self.columns])

    def rows(self) -> list[dict]:
        """Every logged row (from metrics.jsonl), in order."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_log(self, last_step: int) -> int:
        """Keep rows with step < ``last_step`` (a resume replays the rest); return how many went."""
        rows = self.rows()
        keep = [r for r in rows if r["step"] < last_step]
        if len(keep) == len(rows):
            return 0
        atomic_write(self.path / "metrics.jsonl",
                     lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in keep)))

        self.columns = self._header() or list(dict.fromkeys([*self._declared, *(k for r in keep for k in r)]))

        def write_csv(p):
            with open(p, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(self.columns)
                w.writerows(["" if r.get(c) is None else r[c] for c in self.columns] for r in keep)
        atomic_write(self.path / "metrics.csv", write_csv)
        return len(rows) - len(keep)

    # -- checkpoints ----------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        """The JSON of the newest complete checkpoint, or None if the run has none yet."""
        pointer = self.checkpoint_dir / "latest.json"
        if not pointer.exists():
            return None
        return self.checkpoint_dir / json.loads(pointer.read_text())["checkpoint"]

    def save_checkpoint(self, step: int, model, optimizer, batch_generator: torch.Generator,
                        meta: dict) -> Path:
        """Weights + optimizer state + RNG states (safetensors) and metadata (JSON), atomically."""
        stem = f"step_{step:06d}"
        tensors = {f"model.{k}": v.detach().cpu().contiguous().clone()   # clone: tied weights
                   for k, v in trainable_state(model).items()}           # share storage
        opt_state = optimizer.state_dict()
        opt_scalars = {}              # non-tensor state (bitsandbytes keeps `step` as an int)
        for i, state in opt_state["state"].items():
            for name, value in _flatten(state):
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{i}.{name}"] = value.detach().cpu().contiguous().clone()
                else:
                    opt_scalars[f"{i}.{name}"] = value
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.batches"] = batch_generator.get_state()
        weights = atomic_write(self.checkpoint_dir / f"{stem}.safetensors",
                               lambda p: save_file(tensors, str(p)))
        np_state = np.random.get_state()
        meta = {**to_jsonable(meta), "step": step, "weights": weights.name,
                "sha256": sha256_of(weights),
                "optimizer_param_groups": opt_state["param_groups"],
                "optimizer_scalars": opt_scalars,
                "rng_python": base64.b64encode(json.dumps(random.getstate()).encode()).decode(),
                "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
        info = atomic_write(self.checkpoint_dir / f"{stem}.json",
                            lambda p: p.write_text(json.dumps(meta, indent=1)))
        atomic_write(self.checkpoint_dir / "latest.json",
                     lambda p: p.write_text(json.dumps({"checkpoint": info.name, "step": step})))
        return info


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of a checkpoint: its JSON, or a run directory (its latest checkpoint).

    The weights file must match the sha256 recorded in the JSON; a mismatch raises
    ``CheckpointError`` naming the fix instead of loading damaged weights.
    """
    path = Path(path)
    if path.is_dir():
        latest = Run(path).latest_checkpoint()
        if latest is None:
            raise CheckpointError(f"run {path} has no checkpoint yet (checkpoints/latest.json is "
                                  f"missing): train it first, or start a new run")
        path = latest
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: list {path.parent} for the "
                              f"complete ones (each has a .json and a .safetensors)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint metadata {path} is damaged ({e}): resume from an "
                              f"earlier step_*.json in {path.parent}") from None
    weights = path.with_name(meta["weights"])
    data = weights.read_bytes() if weights.exists() else b""
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"checkpoint weights {weights} are missing or damaged (sha256 does "
                              f"not match {path.name}): resume from an earlier step_*.json in "
                              f"{path.parent}")
    return load_safetensors_bytes(data), meta


def restore_rng(tensors: dict, meta: dict, batch_generator: torch.Generator) -> None:
    """Put every random stream back where the checkpoint left it (bit-exact resume)."""
    torch.set_rng_state(tensors["rng.torch"])
    batch_generator.set_state(tensors["rng.batches"])
    state = json.loads(base64.b64decode(meta["rng_python"]))
    random.setstate((state[0], tuple(state[1]), state[2]))
    kind, keys, *rest = meta["rng_numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def _flatten(state: dict, prefix: str = ""):
    """``(dotted name, value)`` of a nested optimizer state (bitsandbytes nests its quantisation
    state one level down)."""
    for name, value in state.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def optimizer_state(tensors: dict, meta: dict) -> dict:
    """The optimizer ``state_dict`` saved by ``Run.save_checkpoint``."""
    state: dict[int, dict] = {}
    entries = [(key[len("optimizer."):], v) for key, v in tensors.items() if key.startswith("optimizer.")]
    for key, value in entries + list(meta.get("optimizer_scalars", {}).items()):
        i, *path = key.split(".")
        node = state.setdefault(int(i), {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return {"state": state, "param_groups": meta["optimizer_param_groups"]}


def model_state(tensors: dict) -> dict:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def _frozen(model) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def trainable_state(model) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without the frozen parameters (all of it when nothing is frozen).

    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> m[0].requires_grad_(False) and sorted(trainable_state(m))
    ['1.bias', '1.weight']
    """
    frozen = _frozen(model)
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def restore_model(model, tensors: dict) -> None:
    """Load a checkpoint's weights into ``model``; only its frozen parameters may be absent."""
    missing, unexpected = model.load_state_dict(model_state(tensors), strict=False)
    not_frozen = sorted(set(missing) - _frozen(model))
    if not_frozen or unexpected:
        raise CheckpointError(f"the checkpoint does not fit this model (missing {not_frozen[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}): build the model from the run's "
                              f"config.json, with the same parameters frozen")

