"""The lab's one training loop: AdamW, warmup + cosine, validation, logs, checkpoints, DDP.

    cfg = TrainConfig(steps=500, batch_size=16, block_size=128, lr=3e-3)
    history = train(model, data, cfg)        # model: labkit.gpt.GPT or a Hugging Face causal LM
    history["loss"][-1], history["val_loss"][-1]

What it trains. ``data`` is anything with ``.batch(split, batch_size, block_size, generator)
-> (x, y)``: token ids ``x`` (B, T) and next-token targets ``y`` (B, T), ``y = -100`` where a
position is not scored (``labkit.data.TokenData``, or a task that draws fresh synthetic
sequences). ``model`` is the labkit GPT (``model(x, y) -> (logits, loss)``) or a Hugging Face
causal LM, also peft- or hand-LoRA-wrapped: only parameters that require grad are trained,
with ``cfg.optimizer`` "adamw" (fp32 states) or "adamw8bit" (bitsandbytes).

The notebooks turn on the rest::

    run = Run.create(lab.runs_dir, "baseline")            # a fresh directory, never reused
    cfg = TrainConfig(steps=600, diag_every=20, checkpoint_every=200)
    live = LiveCurves(panels={...}, stoppable=True)       # curves + a Stop button in JupyterLab
    history = train(model, data, cfg, run=run, callbacks=[live])
    # interrupted (Stop button or the kernel's interrupt)? a checkpoint was saved:
    history = train(model, data, cfg, run=run, resume=True)   # == the uninterrupted run, bit for bit

Every step logs a row: ``step, loss, lr, grad_norm, tokens_per_sec`` and ``val_loss`` (the
latest, measured after step 0, every ``eval_every`` steps and at the last step; ``val_step``
says when), the research diagnostics of ``labkit.diagnostics`` with ``diag_every`` > 0, and
whatever metrics the callbacks add at evaluations (``Callback.on_eval``).

Scale-out: under ``torchrun`` (``torch.distributed`` initialised) every process runs this same
loop; each takes its slice of the same global batch of ``batch_size`` sequences, DDP averages
the gradients, so N processes compute what one process would (to float rounding). Only rank 0
writes the run directory and calls the callbacks. The command line builds everything from a
config file: ``python -m labkit.train --config configs/shakespeare_char.json`` (``main`` below).

Deterministic given ``cfg.seed`` on CPU with a fixed thread count; a resumed run equals the
uninterrupted one bit for bit (tests).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, is_dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .diagnostics import Diagnostics
from .diagnostics import columns as diagnostic_columns
from .runs import (CheckpointError, Run, atomic_write, load_checkpoint, optimizer_state, restore_model,
                   restore_rng, to_jsonable)
from .runtime import in_batch_run


@dataclass
class TrainConfig:
    steps: int = 500
    batch_size: int = 16           # sequences per step: the global batch, split over DDP processes
    block_size: int = 128
    lr: float = 3e-3               # peak learning rate, reached after warmup
    min_lr: float = 3e-4           # the cosine decays to this at the last step
    warmup_steps: int = 50
    weight_decay: float = 0.1      # on matrices only: decaying norms and biases only hurts
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0         # max global grad norm; 0 disables clipping
    eval_every: int = 100          # val loss after step 0, every eval_every steps and at the end
    eval_batches: int = 8
    aux_weight: float = 0.01       # MoE load-balancing loss weight (ignored without MoE)
    seed: int = 0
    diag_every: int = 0            # 0: no diagnostics; N: update ratios every step, the rest every N
    checkpoint_every: int = 0      # 0: only the final checkpoint (needs run=); N: also every N steps
    optimizer: str = "adamw"       # "adamw" (fp32 states) or "adamw8bit" (bitsandbytes, 8-bit states)
    max_seconds: float = 0.0       # > 0: wall-clock budget of one train() call; stops, evaluates, checkpoints


LOG_COLUMNS = ["step", "tokens_per_sec", "loss", "val_loss", "val_step", "lr", "grad_norm"]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine down to ``min_lr`` at ``steps - 1``.

    >>> cfg = TrainConfig(steps=101, lr=1.0, min_lr=0.0, warmup_steps=10)
    >>> [round(lr_at(s, cfg), 3) for s in (0, 9, 10, 55, 100)]
    [0.1, 1.0, 1.0, 0.5, 0.0]
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the parameters that require grad; weight decay on >= 2-D ones (matrices,
    embeddings) only.

    >>> m = torch.nn.Linear(4, 2)
    >>> [len(g["params"]) for g in make_optimizer(m, TrainConfig()).param_groups]   # weight | bias
    [1, 1]
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter of the model requires grad: nothing to train")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]         # LoRA adapters: matrices only
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    if cfg.optimizer == "adamw8bit":     # states as 8-bit blocks: 2 bytes per parameter instead of 8
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use 'adamw' or 'adamw8bit'")


def lm_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on ids ``x`` (B, T), targets ``y`` (B, T), over
    the positions where ``y != -100``.

    The labkit GPT computes it itself: ``model(x, y) -> (logits, loss)``. A Hugging Face causal
    LM (also peft-wrapped; recognised by ``model.config.model_type``) gives the logits; its own
    ``labels=`` would shift the already-shifted ``y`` a second time, so the loss is taken here.
    """
    core = getattr(model, "module", model)                       # inside DistributedDataParallel
    if hasattr(getattr(core, "config", None), "model_type"):
        logits = model(input_ids=x).logits                          # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)
    return model(x, y)[1]


