"""Research diagnostics for the training loop: is every layer learning, are units dying, is
attention collapsing, and beyond which batch size do bigger batches stop helping?

``train(..., cfg)`` with ``cfg.diag_every = N > 0`` measures, and logs into the same rows:

    update_ratio, ud_<group>    every step    log10 std(update) / std(param) per weight matrix:
                                              near -3 is healthy (Karpathy's heuristic); much
                                              lower and the layer is not learning, much higher
                                              and it is thrashing
    dead_perc(_<layer>)         every N steps % of MLP units that never fire on the batch
    attn_entropy(_<layer>)      every N steps nats; a query at position t reaches at most ln(t + 1)
    grad_sq, grad_trace,        every N steps the gradient noise scale B_simple = tr(Sigma) / |G|^2
    noise_scale                               in tokens (McCandlish et al. 2018, "An Empirical
                                              Model of Large-Batch Training")

They never change the training trajectory: the extra forward (no grad) and the extra half-batch
backward run before the training forward, on their own random streams, and touch no ``.grad``.
Dead units and attention entropy read ``blocks.{i}.mlp.hook_post`` and
``blocks.{i}.attn.hook_pattern`` through ``labkit.hooks.capture``.

The loop calls one ``Diagnostics`` object at four moments of a step::

    probe = Diagnostics(model, every=20, loss_fn=lm_loss, past_rows=history.rows)
    row.update(probe.before_forward(step, x, y))    # activation stats, half-batch gradient
    ...forward, backward...
    row.update(probe.after_backward(x.numel(), aux))   # gradient noise from full vs half batch
    ...clip...
    probe.before_update()                          # keep the weights before the optimizer step
    opt.step()
    row.update(probe.after_update())               # update-to-data ratios
"""
from __future__ import annotations

import math

import torch


def param_group(name: str) -> str:
    """Which part of the model a parameter belongs to, for per-group update ratios (labkit GPT and
    Hugging Face names).

    >>> [param_group(n) for n in ("wte.weight", "blocks.0.attn.qkv.weight", "blocks.3.mlp.fc.weight", "lm_head.weight")]
    ['embed', 'attn', 'mlp', 'head']
    >>> [param_group(n) for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight")]
    ['attn', 'mlp']
    """
    if ".attn." in name or ".self_attn." in name:
        return "attn"
    if ".mlp." in name:                  # the labkit MoE lives at blocks.{i}.mlp too
        return "mlp"
    if name.startswith("lm_head"):
        return "head"
    return "embed"


def columns(model) -> list[str]:
    """The CSV columns these diagnostics add for ``model`` (the JSONL keeps every key anyway)."""
    groups = sorted({param_group(n) for n, p in model.named_parameters() if p.dim() >= 2 and p.requires_grad})
    layers = range(len(getattr(model, "blocks", [])))
    return (["update_ratio", "dead_perc", "attn_entropy", "noise_scale"] + [f"ud_{g}" for g in groups] +
            ["grad_sq", "grad_trace"] + [f"dead_perc_{i}" for i in layers] +
            [f"attn_entropy_{i}" for i in layers])


def update_ratios(before: dict[str, torch.Tensor], model) -> dict[str, float]:
    """std(update) / std(param) per weight matrix, averaged per group in log10.

    Returns ``update_ratio`` (the median matrix's log10 ratio) and ``ud_<group>`` (mean log10
    ratio of that group's matrices).
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
    ReLU). Entropy is averaged over heads and query positions.
    """
    from .hooks import capture
    was_training = model.training
    model.eval()
    with capture(model, lambda n: n.endswith(("attn.hook_pattern", "hook_post"))) as cache:
        model(x)
    model.train(was_training)
    row, dead, ent = {}, [], []
    for layer in sorted({int(name.split(".")[1]) for name in cache}):
        # blocks.{i}.mlp.hook_post (B, T, units), or one (tokens routed, units) per MoE expert
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


def half_batch_grads(model, x: torch.Tensor, y: torch.Tensor, loss_fn) -> list[torch.Tensor]:
    """Gradient of the loss on the first half of the batch (no ``.grad`` touched, own RNG)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[]):       # dropout here must not shift training's RNG
        loss = loss_fn(model, x[: x.shape[0] // 2], y[: x.shape[0] // 2])
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
    too noisy; McCandlish et al. average numerator and denominator separately).

    >>> noise_scale([{"grad_sq": 2.0, "grad_trace": 100.0}, {"loss": 3.0}, {"grad_sq": 2.0, "grad_trace": 300.0}])
    100.0
    """
    measured = [r for r in rows if r.get("grad_sq") is not None][-last:]
    if not measured:
        return None
    g2 = sum(r["grad_sq"] for r in measured)
    return sum(r["grad_trace"] for r in measured) / g2 if g2 > 0 else None


class Diagnostics:
    """Everything above, at the right moment of one training step (see the module docstring).

    ``past_rows``: the rows logged before a resume, so the noise scale's running average
    continues exactly where the interrupted run left it.
    """

    def __init__(self, model, every: int, loss_fn, past_rows: list[dict] = ()):
        self.model, self.every, self.loss_fn = model, every, loss_fn
        self.measured = [{"grad_sq": r["grad_sq"], "grad_trace": r["grad_trace"]}
                         for r in past_rows if r.get("grad_sq") is not None]
        self.first_half = self.before = None

    def before_forward(self, step: int, x: torch.Tensor, y: torch.Tensor) -> dict:
        """Every ``every`` steps: dead units, attention entropy, the half-batch gradient."""
        if step % self.every:
            return {}
        # before the training forward: MoE layers keep the last forward's routing counts,
        # which must be training's
        row = activation_stats(self.model, x)
        self.first_half = half_batch_grads(self.model, x, y, self.loss_fn)
        return row

    def after_backward(self, tokens: int, aux: torch.Tensor | None) -> dict:
        """The gradient noise from the full batch's gradient (the LM loss's alone: skipped when
        an auxiliary loss also contributed)."""
        first_half, self.first_half = self.first_half, None
        if first_half is None or (aux is not None and aux.item() != 0):
            return {}
        full = [p.grad if p.grad is not None else torch.zeros_like(p)
                for p in self.model.parameters() if p.requires_grad]
        row = grad_noise(first_half, full, tokens)
        self.measured.append(row)
        return {**row, "noise_scale": noise_scale(self.measured)}

    def before_update(self) -> None:
        self.before = {n: p.detach().clone() for n, p in self.model.named_parameters()
                       if p.dim() >= 2 and p.requires_grad}

    def after_update(self) -> dict:
        before, self.before = self.before, None
        return update_ratios(before, self.model)
