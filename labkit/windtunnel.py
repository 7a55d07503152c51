"""A Bayesian wind tunnel: a task whose exact posterior is known, and how to grade a model on it.

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

The models under test are the lab's own: a ``labkit.gpt.GPT`` with a vocabulary of 2V tokens
(keys ``0..V-1``, values ``V..2V-1``), trained by ``labkit.train.train`` on ``WindTunnel``
(fresh sequences every batch, only the key positions scored), graded by the ``Calibration``
callback, saved in a ``labkit.runs`` run directory and rebuilt with ``GPT.from_run``::

    data = WindTunnel(n_keys=20)
    model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=data.block_size, ...))
    history = train(model, data, TrainConfig(block_size=data.block_size, ...),
                    callbacks=[Calibration(data)], run=Run.create(lab.runs_dir, "tunnel"))
    history.series("calib_err")              # mean |H_model - H_Bayes| in bits, at every evaluation

Two context-blind / context-through-a-bottleneck baselines (``MLPBaseline``, ``LSTMBaseline``)
take the same tokens and return ``(logits, loss)`` like the GPT, so the same loop trains them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .train import Callback

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
        if L > V:
            raise ValueError(f"without repeats at most V={V} distinct keys fit, asked for n_pairs={L}: "
                             f"use n_pairs <= n_keys, or p_repeat > 0")
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


# ----------------------------------------------------------------------------- the data

@dataclass
class WindTunnel:
    """The task as training data for ``labkit.train``: fresh sequences at every call.

    ``batch(split, batch_size, block_size, generator) -> (x, y)``: ``x`` the tokens (B, 2L),
    ``y`` the next-token targets, scored only where the next token is a key's value (the key
    positions, even t); every other position is ``-100`` (not scored). The task has no fixed
    train/val sets: every batch is a new draw, ``split`` only names it.
    ``mix_repeat``: the share of each batch drawn with ``p_repeat`` (the rest has no repeats).

    >>> data = WindTunnel(n_keys=4, n_pairs=3)
    >>> x, y = data.batch("train", 1, data.block_size, torch.Generator().manual_seed(0))
    >>> x.tolist(), y.tolist()                 # keys 0..3, values 4..7; y: the value after each key
    ([[0, 6, 2, 4, 1, 7]], [[6, -100, 4, -100, 7, -100]])
    """
    n_keys: int = 20
    n_pairs: int | None = None       # None: n_keys - 1 (the last pair of a bijection is certain)
    p_repeat: float = 0.0
    mix_repeat: float = 1.0

    def __post_init__(self):
        if self.n_pairs is None:
            self.n_pairs = self.n_keys - 1
        if not 0.0 <= self.p_repeat < 1.0 or not 0.0 <= self.mix_repeat <= 1.0:
            raise ValueError(f"p_repeat={self.p_repeat} must be in [0, 1) and mix_repeat={self.mix_repeat} "
                             f"in [0, 1]")
        if self.p_repeat == 0.0 and self.n_pairs > self.n_keys:
            raise ValueError(f"n_pairs={self.n_pairs} > n_keys={self.n_keys} needs repeated keys: set p_repeat > 0")

    @property
    def vocab_size(self) -> int:
        return 2 * self.n_keys                 # keys, then values

    @property
    def block_size(self) -> int:
        return 2 * self.n_pairs                # tokens per sequence

    def sample(self, batch_size: int, generator: torch.Generator | None = None):
        """``keys, vals`` (B, L) of ``batch_size`` fresh sequences; with ``mix_repeat`` < 1 the
        first rows have no repeats and the last ``round(batch_size * mix_repeat)`` may repeat."""
        n_rep = int(round(batch_size * self.mix_repeat)) if self.p_repeat > 0 else 0
        parts = [make_batch(batch_size - n_rep, self.n_keys, self.n_pairs, 0.0, generator)]
        if n_rep:
            parts.append(make_batch(n_rep, self.n_keys, self.n_pairs, self.p_repeat, generator))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def targets(self, keys: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """(B, 2L) next-token targets: the value token at key positions, -100 elsewhere."""
        y = torch.full((keys.shape[0], 2 * keys.shape[1]), -100, dtype=torch.long)
        y[:, 0::2] = vals + self.n_keys
        return y

    def batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator):
        if block_size != self.block_size:
            raise ValueError(f"block_size={block_size}, but a wind-tunnel sequence of {self.n_pairs} pairs has "
                             f"{self.block_size} tokens: use TrainConfig(block_size=data.block_size)")
        keys, vals = self.sample(batch_size, generator)
        return to_tokens(keys, vals, self.n_keys), self.targets(keys, vals)


# ----------------------------------------------------------------------------- grading a model

def value_logits(model: nn.Module, keys: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """The model's logits for the V values at every key position: (B, L) pairs -> (B, L, V).

    Any model that maps tokens (B, 2L) to logits over the 2V-token vocabulary (the labkit GPT,
    the baselines below; a ``(logits, loss)`` tuple is fine). Key tokens are not possible answers,
    so their logits are dropped and a softmax over the rest is the model's belief about the value.
    """
    V = model.cfg.vocab_size // 2
    out = model(to_tokens(keys, vals, V).to(next(model.parameters()).device))
    logits = out[0] if isinstance(out, tuple) else out                          # (B, 2L, 2V)
    return logits[:, 0::2, V:].float().cpu()                                    # keys at even t


@torch.no_grad()
def calibration(model: nn.Module, keys: torch.Tensor, vals: torch.Tensor) -> dict:
    """Grade ``model`` against the exact posterior on fixed sequences.

    Returns ``calib_err`` = mean |H_model - H_Bayes| (bits; per sequence and position, then
    averaged: the paper's number), ``kl`` = mean KL(Bayes || model) (bits), and per key position
    t (tensors of shape (L,)): ``h_model_t``, ``h_bayes_t``, ``err_t``, ``kl_t``.
    """
    was_training = model.training
    model.eval()
    try:
        logp = value_logits(model, keys, vals).log_softmax(-1)                  # (B, L, V)
    finally:
        model.train(was_training)
    post = bayes_posterior(keys, vals, logp.shape[-1])                          # (B, L, V)
    h_model, h_bayes = entropy_bits(logp.exp()), entropy_bits(post)             # (B, L)
    err, kl = (h_model - h_bayes).abs(), kl_bits(post, logp)                    # (B, L)
    return {"calib_err": err.mean().item(), "kl": kl.mean().item(),
            "h_model_t": h_model.mean(0), "h_bayes_t": h_bayes.mean(0), "err_t": err.mean(0), "kl_t": kl.mean(0)}


class Calibration(Callback):
    """A ``labkit.train`` callback: at every evaluation, grade the model against the exact posterior
    on ``n_sequences`` fixed sequences of ``data`` and log ``calib_err`` and ``kl`` (bits) in the
    row (``history.series("calib_err")``). ``prefix`` names the metrics apart when one run is graded
    on two sets. ``.last`` holds the latest full result (per-position curves included).
    """

    def __init__(self, data: WindTunnel, n_sequences: int = 1024, seed: int = 1, prefix: str = ""):
        self.keys, self.vals = data.sample(n_sequences, torch.Generator().manual_seed(seed))
        self.prefix, self.last = prefix, None

    def on_eval(self, step: int, model) -> dict:
        self.last = calibration(model, self.keys, self.vals)
        return {f"{self.prefix}calib_err": self.last["calib_err"], f"{self.prefix}kl": self.last["kl"]}


# ----------------------------------------------------------------------------- baselines

@dataclass
class BaselineConfig:
    vocab_size: int = 40
    block_size: int = 38
    n_embd: int = 64
    d_hidden: int = 256
    n_hidden: int = 2              # MLP: hidden layers; LSTM: stacked layers


def _lm_output(logits: torch.Tensor, targets: torch.Tensor | None):
    """``(logits, loss)`` as the labkit GPT returns them (loss over targets != -100)."""
    if targets is None:
        return logits, None
    return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


class MLPBaseline(nn.Module):
    """Position-wise MLP: each position sees only its own token and position, never the context.

    Whatever it learns, its prediction at a key cannot depend on which values were revealed:
    the best it can do is the prior over values, uniform, log2 V bits everywhere.
    """

    def __init__(self, cfg: BaselineConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        layers, d = [], cfg.n_embd
        for _ in range(cfg.n_hidden):
            layers += [nn.Linear(d, cfg.d_hidden), nn.GELU()]
            d = cfg.d_hidden
        self.net = nn.Sequential(*layers, nn.Linear(d, cfg.vocab_size))

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))       # (B, T, C)
        return _lm_output(self.net(x), targets)                                 # (B, T, vocab)


class LSTMBaseline(nn.Module):
    """Recurrent baseline: the context reaches a position only through a fixed-size state."""

    def __init__(self, cfg: BaselineConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.lstm = nn.LSTM(cfg.n_embd, cfg.d_hidden, num_layers=cfg.n_hidden, batch_first=True)
        self.head = nn.Linear(cfg.d_hidden, cfg.vocab_size)

    def forward(self, idx, targets=None):
        h, _ = self.lstm(self.wte(idx))                                         # (B, T, d_hidden)
        return _lm_output(self.head(h), targets)                                # (B, T, vocab)