@torch.no_grad()
def evaluate(model, data, cfg: TrainConfig, split: str = "val") -> float:
    """Mean loss over ``eval_batches`` batches drawn with a fixed seed: the same windows every call."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(10_000 + cfg.seed)
    device = next(model.parameters()).device
    losses = [lm_loss(model, *(t.to(device) for t in data.batch(split, cfg.batch_size, cfg.block_size, g))).item()
              for _ in range(cfg.eval_batches)]
    model.train(was_training)
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------- callbacks

class Callback:
    """What ``train`` calls; every part is optional. Pass any object with some of these, or a
    plain function ``f(step, row)`` (its ``on_step``). ``labkit.LiveCurves`` is one.

        class KLToPosterior(Callback):            # a metric of your own, logged with the run
            def on_eval(self, step, model):
                return {"kl": exact_kl(model)}    # joins that step's row, log and History

    Under torchrun the callbacks run in rank 0 only (the process that writes).
    """
    stop_requested: bool = False   # True: finish this step, checkpoint, return (History.stopped)

    def on_eval(self, step: int, model) -> dict:
        """Extra metrics for this step's row, at every evaluation (where ``val_loss`` is measured)."""
        return {}

    def on_step(self, step: int, row: dict) -> None:
        """After every step, with its row (everything that is logged)."""

    def close(self) -> None:
        """Once, when training ends (also when it ends with an exception)."""


class _Callbacks:
    """The callbacks of one ``train`` call, in order; ``with`` closes them all at the end."""

    def __init__(self, callbacks):
        self.items = [c if hasattr(c, "on_step") or not callable(c) else _OnStep(c) for c in callbacks]

    def on_eval(self, step: int, model) -> dict:
        metrics = {}
        for c in self.items:
            if hasattr(c, "on_eval"):
                metrics.update(c.on_eval(step, model) or {})
        return metrics

    def on_step(self, step: int, row: dict) -> None:
        for c in self.items:
            if hasattr(c, "on_step"):
                c.on_step(step, row)

    @property
    def stop_requested(self) -> bool:
        return any(getattr(c, "stop_requested", False) for c in self.items)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for c in self.items:
            if hasattr(c, "close"):
                c.close()


class _OnStep:
    def __init__(self, fn):
        self.on_step = fn


class DeferInterrupt:
    """``with DeferInterrupt() as interrupt``: Ctrl-C / the kernel's interrupt button sets
    ``interrupt.requested`` instead of raising; the loop finishes its step, then raises.

    A KeyboardInterrupt in the middle of ``opt.step()`` would leave half-updated weights, and a
    checkpoint of those could never resume bit for bit. A second interrupt raises at once.
    The previous SIGINT handler is put back on exit, whatever it was.
    """

    def __enter__(self):
        self.requested, self.installed = False, threading.current_thread() is threading.main_thread()
        if self.installed:     # signals reach the main thread only (a loop in a thread: no deferral)
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("[labkit] interrupt: finishing this step, then saving a checkpoint (interrupt again to abort now)")

    def __exit__(self, *exc):
        if self.installed:     # None: a handler set outside Python; the closest is the default
            signal.signal(signal.SIGINT, signal.SIG_DFL if self.previous is None else self.previous)


