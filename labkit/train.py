"""The lab's one training loop: AdamW, warmup + cosine, validation, diagnostics, logs, checkpoints.

    cfg = TrainConfig(steps=500, batch_size=16, block_size=128, lr=3e-3)
    history = train(model, data, cfg)        # model: labkit.gpt.GPT; data: labkit.data.TokenData
    history["loss"][-1], history["val_loss"][-1]

The pretraining lab (notebook 11) turns on the rest::

    run = Run.create(lab.runs_dir, "baseline")            # a fresh directory, never reused
    cfg = TrainConfig(steps=600, diag_every=20, checkpoint_every=200)
    live = LiveCurves(panels={...}, stoppable=True)       # curves + a Stop button in JupyterLab
    history = train(model, data, cfg, run=run, monitor=live)
    # interrupted (Stop button or the kernel's interrupt)? a checkpoint was saved:
    history = train(model, data, cfg, run=run, resume=True)   # == the uninterrupted run, bit for bit

Per step: loss, lr, grad_norm, tokens_sec. With ``diag_every`` > 0, also per step the
update-to-data ratio std(update) / std(param) of every weight matrix (its log10 should hover
near -3: much lower and the layer is not learning, much higher and it is thrashing), and
every ``diag_every`` steps, from one extra no-grad forward and one extra half-batch backward:
dead-unit percentage and attention entropy per layer, and the gradient noise scale
B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training"): the batch size, in tokens, beyond which larger batches stop buying faster progress.
Diagnostics never change the training trajectory: they use their own random streams and run
before the training forward.

Deterministic given ``cfg.seed`` on CPU with a fixed thread count; a resumed run equals the
uninterrupted one bit for bit (tests).
"""
from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .plotting import in_batch_run
from .runs import CheckpointError, Run, load_checkpoint, model_state, optimizer_state, restore_rng


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
    eval_every: int = 100          # val loss after step 0, every eval_every steps and at the end
    eval_batches: int = 8
    aux_weight: float = 0.01       # MoE load-balancing loss weight (ignored without MoE)
    seed: int = 0
    diag_every: int = 0            # 0: no diagnostics; N: update ratios every step, the rest every N
    checkpoint_every: int = 0      # 0: only the final checkpoint (needs run=); N: also every N steps


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
    device = next(model.parameters()).device
    losses = [model(*(t.to(device) for t in data.batch(split, cfg.batch_size, cfg.block_size, g)))[1].item()
              for _ in range(cfg.eval_batches)]
    model.train(was_training)
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------- diagnostics

def param_group(name: str) -> str:
    """Which part of the model a parameter belongs to, for per-group update ratios.

    >>> [param_group(n) for n in ("wte.weight", "blocks.0.attn.qkv.weight", "blocks.3.mlp.fc.weight", "lm_head.weight")]
    ['embed', 'attn', 'mlp', 'head']
    """
    if ".attn." in name:
        return "attn"
    if ".mlp." in name or ".moe." in name:
        return "mlp"
    if name.startswith("lm_head"):
        return "head"
    return "embed"


