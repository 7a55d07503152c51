"""A Bayesian wind tunnel: a task whose exact posterior is known, and small models to test on it.

Bijection elimination (Agarwal, Dalal, Misra 2025, arXiv 2512.22471). Each sequence draws a
fresh random bijection pi from V keys to V values, so nothing can be memorised across
sequences; the sequence shows pairs ``k1 pi(k1) k2 pi(k2) ...`` and at every *key* position the
model predicts the value. Before a value is shown, the only thing the context tells you is
which values are already taken, so the exact posterior is uniform over the unrevealed values:

    >>> V = 4
    >>> keys, vals = make_batch(1, V, n_pairs=3, generator=torch.Generator().manual_seed(0))
    >>> keys.tolist(), vals.tolist()           # keys 0..V-1, values as indices 0..V-1
    ([[0, 2, 1]], [[2, 0, 3]])
    >>> post = bayes_posterior(keys, vals, V)  # (B, L, V): one distribution per key position
    >>> [[round(x, 3) for x in row] for row in post[0].tolist()]   # values 2, then 2 and 0, ruled out
    [[0.25, 0.25, 0.25, 0.25], [0.333, 0.333, 0.0, 0.333], [0.0, 0.5, 0.0, 0.5]]
    >>> [round(h, 3) for h in entropy_bits(post)[0].tolist()]   # log2(V - t) bits, t = pairs shown
    [2.0, 1.585, 1.0]

With ``p_repeat > 0`` a key may come back; its value is then certain (0 bits), so the entropy
no longer falls with position alone -- the variant that separates "belief" from "position".

Tokens fed to a model: keys are ids ``0..V-1``, values ``V..2V-1`` (``to_tokens``); the model
emits V logits (one per value) at each key position. Models here expose hook-able pieces
with TransformerLens-style names (``blocks.0.attn.hook_pattern`` ...) through ``cache=``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gpt import apply_rope, rope_cos_sin  # one RoPE in labkit: Llama's, the one HF uses

LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------- the task

def make_batch(batch: int, n_keys: int, n_pairs: int | None = None, p_repeat: float = 0.0,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``batch`` sequences of ``n_pairs`` (key, value) pairs, each under a fresh bijection.

    Returns ``keys, vals``, both (B, L) int64 in ``0..V-1`` (vals are value *indices*; add V
    for token ids). ``p_repeat``: chance that a pair re-asks an already shown key (from the
    second pair on); otherwise the key is a fresh one, uniformly among the unseen.
    ``n_pairs`` defaults to V - 1 (the last pair would always be certain, so it teaches nothing).

    >>> k, v = make_batch(1, 5, n_pairs=8, p_repeat=0.5, generator=torch.Generator().manual_seed(2))
    >>> k.tolist(), v.tolist()                 # a repeated key always shows the same value
    ([[4, 2, 4, 1, 3, 0, 4, 3]], [[4, 0, 4, 3, 2, 1, 4, 2]])
    """
    V = n_keys
    L = V - 1 if n_pairs is None else n_pairs
    g = generator
    perm = torch.argsort(torch.rand(batch, V, generator=g), dim=1)       # (B, V): pi(k) = perm[k]
    if p_repeat == 0.0:
        assert L <= V, f"without repeats at most V={V} distinct keys fit, asked for {L}"
        keys = torch.argsort(torch.rand(batch, V, generator=g), dim=1)[:, :L]   # (B, L) distinct
    else:
        # Fresh keys come from a random order of all keys; a repeat copies an earlier key.
        order = torch.argsort(torch.rand(batch, V, generator=g), dim=1)        # (B, V)
        u_rep = torch.rand(batch, L, generator=g)                               # (B, L)
        u_pick = torch.rand(batch, L, generator=g)                              # (B, L)
        keys = torch.empty(batch, L, dtype=torch.long)
        n_fresh = torch.zeros(batch, dtype=torch.long)                          # (B,) keys used
        rows = torch.arange(batch)
        for t in range(L):
            repeat = (u_rep[:, t] < p_repeat) & (t > 0)
            repeat |= n_fresh >= V                     # every key already shown: must repeat
            j = (u_pick[:, t] * max(t, 1)).long().clamp(max=max(t - 1, 0))      # earlier pair
            fresh_key = order[rows, n_fresh.clamp(max=V - 1)]
            keys[:, t] = torch.where(repeat, keys[rows, j] if t > 0 else fresh_key, fresh_key)
            n_fresh += (~repeat).long()
    vals = torch.gather(perm, 1, keys)                                          # (B, L)
    return keys, vals