# ----------------------------------------------------------------------------- the loop

class History(dict):
    """What ``train`` returns: lists by name, ``step``, ``loss``, ``lr``, ``grad_norm``,
    ``tokens_per_sec`` (every step) and ``val_step``, ``val_loss`` (every evaluation); plus
    ``.rows`` (every row as logged, with the diagnostics and callback metrics), ``.stopped``
    (True when a callback's stop request or ``max_seconds`` ended it early), ``.steps_done``
    and ``.run``.
    """
    stopped: bool = False
    steps_done: int = 0
    run: Run | None = None
    rows: list[dict]

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of one metric from the rows that have it (e.g. a callback's ``kl``)."""
        found = [(r["step"], r[name]) for r in self.rows if r.get(name) is not None]
        return [s for s, _ in found], [v for _, v in found]


def train(model, data, cfg: TrainConfig, *, callbacks=(), run: Run | None = None, resume: bool = False,
          progress: bool | None = None) -> History:
    """Train ``model`` on ``data``; return the ``History``.

    ``callbacks``: see ``Callback``; called after every step with its row.
    ``run``: log metrics.csv / metrics.jsonl and checkpoint into this ``Run``: every
    ``checkpoint_every`` steps, at the end, and at the last completed step when training is
    interrupted (KeyboardInterrupt, re-raised after saving) or stopped early (a callback's
    ``stop_requested``, the ``max_seconds`` budget). ``resume=True`` continues ``run`` from its
    latest checkpoint. ``progress``: a tqdm bar (default: in a live Jupyter kernel only).
    """
    from tqdm.auto import tqdm

    rank, world = rank_and_world()
    _check_arguments(cfg, run, resume, world)
    device = next(model.parameters()).device
    opt = make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(cfg.seed)     # draws every batch: its state is the data position
    history = History({k: [] for k in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "val_step", "val_loss")})
    history.rows, history.run = [], run
    start, meta = _open_run(run, resume, model, cfg, opt, g, history, rank, world)

    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    next_batch = partial(_local_batch, data, "train", cfg, g, rank, world, device)
    probe = Diagnostics(model, cfg.diag_every, lm_loss, history.rows) if cfg.diag_every else None
    callbacks = _Callbacks(callbacks if rank == 0 else ())
    writes = run is not None and rank == 0        # one writer: rank 0
    save = lambda step: run.save_checkpoint(step, model, opt, g, meta)
    last_val = (history["val_step"][-1], history["val_loss"][-1]) if history["val_step"] else (None, None)

    model.train()
    t_start, out_of_time = time.monotonic(), False
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps,
               disable=rank != 0 or (in_batch_run() if progress is None else not progress))
    with DeferInterrupt() as interrupt, callbacks:
        try:
            for step in bar:
                row = _train_step(net, model, opt, cfg, step, next_batch, probe, world)
                out_of_time = cfg.max_seconds > 0 and time.monotonic() - t_start >= cfg.max_seconds
                if world > 1:                    # the loss of the global batch; any rank's clock counts
                    loss_sum, late = _sum_over_ranks([row["loss"], out_of_time], device)
                    row["loss"], out_of_time = loss_sum / world, late > 0
                evaluated = {}
                if step == 0 or (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1 or out_of_time:
                    last_val = (step, evaluate(model, data, cfg))
                    evaluated = callbacks.on_eval(step, model)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", val=f"{last_val[1]:.3f}")
                row["val_step"], row["val_loss"] = last_val
                row.update(evaluated)
                _record(history, row)
                if writes:
                    run.log(row)
                callbacks.on_step(step, row)
                if writes and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                    save(step + 1)
                interrupted, stop = interrupt.requested, callbacks.stop_requested or out_of_time
                if world > 1:                    # every rank stops after the same step
                    interrupted, stop = (v > 0 for v in _sum_over_ranks([interrupted, stop], device))
                if interrupted:
                    raise KeyboardInterrupt
                if stop and step + 1 < cfg.steps:
                    history.stopped = True
                    break
        except KeyboardInterrupt:
            history.steps_done = _completed_steps(history, start)
            if writes and history.steps_done > start:
                save(history.steps_done)
                print(f"[labkit] interrupted: checkpoint at step {history.steps_done} in {run.path}; continue "
                      f"with train(model, data, cfg, run=Run({str(run.path)!r}), resume=True)")
            raise
    history.steps_done = _completed_steps(history, start)
    if writes and history.steps_done > start:
        save(history.steps_done)
    if history.stopped and rank == 0:
        why = f"the time budget of {cfg.max_seconds:g} s ran out" if out_of_time else "stop requested"
        where = (f"; checkpoint in {run.path}; continue with train(model, data, cfg, run=Run({str(run.path)!r}), "
                 f"resume=True)") if writes else ""
        print(f"[labkit] {why}: stopped after step {history.steps_done} of {cfg.steps}{where}")
    model.eval()
    return history


def _train_step(net, model, opt, cfg: TrainConfig, step: int, next_batch, probe, world: int) -> dict:
    """One optimizer step (plus diagnostics when due); returns that step's row."""
    lr = lr_at(step, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    x, y = next_batch()
    row: dict = {"step": step}
    if probe:                                  # its own passes and random streams, before training's
        row.update(probe.before_forward(step, x, y))
    t0 = time.perf_counter()                   # tokens_per_sec: the training work, not diagnostics
    loss = lm_loss(net, x, y)
    aux = model.aux_loss() if hasattr(model, "aux_loss") else None      # MoE load balancing
    total = loss if aux is None else loss + cfg.aux_weight * aux
    opt.zero_grad(set_to_none=True)
    total.backward()                           # under DDP: also averages the gradients over ranks
    if probe:
        row.update(probe.after_backward(x.numel(), aux if cfg.aux_weight else None))
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0
                                          else float("inf"))
    if probe:
        probe.before_update()
    opt.step()
    if probe:
        row.update(probe.after_update())
    elapsed = time.perf_counter() - t0
    row.update(loss=loss.item(), lr=lr, grad_norm=norm.item(), tokens_per_sec=world * x.numel() / elapsed)
    return row


def _check_arguments(cfg: TrainConfig, run, resume: bool, world: int) -> None:
    if resume and run is None:
        raise ValueError("resume=True needs run=Run(path) (the directory of the run to continue)")
    if cfg.diag_every and cfg.batch_size < 2:
        raise ValueError("diagnostics split the batch in two for the gradient noise scale: "
                         "use batch_size >= 2 or diag_every=0")
    if world > 1 and cfg.diag_every:
        raise ValueError("the diagnostics measure one process's batch: use diag_every=0 under torchrun, "
                         "or run them in one process")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} does not split over {world} processes: use a "
                         f"multiple of {world}")


