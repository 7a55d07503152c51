"""How the next token is chosen: the logit processors of Hugging Face ``generate``, by hand.

    logits = model(ids).logits[:, -1]                                 # (B, V): one row per sequence
    cfg = SamplingConfig(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1)
    g = torch.Generator().manual_seed(0)                              # same seed -> same tokens
    next_ids = cfg.next_token(logits, history=ids, generator=g)       # (B,) int64
    probs = cfg.process(logits, history=ids).softmax(-1)              # what was sampled from

Every filter maps (B, V) logits to (B, V) logits and does one of two things: divide them
(temperature, and the repetition penalty on the tokens already seen), or set the tokens it
removes to -inf, so that softmax gives them probability 0 and renormalises the rest. Because
they all speak logits, they compose, in the order HF applies them: repetition penalty, then
temperature, top-k, top-p, min-p, then softmax and one draw (``torch.multinomial``). Each one
equals its HF class to 1e-6 in probabilities (tests/test_sampling.py), down to HF's choices at
the edges: ties at the k-th logit are all kept, top-p keeps the token that crosses p, and every
filter keeps at least ``min_tokens_to_keep`` tokens (so top_p -> 0 still keeps the argmax).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- the processors

def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    """Divide the logits by ``t``: t < 1 sharpens the distribution, t > 1 flattens it.

    softmax(z / t): t -> 0 puts all mass on the argmax (greedy), t -> inf gives uniform.
    ``t = 0`` itself is a division by zero: ask for greedy decoding instead (``greedy``, or
    ``SamplingConfig(temperature=0)``). Same as HF's ``TemperatureLogitsWarper``.

    >>> temperature(torch.tensor([[2.0, 0.0]]), 0.5)
    tensor([[4., 0.]])
    >>> temperature(torch.tensor([[2.0, 0.0]]), 0.5).softmax(-1)    # 0.88 / 0.12 at t = 1
    tensor([[0.9820, 0.0180]])
    """
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {t}; for greedy decoding use greedy(logits) "
                         f"or SamplingConfig(temperature=0)")
    return logits / t


def top_k(logits: torch.Tensor, k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row, set the others to -inf.

    A token tied with the k-th largest logit is kept too, so a row can keep more than k
    (HF's rule: remove only logits strictly below the k-th value). k larger than the
    vocabulary keeps everything; ``min_tokens_to_keep`` raises k to at least that.

    >>> top_k(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), 2)
    tensor([[2., 1., -inf, -inf]])
    >>> top_k(torch.tensor([[2.0, 1.0, 1.0, -1.0]]), 2)             # a tie at the 2nd value: 3 kept
    tensor([[2., 1., 1., -inf]])
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be a positive int, got {k!r} (SamplingConfig(top_k=0) turns it off)")
    k = min(max(k, min_tokens_to_keep), logits.size(-1))
    kth_value = torch.topk(logits, k, dim=-1).values[..., -1:]          # (B, 1)
    return logits.masked_fill(logits < kth_value, NEG_INF)


def top_p(logits: torch.Tensor, p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus sampling: keep the most likely tokens until their probabilities add up to ``p``.

    A token is kept when the tokens more likely than it hold less than ``p`` of the mass, so
    the token that crosses ``p`` stays. Computed HF's way, from the least likely token up:
    the cumulative probability up to and including a token is 1 - (mass above it), and the
    token goes when that is <= 1 - p. (Written top-down, the same rule keeps other tokens
    among ties at the boundary, and at p = 1 rounding drops a few live ones: measured on the
    test logits. Bottom-up gives HF's answer exactly.) p = 1 removes only tokens whose
    probability is already 0; p -> 0 keeps ``min_tokens_to_keep`` tokens: the argmax, by default.

    >>> probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    >>> top_p(probs.log(), 0.75).softmax(-1)                        # 0.5 < 0.75, then 0.8 >= 0.75
    tensor([[0.6250, 0.3750, 0.0000, 0.0000]])
    >>> top_p(probs.log(), 0.0).softmax(-1)                         # p -> 0: greedy
    tensor([[1., 0., 0., 0.]])
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)          # (B, V) ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)                     # (B, V) 1 - mass above
    remove_sorted = cumulative <= 1 - p
    remove_sorted[..., -min_tokens_to_keep:] = False                              # the most likely stay
    remove = remove_sorted.scatter(-1, order, remove_sorted)                      # back to vocab order
    return logits.masked_fill(remove, NEG_INF)


def min_p(logits: torch.Tensor, p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the tokens at least ``p`` times as likely as the most likely one.

    The cut scales with the model's confidence: a peaked row keeps a few tokens, a flat row
    many (top-p does the opposite at its boundary, top-k ignores confidence). HF applies it
    after temperature, like llama.cpp.

    >>> probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    >>> min_p(probs.log(), 0.2).softmax(-1)                         # threshold 0.2 * 0.5 = 0.1
    tensor([[0.5263, 0.3158, 0.1579, 0.0000]])
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {p}")
    probs = logits.softmax(dim=-1)                                                # (B, V)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    keep = torch.topk(probs, min(min_tokens_to_keep, probs.size(-1)), dim=-1).indices
    remove = remove.scatter(-1, keep, False)
    return logits.masked_fill(remove, NEG_INF)


def repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float,
                       history_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Make every token already in ``history`` less likely: divide its logit by ``penalty``
    if positive, multiply it if negative (CTRL, Keskar et al. 2019; HF's definition).

    ``history``: (B, T) token ids, the prompt and what was generated so far; rows may differ.
    ``history_mask``: (B, T) bool, False at padding (left-padded prompts), which is ignored.
    A token counts once however often it appeared. penalty > 1 discourages repeats, < 1
    encourages them. Note it is not a probability rule: a logit of 0 is left unchanged.

    >>> repetition_penalty(torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([[0, 1, 0]]), 2.0)
    tensor([[ 1.0000, -2.0000,  0.5000]])
    """
    if not penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {penalty}")
    B, V = logits.shape
    if history.dim() != 2 or history.size(0) != B:
        raise ValueError(f"history must be (B, T) = ({B}, T) token ids, got shape {tuple(history.shape)}")
    real = torch.ones_like(history, dtype=torch.bool) if history_mask is None else history_mask.bool()
    ids = history[real]
    if ids.numel() and (ids.min() < 0 or ids.max() >= V):
        raise ValueError(f"history holds ids outside [0, {V}): mark padding with history_mask instead")
    history = history.masked_fill(~real, V)                            # padding -> an extra column
    seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)       # (B, V+1)
    seen = seen.scatter(1, history, True)[:, :V]                                # (B, V)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