def to_tokens(keys: torch.Tensor, vals: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Interleave pairs into one token stream ``k1 v1 k2 v2 ...``: (B, L) x2 -> (B, 2L).

    >>> to_tokens(torch.tensor([[2, 0]]), torch.tensor([[1, 3]]), n_keys=4).tolist()
    [[2, 5, 0, 7]]
    """
    return torch.stack([keys, vals + n_keys], dim=2).flatten(1)


def bayes_posterior(keys: torch.Tensor, vals: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Exact posterior over the value at every key position: (B, L) x2 -> (B, L, V).

    Seen key: all mass on its value. Unseen key: uniform over values not yet revealed
    (a bijection never reuses a value), which is all that the context says.
    """
    B, L = keys.shape
    V = n_keys
    vals_1h = F.one_hot(vals, V).float()                                         # (B, L, V)
    revealed = torch.cumsum(vals_1h, dim=1) - vals_1h > 0                        # (B, L, V) before t
    same_key = keys[:, :, None] == keys[:, None, :]                              # (B, L, L) [t, s]
    earlier = torch.ones(L, L, dtype=torch.bool).tril(-1)                        # s < t
    seen = (same_key & earlier).any(dim=2)                                       # (B, L)
    uniform = (~revealed).float()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    return torch.where(seen[..., None], vals_1h, uniform)


def entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits over the last axis (0 log 0 = 0).

    >>> entropy_bits(torch.tensor([0.5, 0.5, 0.0])).item()
    1.0
    """
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(-1)


def kl_bits(p: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in bits with q given as natural log-probs; finite even where p has zeros.

    KL(model || Bayes) is infinite for any softmax model (the posterior has exact zeros),
    so the usable direction is KL(Bayes || model) = cross-entropy - H_Bayes: the excess
    loss over the best possible predictor.

    >>> round(kl_bits(torch.tensor([1.0, 0.0]), torch.log(torch.tensor([0.5, 0.5]))).item(), 6)
    1.0
    """
    return (p * (torch.log(p.clamp_min(1e-30)) - q_logprobs)).sum(-1) / LOG2


# ----------------------------------------------------------------------------- the models

@dataclass
class TunnelConfig:
    n_keys: int = 20      # V; the token vocabulary is 2V (keys, then values)
    n_pairs: int = 19     # L pairs per sequence -> 2L tokens
    n_layer: int = 2
    n_head: int = 2       # head size d_model / n_head >= V lets layer-0 keys be orthogonal
    d_model: int = 64
    d_mlp: int = 256      # 4 x d_model, as in GPT-2
    pos: str = "learned"  # "learned": absolute position embeddings (GPT-2); "rope": rotary (Llama)
    rope_base: float = 10000.0

    @property
    def seq_len(self) -> int:
        return 2 * self.n_pairs


class Attention(nn.Module):
    """Causal multi-head self-attention written out, so the pattern can be cached and heads masked."""

    def __init__(self, cfg: TunnelConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0, "heads must split d_model evenly"
        self.n_head, self.d_head = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        # 1 = head on; set an entry to 0 to ablate that head (its output is zeroed before proj)
        self.register_buffer("head_mask", torch.ones(cfg.n_head), persistent=False)
        self.register_buffer("causal", torch.ones(cfg.seq_len, cfg.seq_len).tril().bool(),
                             persistent=False)
        self.rope = cfg.pos == "rope"
        if self.rope:
            cos, sin = rope_cos_sin(cfg.seq_len, self.d_head, cfg.rope_base)     # (T, hs) each
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x, cache=None, name=""):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)                                   # 3 x (B, T, C)
        q, k, v = (z.view(B, T, self.n_head, self.d_head).transpose(1, 2) for z in (q, k, v))
        q_raw, k_raw = q, k
        if self.rope:      # positions enter only here, as rotations of q and k
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)                # (B, nh, T, T)
        att = att.masked_fill(~self.causal[:T, :T], float("-inf")).softmax(-1)
        z = att @ v                                                             # (B, nh, T, hs)
        z = z * self.head_mask[None, :, None, None]
        if cache is not None:
            # TransformerLens names: hook_q/k before the rotation (content), hook_rot_q/k after
            cache[f"{name}.hook_q"], cache[f"{name}.hook_k"] = q_raw, k_raw        # (B, nh, T, hs)
            cache[f"{name}.hook_rot_q"], cache[f"{name}.hook_rot_k"] = q, k
            cache[f"{name}.hook_v"] = v
            cache[f"{name}.hook_pattern"] = att                                 # (B, nh, q, k)
            cache[f"{name}.hook_z"] = z
        return self.proj(z.transpose(1, 2).reshape(B, T, C))                    # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then + mlp(ln(x)). ``use_attn``/``use_mlp`` ablate."""

    def __init__(self, cfg: TunnelConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_mlp), nn.GELU(),
                                 nn.Linear(cfg.d_mlp, cfg.d_model))
        self.use_attn, self.use_mlp = True, True

    def forward(self, x, cache=None, name=""):
        a = self.attn(self.ln1(x), cache, f"{name}.attn") * float(self.use_attn)
        x_mid = x + a                                                           # (B, T, C)
        m = self.mlp(self.ln2(x_mid)) * float(self.use_mlp)
        x_out = x_mid + m
        if cache is not None:
            cache[f"{name}.hook_resid_pre"], cache[f"{name}.hook_attn_out"] = x, a
            cache[f"{name}.hook_resid_mid"], cache[f"{name}.hook_mlp_out"] = x_mid, m
            cache[f"{name}.hook_resid_post"] = x_out
        return x_out