def _open_run(run, resume: bool, model, cfg: TrainConfig, opt, g, history: History, rank: int,
              world: int) -> tuple[int, dict]:
    """Start ``run``'s log, or load its latest checkpoint (resume). Returns the step to start at
    and the metadata every checkpoint carries."""
    meta = {"train_config": cfg, "model_config": _model_config(model), "model_class": type(model).__name__}
    if run is None:
        return 0, meta
    if not resume:
        if run.latest_checkpoint() is not None or (run.path / "metrics.jsonl").exists():
            raise CheckpointError(f"run {run.path} already has a training log: pass resume=True "
                                  f"to continue it, or Run.create(...) a new run")
        _barrier(world)                               # every rank has looked before rank 0 writes
        if rank == 0:
            run.write_config(**meta)
            run.start_log(LOG_COLUMNS + (diagnostic_columns(model) if cfg.diag_every else []))
        return 0, meta
    info = run.latest_checkpoint()
    if info is None:
        raise CheckpointError(f"run {run.path} has no checkpoint to resume from: train it "
                              f"without resume=True first")
    tensors, saved = load_checkpoint(info)
    _check_resumable(saved, meta)
    restore_model(model, tensors)
    opt.load_state_dict(optimizer_state(tensors, saved))
    restore_rng(tensors, saved, g)
    start = saved["step"]
    for r in run.rows():
        if r["step"] < start:
            _record(history, r)
    _barrier(world)                                   # every rank has read the run before rank 0 edits it
    if rank == 0:
        run.start_log()
        dropped = run.truncate_log(start)
        print(f"[labkit] resumed {run.path.name} at step {start}" +
              (f" ({dropped} logged rows after the checkpoint will be replayed)" if dropped else ""))
    return start, meta