def update_ratios(before: dict[str, torch.Tensor], model) -> dict[str, float]:
    """std(update) / std(param) per weight matrix, averaged per group in log10.

    Returns ``update_ratio`` (the median matrix's log10 ratio) and ``ud_<group>`` (mean log10
    ratio of that group's matrices). Karpathy's heuristic: healthy is near -3.
    """
    per_group: dict[str, list[float]] = {}
    for name, p in model.named_parameters():
        if name in before:
            ratio = ((p.detach() - before[name]).std() / (before[name].std() + 1e-12)).item()
            per_group.setdefault(param_group(name), []).append(math.log10(ratio + 1e-20))
    every = sorted(v for vs in per_group.values() for v in vs)
    row = {"update_ratio": every[len(every) // 2]}
    row.update({f"ud_{g}": sum(vs) / len(vs) for g, vs in per_group.items()})
    return row


@torch.no_grad()
def activation_stats(model, x: torch.Tensor) -> dict[str, float]:
    """Dead-unit % and attention entropy (nats) per layer, from one no-grad forward on ``x``.

    A unit is dead when |activation| <= 1e-6 on every token of the batch (exactly zero for
    ReLU). Entropy is averaged over heads and query positions; a query at position t can reach
    at most ln(t + 1) nats (uniform attention over what it sees).
    """
    from .hooks import capture
    names = [n for n in model.hook_points() if n.endswith(("attn.hook_pattern", "hook_post"))]
    was_training = model.training
    model.eval()
    with capture(model, names) as cache:
        model(x)
    model.train(was_training)
    row, dead, ent = {}, [], []
    for layer in range(len(model.blocks)):
        acts = [v for k, v in cache.items() if k.startswith(f"blocks.{layer}.") and k.endswith("hook_post")]
        if acts:
            alive = torch.cat([(a.abs() > 1e-6).flatten(0, -2).any(dim=0) for a in acts])  # (units,)
            row[f"dead_perc_{layer}"] = 100.0 * (1 - alive.float().mean().item())
            dead.append(row[f"dead_perc_{layer}"])
        pattern = cache.get(f"blocks.{layer}.attn.hook_pattern")               # (B, H, T, T)
        if pattern is not None:
            h = -(pattern * pattern.clamp_min(1e-12).log()).sum(-1)          # (B, H, T)
            row[f"attn_entropy_{layer}"] = h.mean().item()
            ent.append(row[f"attn_entropy_{layer}"])
    if dead:
        row["dead_perc"] = sum(dead) / len(dead)
    if ent:
        row["attn_entropy"] = sum(ent) / len(ent)
    return row


def half_batch_grads(model, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Gradient of the loss on the first half of the batch (no ``.grad`` touched, own RNG)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[]):       # dropout here must not shift training's RNG
        _, loss = model(x[: x.shape[0] // 2], y[: x.shape[0] // 2])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def grad_noise(first_half: list[torch.Tensor], full: list[torch.Tensor], tokens: int) -> dict[str, float]:
    """|G|^2 and tr(Sigma) from the full batch's gradient and its first half's (McCandlish App. A).

    With gradients of the same parameters at two batch sizes b < B (in tokens),
    E|g_b|^2 = |G|^2 + tr(Sigma)/b, so two sizes give both unknowns. The second half's
    gradient is 2*g_full - g_first_half, so one extra half-batch backward is enough.

    >>> full, half = torch.tensor([1.0, 0.0]), torch.tensor([1.5, -0.5])  # other half: [0.5, 0.5]
    >>> r = grad_noise([half], [full], tokens=2)     # 1 token per half: E|g_1|^2 = 1.5, |g_2|^2 = 1.0
    >>> round(r["grad_sq"], 3), round(r["grad_trace"], 3)  # 1.5 = G2 + tr/1 and 1.0 = G2 + tr/2
    (0.5, 1.0)
    """
    sq = lambda gs: sum((g.double() ** 2).sum().item() for g in gs)
    second_half = [2 * f - a for f, a in zip(full, first_half)]
    small, big = tokens / 2, tokens
    g_small_sq = (sq(first_half) + sq(second_half)) / 2
    g_big_sq = sq(full)
    return {"grad_sq": (big * g_big_sq - small * g_small_sq) / (big - small),
            "grad_trace": (g_small_sq - g_big_sq) / (1 / small - 1 / big)}


def noise_scale(rows: list[dict], last: int = 5) -> float | None:
    """B_simple = tr(Sigma) / |G|^2 in tokens, from the last ``last`` measurements (each alone is
    too noisy; McCandlish et al. average numerator and denominator separately)."""
    measured = [r for r in rows if r.get("grad_sq") is not None][-last:]
    if not measured:
        return None
    g2 = sum(r["grad_sq"] for r in measured)
    return sum(r["grad_trace"] for r in measured) / g2 if g2 > 0 else None


class _DeferInterrupt:
    """Ctrl-C / the kernel's interrupt button during a step: finish the step, then raise.

    A KeyboardInterrupt in the middle of ``opt.step()`` would leave half-updated weights, and a
    checkpoint of those could never resume bit for bit. A second interrupt raises at once.
    """

    def __enter__(self):
        self.requested, self.old = False, None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("[labkit] interrupt: finishing this step, then saving a checkpoint (interrupt again to abort now)")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


# ----------------------------------------------------------------------------- the loop

class History(dict):
    """What ``train`` returns: lists by name (``loss``, ``val_loss``, ...), plus ``.rows``
    (every logged row), ``.stopped`` (True if the Stop button ended it) and ``.run``."""
    stopped: bool = False
    run: Run | None = None
    rows: list[dict]


def _check_resumable(meta: dict, model, cfg: TrainConfig) -> None:
    saved_cfg = meta.get("train_config", {})
    now_cfg = {k: v for k, v in asdict(cfg).items()}
    diff = [f"{k}: checkpoint {saved_cfg.get(k)!r} vs now {v!r}" for k, v in now_cfg.items()
            if json_equal(saved_cfg.get(k), v) is False]
    if diff:
        raise CheckpointError("cannot resume with a different TrainConfig (" + "; ".join(diff) +
                              "): pass the config saved in the run's config.json, or start a new run")
    model_cfg = getattr(model, "cfg", None)
    if model_cfg is not None and meta.get("model_config") is not None:
        now = asdict(model_cfg)
        diff = [f"{k}: {meta['model_config'].get(k)!r} vs {v!r}" for k, v in now.items()
                if json_equal(meta["model_config"].get(k), v) is False]
        if diff:
            raise CheckpointError("the checkpoint is for a different model (" + "; ".join(diff) +
                                  "): build the model from the run's config.json")


def json_equal(a, b) -> bool:
    norm = lambda v: list(v) if isinstance(v, tuple) else v
    return norm(a) == norm(b)


def train(model, data, cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None,
          progress: bool | None = None, *, run: Run | None = None, resume: bool = False,
          monitor=None) -> History:
    """Train ``model`` on ``data``; return the ``History``.

    ``on_step(step, row)`` is called after every step; ``row`` holds loss, lr, grad_norm,
    tokens_sec, val_loss (the latest measured, with val_step saying when) and the diagnostics.
    ``run``: log metrics.csv / metrics.jsonl and checkpoint into this ``Run``; the final step
    is always checkpointed, and so is the last completed step when training is interrupted
    (KeyboardInterrupt, re-raised after saving) or stopped (``monitor.stop_requested``).
    ``resume=True`` continues ``run`` from its latest checkpoint.
    ``monitor``: anything with ``update(step, **row)`` (``LiveCurves``); ``close()`` is called at the end.
    """
    from tqdm.auto import tqdm

    if resume and run is None:
        raise ValueError("resume=True needs run=Run(path) (the directory of the run to continue)")
    if cfg.diag_every and cfg.batch_size < 2:
        raise ValueError("diagnostics split the batch in two for the gradient noise scale: "
                         "use batch_size >= 2 or diag_every=0")
    device = next(model.parameters()).device
    opt = make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    history = History({k: [] for k in ("step", "loss", "lr", "grad_norm", "tokens_per_sec",
                                       "val_step", "val_loss")})
    history.rows, history.run = [], run
    start, last_val = 0, (None, None)

    if run is not None:
        model_cfg = getattr(model, "cfg", None)
        meta = {"train_config": cfg, "model_config": model_cfg,
                "model_class": type(model).__name__}
        if resume:
            info = run.latest_checkpoint()
            if info is None:
                raise CheckpointError(f"run {run.path} has no checkpoint to resume from: train it "
                                      f"without resume=True first")
            tensors, saved = load_checkpoint(info)
            _check_resumable(saved, model, cfg)
            model.load_state_dict(model_state(tensors))
            opt.load_state_dict(optimizer_state(tensors, saved))
            restore_rng(tensors, saved, g)
            start = saved["step"]
            run.start_log([])
            dropped = run.truncate_log(start)
            print(f"[labkit] resumed {run.path.name} at step {start}" +
                  (f" ({dropped} logged rows after the checkpoint will be replayed)" if dropped else ""))
            for r in run.rows():
                _record(history, r)
            if history["val_loss"]:
                last_val = (history["val_step"][-1], history["val_loss"][-1])
        else:
            if run.latest_checkpoint() is not None or (run.path / "metrics.jsonl").exists():
                raise CheckpointError(f"run {run.path} already has a training log: pass resume=True "
                                      f"to continue it, or Run.create(...) a new run")
            run.write_config(**meta)
            run.start_log(_columns(model, cfg))

    def checkpoint(step_done: int) -> None:
        if run is not None:
            run.save_checkpoint(step_done, model, opt, g, meta)

    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps,
               disable=in_batch_run() if progress is None else not progress)
    guard = _DeferInterrupt()
    try:
        guard.__enter__()
        for step in bar:
            row = _train_step(model, data, cfg, opt, g, step, device)
            if "grad_sq" in row:
                row["noise_scale"] = noise_scale(history.rows + [row])
            if step == 0 or (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
                last_val = (step, evaluate(model, data, cfg))
                bar.set_postfix(loss=f"{row['loss']:.3f}", val=f"{last_val[1]:.3f}")
            row["val_step"], row["val_loss"] = last_val
            _record(history, row)
            if run is not None:
                run.log(row)
            if on_step:
                on_step(step, row)
            if monitor is not None:
                monitor.update(step, **{k: v for k, v in row.items() if k != "step"})
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                checkpoint(step + 1)
            if guard.requested:
                raise KeyboardInterrupt
            if getattr(monitor, "stop_requested", False):
                history.stopped = True
                break
    except KeyboardInterrupt:
        done = _completed_steps(history, start)
        if run is not None and done > start:
            checkpoint(done)
            print(f"[labkit] interrupted: checkpoint at step {done} in {run.path}; continue with "
                  f"train(model, data, cfg, run=Run({str(run.path)!r}), resume=True)")
        raise
    finally:
        guard.__exit__()
        if monitor is not None and hasattr(monitor, "close"):
            monitor.close()
    done = _completed_steps(history, start)
    if run is not None and done > start:
        checkpoint(done)
        if history.stopped:
            print(f"[labkit] stopped at step {done}; checkpoint in {run.path}; continue with "
                  f"train(model, data, cfg, run=Run({str(run.path)!r}), resume=True)")
    model.eval()
    return history


def _columns(model, cfg: TrainConfig) -> list[str]:
    if not cfg.diag_every:
        return []
    groups = sorted({param_group(n) for n, p in model.named_parameters() if p.dim() >= 2})
    layers = range(len(getattr(model, "blocks", [])))
    return ([f"ud_{g}" for g in groups] + ["grad_sq", "grad_trace"] +
            [f"dead_perc_{i}" for i in layers] + [f"attn_entropy_{i}" for i in layers])


def _record(history: History, row: dict) -> None:
    history.rows.append(row)
    history["step"].append(row["step"])
    for k in ("loss", "lr", "grad_norm"):
        history[k].append(row[k])
    history["tokens_per_sec"].append(row["tokens_sec"])
    if row.get("val_step") == row["step"]:
        history["val_step"].append(row["step"])
        history["val_loss"].append(row["val_loss"])


def _completed_steps(history: History, start: int) -> int:
    return history["step"][-1] + 1 if history["step"] and history["step"][-1] >= start else start


def _train_step(model, data, cfg: TrainConfig, opt, g: torch.Generator, step: int, device) -> dict:
    """One optimizer step (plus diagnostics when due); returns that step's row."""
    lr = lr_at(step, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    x, y = (t.to(device) for t in data.batch("train", cfg.batch_size, cfg.block_size, g))
    diag = cfg.diag_every and step % cfg.diag_every == 0
    row: dict = {"step": step}
    first_half = None
    if diag:               # before the training forward: MoE layers keep the last forward's
        row.update(activation_stats(model, x))          # routing counts, which must be training's
        first_half = half_batch_grads(model, x, y)
    t0 = time.perf_counter()                   # tokens_sec: the training work, not diagnostics
    _, loss = model(x, y)
    aux = model.aux_loss() if hasattr(model, "aux_loss") else torch.zeros(())
    total = loss + cfg.aux_weight * aux
    opt.zero_grad(set_to_none=True)
    total.backward()
    if first_half is not None and (cfg.aux_weight == 0 or aux.item() == 0):   # LM loss's gradient only
        full = [p.grad if p.grad is not None else torch.zeros_like(p)
                for p in model.parameters() if p.requires_grad]
        row.update(grad_noise(first_half, full, x.numel()))
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0
                                          else float("inf"))
    before = ({n: p.detach().clone() for n, p in model.named_parameters() if p.dim() >= 2}
              if cfg.diag_every else None)
    opt.step()
    if before is not None:
        row.update(update_ratios(before, model))
    elapsed = time.perf_counter() - t0
    row.update(loss=loss.item(), lr=lr, grad_norm=norm.item(), tokens_sec=x.numel() / elapsed)
    return row