class TunnelTransformer(nn.Module):
    """A small GPT for the wind tunnel: tokens (B, 2L) -> value logits (B, 2L, V).

    Only the key positions (even indices) are scored; ``value_logits`` picks them out.
    ``cfg.pos="learned"`` adds a learned position vector to the residual (GPT-2);
    ``cfg.pos="rope"`` rotates q and k instead (Llama), so scores depend on offsets only, which
    makes the previous-token step of a retrieval (induction) circuit easy to learn.
    ``model(tokens, cache={})`` fills the dict with ``blocks.{i}.hook_resid_pre|mid|post``,
    ``blocks.{i}.attn.hook_pattern`` (B, nh, T, T), ``hook_attn_out``, ``hook_mlp_out``.
    """

    def __init__(self, cfg: TunnelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(2 * cfg.n_keys, cfg.d_model)
        assert cfg.pos in ("learned", "rope"), f"pos must be 'learned' or 'rope', got {cfg.pos!r}"
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.unembed = nn.Linear(cfg.d_model, cfg.n_keys)   # logits over the V values only
        self.use_pos = True                                  # Break: False drops positions

    def forward(self, tokens, cache=None):
        B, T = tokens.shape
        x = self.tok_emb(tokens)                                                # (B, T, C)
        if self.pos_emb is not None and self.use_pos:
            x = x + self.pos_emb(torch.arange(T, device=tokens.device))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, f"blocks.{i}")
        return self.unembed(self.ln_f(x))                                       # (B, T, V)

    def lens(self, resid):
        """Logit lens: read any residual (…, C) through the final LayerNorm and unembedding."""
        return self.unembed(self.ln_f(resid))