def _model_config(model):
    """The model's config for config.json and resume checks: the labkit GPT's dataclass, or a
    Hugging Face config as a dict."""
    if is_dataclass(getattr(model, "cfg", None)):
        return model.cfg
    config = getattr(model, "config", None)
    if hasattr(config, "to_json_string"):
        return {k: v for k, v in json.loads(config.to_json_string()).items() if k != "transformers_version"}
    return None


def _check_resumable(saved: dict, meta: dict) -> None:
    """Refuse to resume with another TrainConfig (a longer budget, ``max_seconds``, is fine) or model."""
    same = lambda a, b: to_jsonable(a) == to_jsonable(b)
    now_cfg = asdict(meta["train_config"])
    saved_cfg = saved.get("train_config", {})
    diff = [f"{k}: checkpoint {saved_cfg[k]!r} vs now {v!r}" for k, v in now_cfg.items()
            if k in saved_cfg and k != "max_seconds" and not same(saved_cfg[k], v)]
    if diff:
        raise CheckpointError("cannot resume with a different TrainConfig (" + "; ".join(diff) +
                              "): pass the config saved in the run's config.json, or start a new run")
    now_model, saved_model = to_jsonable(meta["model_config"]), saved.get("model_config")
    if isinstance(now_model, dict) and isinstance(saved_model, dict):
        diff = [f"{k}: {saved_model.get(k)!r} vs {v!r}" for k, v in now_model.items()
                if not same(saved_model.get(k), v)]
        if diff:
            raise CheckpointError("the checkpoint is for a different model (" + "; ".join(diff) +
                                  "): build the model from the run's config.json")


def _record(history: History, row: dict) -> None:
    history.rows.append(row)
    for k in ("step", "loss", "lr", "grad_norm", "tokens_per_sec"):
        history[k].append(row.get(k))
    if row.get("val_step") == row["step"]:
        history["val_step"].append(row["step"])
        history["val_loss"].append(row["val_loss"])


def _completed_steps(history: History, start: int) -> int:
    return history["step"][-1] + 1 if history["step"] and history["step"][-1] >= start else start


# ----------------------------------------------------------------------------- torch.distributed

def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local_batch(data, split: str, cfg: TrainConfig, g: torch.Generator, rank: int, world: int,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of the global batch. Every rank draws the same ``batch_size``
    sequences (same generator, same state) and keeps its ``batch_size / world`` of them, so the
    ranks together see exactly the batch one process would, and a checkpoint's data position
    holds for any number of processes."""
    x, y = data.batch(split, cfg.batch_size, cfg.block_size, g)               # (B, T) each
    if world > 1:
        n = cfg.batch_size // world
        x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]         # (B / world, T)
    return x.to(device), y.to(device)


def _sum_over_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- command line

CLI_HELP = """Train a labkit GPT from a config file, in one process or under torchrun.

    python -m labkit.train --config configs/shakespeare_char.json          # one process
    torchrun --nproc_per_node=2 -m labkit.train --config configs/shakespeare_char.json   # DDP, CPU
    torchrun --nproc_per_node=8 -m labkit.train --config configs/shakespeare_char_gpu.json
    python -m labkit.train --resume runs/shakespeare_char                   # after an interrupt

A config file is JSON with four parts: "model" (labkit.gpt.GPTConfig fields; vocab_size
defaults to the tokenizer's), "train" (TrainConfig fields), "data" ({"source": "shakespeare",
"tokenizer": "char" | "bpe", "vocab_size", "max_chars"}, or {"factory": "module:function",
"kwargs": {...}} for any object with .batch(split, batch_size, block_size, generator)) and
"run" ({"root": "runs", "name": ...}). The run directory gets the file as launch.json, which
--resume reads.
"""


class PrintProgress(Callback):
    """One line per evaluation: the command line's progress report."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step(self, step: int, row: dict) -> None:
        if row["val_step"] == step:
            print(f"step {step + 1:>6}/{self.steps}  loss {row['loss']:.4f}  val {row['val_loss']:.4f}  "
                  f"{row['tokens_per_sec']:,.0f} tokens/s", flush=True)


