"""One training loop for the lab's small models: AdamW, warmup + cosine, periodic val loss.

    cfg = TrainConfig(steps=500, batch_size=16, block_size=128, lr=3e-3)
    history = train(model, data, cfg)        # model: labkit.gpt.GPT; data: labkit.data.TokenData
    history["loss"][-1], history["val_loss"][-1]

The pretraining lab (notebook 11) grows this loop with diagnostics, logging and checkpoints;
keep it one loop. It is deterministic given ``cfg.seed`` on CPU.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .plotting import in_batch_run


@dataclass
class TrainConfig:
    steps: int = 500
    batch_size: int = 16
    block_size: int = 128
    lr: float = 3e-3               # peak learning rate, reached after warmup
    min_lr: float = 3e-4           # the cosine decays to this at the last step
    warmup_steps: int = 50
    weight_decay: float = 0.1      # on matrices only: decaying norms and biases only hurts
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0         # max global grad norm; 0 disables clipping
    eval_every: int = 100          # steps between val-loss measurements (and at the last step)
    eval_batches: int = 8
    aux_weight: float = 0.01       # MoE load-balancing loss weight (ignored without MoE)
    seed: int = 0


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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on >= 2-D parameters (matrices, embeddings) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@torch.no_grad()
def evaluate(model, data, cfg: TrainConfig, split: str = "val") -> float:
    """Mean loss over ``eval_batches`` batches drawn with a fixed seed: the same windows every call."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(10_000 + cfg.seed)
    losses = [model(*data.batch(split, cfg.batch_size, cfg.block_size, g))[1].item()
              for _ in range(cfg.eval_batches)]
    model.train(was_training)
    return sum(losses) / len(losses)


def train(model, data, cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None,
          progress: bool | None = None) -> dict[str, list]:
    """Train ``model`` on ``data``; return the history (per-step and per-eval lists).

    ``on_step(step, row)`` is called after every step (e.g. ``LiveCurves.update``); ``row``
    holds loss, lr, grad_norm, tokens_per_sec and, on eval steps, val_loss.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    opt = make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    history = {k: [] for k in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "val_step", "val_loss")}
    model.train()
    bar = tqdm(range(cfg.steps), disable=in_batch_run() if progress is None else not progress)
    for step in bar:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = (t.to(device) for t in data.batch("train", cfg.batch_size, cfg.block_size, g))
        _, loss = model(x, y)
        total = loss + cfg.aux_weight * model.aux_loss() if hasattr(model, "aux_loss") else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0
                                              else float("inf"))
        opt.step()
        row = {"loss": loss.item(), "lr": lr, "grad_norm": norm.item(),
               "tokens_per_sec": x.numel() / (time.perf_counter() - t0)}
        for k, v in row.items():
            history[k].append(v)
        history["step"].append(step)
        if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
            row["val_loss"] = evaluate(model, data, cfg)
            history["val_step"].append(step)
            history["val_loss"].append(row["val_loss"])
            bar.set_postfix(loss=f"{row['loss']:.3f}", val=f"{row['val_loss']:.3f}")
        if on_step:
            on_step(step, row)
    model.eval()
    return history