class TunnelMLP(nn.Module):
    """Position-wise MLP: sees only its own token and position, never the context (no mixing)."""

    def __init__(self, cfg: TunnelConfig, d_hidden: int, n_hidden: int = 2):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(2 * cfg.n_keys, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        layers, d = [], cfg.d_model
        for _ in range(n_hidden):
            layers += [nn.Linear(d, d_hidden), nn.GELU()]
            d = d_hidden
        self.net = nn.Sequential(*layers, nn.Linear(d, cfg.n_keys))

    def forward(self, tokens, cache=None):
        T = tokens.shape[1]
        return self.net(self.tok_emb(tokens) + self.pos_emb(torch.arange(T)))  # (B, T, V)


class TunnelLSTM(nn.Module):
    """Recurrent baseline: the context reaches each position only through a fixed-size state."""

    def __init__(self, cfg: TunnelConfig, d_hidden: int, n_layer: int = 1):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(2 * cfg.n_keys, cfg.d_model)
        self.lstm = nn.LSTM(cfg.d_model, d_hidden, num_layers=n_layer, batch_first=True)
        self.head = nn.Linear(d_hidden, cfg.n_keys)

    def forward(self, tokens, cache=None):
        h, _ = self.lstm(self.tok_emb(tokens))                                  # (B, T, H)
        return self.head(h)                                                     # (B, T, V)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def value_logits(model: nn.Module, keys: torch.Tensor, vals: torch.Tensor, cache=None):
    """Logits at the key positions only: (B, L) pairs -> (B, L, V)."""
    tokens = to_tokens(keys, vals, model.cfg.n_keys)                            # (B, 2L)
    return model(tokens, cache=cache)[:, 0::2]                                  # keys at even t


# ----------------------------------------------------------------------------- train & measure

@dataclass
class TrainConfig:
    steps: int = 3000
    batch: int = 128
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.01
    p_repeat: float = 0.0      # repeated-keys variant used for training data
    mix_repeat: float = 1.0    # fraction of each batch drawn with p_repeat (rest: no repeats)
    eval_every: int = 100
    eval_batch: int = 512
    max_seconds: float | None = None   # stop early (wall clock) if the budget runs out
    seed: int = 0


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% (what nanoGPT does)."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    frac = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def training_batch(tc: TrainConfig, cfg: TunnelConfig, g: torch.Generator):
    """One batch; with ``mix_repeat`` a share of the rows comes from the repeated-keys variant."""
    n_rep = int(round(tc.batch * tc.mix_repeat)) if tc.p_repeat > 0 else 0
    parts = [make_batch(tc.batch - n_rep, cfg.n_keys, cfg.n_pairs, 0.0, g)]
    if n_rep:
        parts.append(make_batch(n_rep, cfg.n_keys, cfg.n_pairs, tc.p_repeat, g))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@torch.no_grad()
def evaluate(model: nn.Module, keys: torch.Tensor, vals: torch.Tensor) -> dict:
    """Calibration against the exact posterior on a fixed batch.

    Returns mean |H_model - H_Bayes| (bits, per sequence and position, then averaged),
    KL(Bayes || model) in bits, and the per-position means (L,) for plotting.
    """
    was = model.training
    model.eval()
    logp = value_logits(model, keys, vals).log_softmax(-1)                      # (B, L, V)
    model.train(was)
    post = bayes_posterior(keys, vals, model.cfg.n_keys)                        # (B, L, V)
    h_model, h_bayes = entropy_bits(logp.exp()), entropy_bits(post)             # (B, L)
    kl = kl_bits(post, logp)                                                    # (B, L)
    return {"abs_err": (h_model - h_bayes).abs().mean().item(), "kl": kl.mean().item(),
            "h_model_t": h_model.mean(0), "h_bayes_t": h_bayes.mean(0), "kl_t": kl.mean(0)}


def train(model: nn.Module, tc: TrainConfig, eval_data=None, log=None) -> dict:
    """AdamW on cross-entropy of the *sampled* value at key positions (never the posterior:
    the model must discover Bayes from samples). Returns a history of calibration metrics.

    ``log(step, metrics)`` is called at each evaluation (e.g. a LiveCurves update).
    """
    cfg = model.cfg
    g = torch.Generator().manual_seed(tc.seed)
    if eval_data is None:
        eval_data = make_batch(tc.eval_batch, cfg.n_keys, cfg.n_pairs, 0.0,
                               torch.Generator().manual_seed(tc.seed + 10_000))
    # No weight decay on embeddings/LayerNorm/biases (nanoGPT's choice): decay would pull the
    # near-orthogonal key embeddings toward zero.
    decay = [p for p in model.parameters() if p.dim() >= 2 and p.requires_grad]
    no_decay = [p for p in model.parameters() if p.dim() < 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr)
    hist = {"step": [], "abs_err": [], "kl": [], "loss": [], "seconds": []}
    t0, loss_acc, n_acc = time.perf_counter(), 0.0, 0
    for step in range(tc.steps + 1):
        if step % tc.eval_every == 0 or step == tc.steps:
            m = evaluate(model, *eval_data)
            for k in ("abs_err", "kl"):
                hist[k].append(m[k])
            hist["step"].append(step)
            hist["loss"].append(loss_acc / max(n_acc, 1) if n_acc else float("nan"))
            hist["seconds"].append(time.perf_counter() - t0)
            loss_acc, n_acc = 0.0, 0
            if log:
                log(step, m)
            out_of_time = tc.max_seconds is not None and time.perf_counter() - t0 > tc.max_seconds
            if step == tc.steps or out_of_time:
                break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        keys, vals = training_batch(tc, cfg, g)
        logits = value_logits(model, keys, vals)                                # (B, L, V)
        loss = F.cross_entropy(logits.reshape(-1, cfg.n_keys), vals.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_acc, n_acc = loss_acc + loss.item(), n_acc + 1
    hist["steps_done"] = hist["step"][-1]
    return hist


def save_checkpoint(path, model: nn.Module, **extra) -> None:
    """Save config + weights (+ anything in ``extra``, e.g. the training history) to ``path``,
    atomically: a kernel killed mid-save leaves no half-written file behind."""
    from pathlib import Path

    from .runs import atomic_write
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda tmp: torch.save({"cfg": model.cfg.__dict__, "state": model.state_dict(), **extra}, tmp))


def load_checkpoint(path) -> tuple[TunnelTransformer, dict]:
    """Rebuild a ``TunnelTransformer`` saved by ``save_checkpoint``; returns (model, extras).

    A file that cannot be read back raises ``CheckpointError`` naming it and the fix."""
    from .runs import CheckpointError
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        model = TunnelTransformer(TunnelConfig(**ck.pop("cfg")))
        model.load_state_dict(ck.pop("state"))
    except Exception as err:  # truncated, corrupted, or not a wind-tunnel checkpoint
        raise CheckpointError(f"cannot load the wind-tunnel checkpoint {path} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''}): delete it and re-run D1 "
                              f"to train a new one") from None
    return model.eval(), ck