# ----------------------------------------------------------------------------- choosing a token

def _check_rows(logits: torch.Tensor) -> None:
    if torch.isnan(logits).any():
        raise ValueError("logits contain NaN: the model's output is broken (check its weights "
                         "and inputs), not the sampler")
    dead = (~torch.isfinite(logits).any(dim=-1)).nonzero().flatten().tolist()
    if dead:
        raise ValueError(f"row(s) {dead} have every logit at -inf: nothing is left to choose; "
                         f"loosen the filters (top_k / top_p / min_p)")


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) the argmax of each row (the first one on a tie).

    >>> greedy(torch.tensor([[0.1, 3.0, 3.0], [5.0, 0.0, -1.0]]))
    tensor([1, 0])
    """
    _check_rows(logits)
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) -> (B,) one draw per row from softmax(logits), as HF's ``generate`` draws it
    (``torch.multinomial`` on the probabilities): same generator state, same tokens.

    >>> sample(torch.tensor([[0.0, float("-inf"), 0.0]]), torch.Generator().manual_seed(0)).item() in (0, 2)
    True
    """
    _check_rows(logits)
    probs = logits.float().softmax(dim=-1)                                        # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- all of it together

@dataclass
class SamplingConfig:
    """The sampling settings of one ``generate`` call; the defaults draw from the raw model.

    >>> SamplingConfig(temperature=0).is_greedy, SamplingConfig().is_greedy
    (True, False)
    >>> SamplingConfig(top_k=2).process(torch.tensor([[2.0, 1.0, 0.0]]))
    tensor([[2., 1., -inf]])
    """
    temperature: float = 1.0          # 0 = greedy (argmax); the penalty below still applies
    top_k: int = 0                    # 0 = off (HF's convention)
    top_p: float = 1.0                # 1.0 = off
    min_p: float = 0.0                # 0.0 = off
    repetition_penalty: float = 1.0   # 1.0 = off; HF suggests ~1.2
    min_tokens_to_keep: int = 1       # every filter keeps at least this many tokens

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        for name in ("top_p", "min_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if not isinstance(self.min_tokens_to_keep, int) or self.min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be an int >= 1, got {self.min_tokens_to_keep!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def process(self, logits: torch.Tensor, history: torch.Tensor | None = None,
                history_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V) -> (B, V): the filters in HF's order; the ones left at their defaults are skipped.

        For a greedy config only the repetition penalty applies (the others cannot move the argmax).
        """
        if self.repetition_penalty != 1.0 and history is not None:
            logits = repetition_penalty(logits, history, self.repetition_penalty, history_mask)
        if self.is_greedy:
            return logits
        if self.temperature != 1.0:
            logits = temperature(logits, self.temperature)
        if self.top_k:
            logits = top_k(logits, self.top_k, self.min_tokens_to_keep)
        if self.top_p < 1.0:
            logits = top_p(logits, self.top_p, self.min_tokens_to_keep)
        if self.min_p > 0.0:
            logits = min_p(logits, self.min_p, self.min_tokens_to_keep)
        return logits

    def next_token(self, logits: torch.Tensor, history: torch.Tensor | None = None,
                   history_mask: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, V) logits of the last position -> (B,) next token ids."""
        logits = self.process(logits, history, history_mask)
        return greedy(logits) if self.is_greedy else sample(logits, generator)