def build_data(spec: dict):
    """The training data a config's "data" part describes."""
    if "factory" in spec:
        module, _, name = spec["factory"].partition(":")
        return getattr(importlib.import_module(module), name)(**spec.get("kwargs", {}))
    if spec.get("source") == "shakespeare":
        from .data import shakespeare_data
        return shakespeare_data(spec.get("tokenizer", "char"), vocab_size=spec.get("vocab_size", 512),
                                max_chars=spec.get("max_chars"))
    raise ValueError(f"data spec {spec!r}: use {{\"source\": \"shakespeare\", \"tokenizer\": \"char\"}} or "
                     f"{{\"factory\": \"module:function\", \"kwargs\": {{...}}}}")


def build_model(spec: dict, data, seed: int):
    """The labkit GPT a config's "model" part describes, initialised from ``seed``."""
    from .gpt import GPT, GPTConfig
    spec = dict(spec)
    if spec.get("vocab_size") is None:
        tokenizer = getattr(data, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("the model config needs vocab_size: the data has no tokenizer to take it from")
        spec["vocab_size"] = tokenizer.vocab_size
    unknown = set(spec) - {f.name for f in fields(GPTConfig)}
    if unknown:
        raise ValueError(f"unknown GPTConfig fields {sorted(unknown)} in the model config")
    torch.manual_seed(seed)                 # the same initial weights in every process
    return GPT(GPTConfig(**spec))


def train_config(spec: dict) -> TrainConfig:
    unknown = set(spec) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown TrainConfig fields {sorted(unknown)} in the train config")
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})


def _join_process_group() -> tuple[int, int, torch.device]:
    """Under torchrun (it sets WORLD_SIZE, RANK, LOCAL_RANK): join the process group, NCCL with one
    GPU per process, else gloo on CPU. Alone: one process on the best device."""
    from .runtime import choose_threads, pick_device
    device = pick_device()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        if device.type == "cpu":
            choose_threads()
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.train", description=CLI_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="a JSON config file (see configs/)")
    ap.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue this run from its latest checkpoint")
    ap.add_argument("--out", type=Path, help="root of the run directories (default: the config's run.root)")
    args = ap.parse_args(argv)
    if (args.config is None) == (args.resume is None):
        ap.error("give --config FILE (a new run) or --resume RUN_DIR (continue one)")
    config_path = args.config or args.resume / "launch.json"
    if not config_path.is_file():
        ap.error(f"{config_path} does not exist" + (": was this run started by python -m labkit.train?"
                                                      if args.resume else ""))
    spec = json.loads(config_path.read_text())
    rank, world, device = _join_process_group()
    try:
        cfg = train_config(spec["train"])
        data = build_data(spec["data"])
        model = build_model(spec["model"], data, cfg.seed).to(device)
        run = Run(args.resume) if args.resume else _new_run(spec, args.out, config_path.stem, model, rank, world)
        if rank == 0:
            print(f"[labkit] {model.num_params():,} parameters | {world} process(es) on {device.type} | "
                  f"global batch {cfg.batch_size} x {cfg.block_size} tokens | run {run.path}", flush=True)
        try:
            history = train(model, data, cfg, run=run, resume=args.resume is not None,
                            callbacks=[PrintProgress(cfg.steps)], progress=False)
        except KeyboardInterrupt:
            if rank == 0:
                print(f"[labkit] continue with: python -m labkit.train --resume {run.path}", flush=True)
            return 130
        if rank == 0:
            print(f"[labkit] done: {history.steps_done} steps, val loss {history['val_loss'][-1]:.4f}, "
                  f"run {run.path}", flush=True)
        return 0
    finally:
        if world > 1:
            dist.destroy_process_group()


def _new_run(spec: dict, out: Path | None, default_name: str, model, rank: int, world: int) -> Run:
    """Rank 0 creates a fresh run directory and writes launch.json; the others learn its path."""
    where = spec.get("run", {})
    path = [None]
    if rank == 0:
        run = Run.create(out or where.get("root", "runs"), where.get("name", default_name))
        launch = {**spec, "model": {**spec["model"], "vocab_size": model.cfg.vocab_size}}
        atomic_write(run.path / "launch.json", lambda p: p.write_text(json.dumps(launch, indent=2)))
        path = [str(run.path)]
    if world > 1:
        dist.broadcast_object_list(path, src=0)
    return Run(path[0])


if __name__ == "__main__":
    # run the imported module's main, so labkit.train.TrainConfig is one class, not two
    from labkit.train import main as _main
    sys.exit(_main())
