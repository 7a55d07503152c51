"""Exercises of B1_attention_patterns: three numbers that describe a head, from its pattern.

A pattern ``p[..., q, k]`` is what ``blocks.{i}.attn.hook_pattern`` returns: row ``q`` is how
query position ``q`` spreads one unit of attention over the keys ``k <= q`` (causal, so every
entry above the diagonal is exactly 0).
"""
import torch

from . import Case, exercise


def _causal_pattern(g, *shape, T, sharpness=2.0):
    """Random causal attention weights (..., T, T): softmax of random scores over keys k <= q."""
    scores = sharpness * torch.randn(*shape, T, T, generator=g)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


def _shifted(T: int, back: int) -> torch.Tensor:
    """(T, T) pattern where query q puts all its weight on key max(q - back, 0)."""
    p = torch.zeros(T, T)
    p[torch.arange(T), (torch.arange(T) - back).clamp(min=0)] = 1.0
    return p


# --- B1.attention_entropy -------------------------------------------------------------------------

def _entropy_cases(g):
    T = 6
    uniform = torch.ones(T, T).tril()
    return [
        Case(_causal_pattern(g, 2, 3, T=T), label="random causal patterns (2, 3, T, T): zeros above the diagonal"),
        Case(uniform / uniform.sum(-1, keepdim=True), label="uniform over the past: row q has entropy log(q + 1)"),
        Case(_shifted(T, 1), label="one-hot rows (a previous-token head): entropy exactly 0, no NaN"),
        Case(torch.tensor([0.5, 0.5]), label="a single row of two equal weights: log 2 = 0.693 nats"),
        Case(_causal_pattern(g, 2, 1, 3, T=4, sharpness=6.0), label="(layer, batch, head, q, k): any leading shape"),
    ]


@exercise("B1.attention_entropy", "the entropy of each attention row", cases=_entropy_cases, atol=1e-5)
def attention_entropy(p: torch.Tensor) -> torch.Tensor:
    """p (..., T_k): rows of attention weights (each sums to 1, zeros allowed) -> (...) entropy in nats.

    H = -sum_k p_k log p_k, with 0 log 0 = 0: a masked (future) key has weight exactly 0 and
    contributes nothing. 0 = all weight on one key; log(n) = uniform over n keys.
    """
    plogp = torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p))   # 0 log 0 = 0, not NaN
    return -plogp.sum(-1)                                                             # sum over keys


@attention_entropy.mistake("0 * log(0) gave NaN: a causal row has exact zeros on its future keys, and "
                           "0 * log(0) = 0 * -inf = NaN in floating point. Use the limit 0 log 0 = 0: "
                           "torch.where(p > 0, p * p.log(), 0), or torch.special.xlogy(p, p)")
def _(p):
    return -(p * p.log()).sum(-1)


@attention_entropy.mistake("the entropy is negative: H = -sum p log p. Each log p is <= 0, so the sum "
                           "p log p is <= 0 and needs the minus sign")
def _(p):
    return torch.special.xlogy(p, p).sum(-1)


@attention_entropy.mistake("this is in bits (log2): the lab measures entropy in nats (natural log), "
                           "so a uniform row over n keys gives log(n), e.g. 0.693 for n = 2")
def _(p):
    return -torch.where(p > 0, p * p.clamp_min(1e-30).log2(), torch.zeros_like(p)).sum(-1)


@attention_entropy.mistake("averaged p log p over the keys instead of summing: entropy is a SUM over "
                           "the keys (-sum_k p_k log p_k); .mean(-1) divides it by the number of keys")
def _(p):
    return -torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p)).mean(-1)


# --- B1.prev_token_score --------------------------------------------------------------------------

def _prev_cases(g):
    return [
        Case(_causal_pattern(g, 2, 3, T=7), label="random causal patterns (2, 3, T, T)"),
        Case(_shifted(6, 1), label="a perfect previous-token head: score 1"),
        Case(_shifted(6, 2), label="a head looking two tokens back: score 0 (query 1 has no token two back)"),
        Case(torch.eye(5), label="every token attends to itself: score 0"),
        Case(_causal_pattern(g, 3, T=2), label="T = 2: only query 1 has a previous token"),
    ]


@exercise("B1.prev_token_score", "the previous-token score of a head", cases=_prev_cases)
def prev_token_score(p: torch.Tensor) -> torch.Tensor:
    """p (..., T, T) causal attention -> (...) mean over queries q = 1..T-1 of p[q, q-1].

    1 = every token attends only to the token just before it. Query 0 has no previous token
    and is left out of the mean.
    """
    return p.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)    # (..., T-1): p[1, 0], p[2, 1], ... p[T-1, T-2]


@prev_token_score.mistake("this reads the token TWO back: after dropping row 0 (p[..., 1:, :]) row r is "
                          "query r + 1, so diagonal(offset=-1) gives p[q, q-2]. Either keep all rows and "
                          "take diagonal(offset=-1), or drop row 0 and take diagonal(offset=0)")
def _(p):
    return p[..., 1:, :].diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)


@prev_token_score.mistake("this is the weight on the token ITSELF (the main diagonal, offset=0): the "
                          "previous token of query q is key q - 1, one below the diagonal (offset=-1)")
def _(p):
    return p.diagonal(offset=0, dim1=-2, dim2=-1)[..., 1:].mean(-1)


@prev_token_score.mistake("offset=+1 reads key q + 1, a FUTURE token: a causal pattern is exactly 0 "
                          "there, so every head scores 0. The previous token is one BELOW the diagonal: offset=-1")
def _(p):
    return p.diagonal(offset=1, dim1=-2, dim2=-1).mean(-1)


# --- B1.induction_score ---------------------------------------------------------------------------

def _repeat_pattern(L: int, back: int) -> torch.Tensor:
    """Pattern over [BOS, r_1..r_L, r_1..r_L] where each second-copy query q attends to key q - back
    (and every other query to BOS)."""
    T = 1 + 2 * L
    p = torch.zeros(T, T)
    p[:, 0] = 1.0
    q = torch.arange(L + 1, 2 * L + 1)
    p[q, 0] = 0.0
    p[q, q - back] = 1.0
    return p


def _induction_cases(g):
    return [
        Case(_causal_pattern(g, 2, 3, T=11), 5, label="random causal patterns (2, 3, T, T), L = 5"),
        Case(_repeat_pattern(4, 3), 4, label="a perfect induction head (L = 4): query q reads key q - L + 1, score 1"),
        Case(_repeat_pattern(4, 4), 4, label="a duplicate-token head (L = 4): reads the earlier copy of ITSELF "
                                             "(key q - L): induction score 0"),
        Case(_causal_pattern(g, 3, T=3), 1, label="L = 1: [BOS, r, r]"),
        Case(_causal_pattern(g, 2, 1, 2, T=9, sharpness=4.0), 4, label="(layer, batch, head, q, k), L = 4"),
    ]


@exercise("B1.induction_score", "the induction score of a head", cases=_induction_cases)
def induction_score(p: torch.Tensor, L: int) -> torch.Tensor:
    """p (..., 1 + 2L, 1 + 2L): attention on [BOS, r_1..r_L, r_1..r_L] (L random tokens, twice).

    Returns (...): the mean over the second copy's queries q = L+1 .. 2L of p[q, q - L + 1].
    Query q holds token r_j (j = q - L); its earlier occurrence sits at key j = q - L, and the
    token that FOLLOWED it, the one an induction head copies forward, at key q - L + 1.
    """
    q = torch.arange(L + 1, 2 * L + 1)        # the second copy: position 0 is BOS, the first copy is 1..L
    return p[..., q, q - L + 1].mean(-1)      # advanced indexing picks one key per query: (..., L)


@induction_score.mistake("this is a duplicate-token score: key q - L is the earlier copy of the SAME "
                         "token. An induction head attends to the token AFTER it, key q - L + 1, which "
                         "is the one it copies forward as its prediction")
def _(p, L):
    q = torch.arange(L + 1, 2 * L + 1)
    return p[..., q, q - L].mean(-1)


@induction_score.mistake("the positions are off by one: position 0 is <|endoftext|> (BOS), so the "
                         "first copy sits at 1..L and the second copy's queries are L+1 .. 2L, not L .. 2L-1")
def _(p, L):
    q = torch.arange(L, 2 * L)
    return p[..., q, q - L + 1].mean(-1)


@induction_score.mistake("p[..., q, :][..., k] (or p[..., q][..., :, k]) takes every key for every query, "
                         "an (L, L) block, not one key per query: index both axes at once, p[..., q, q - L + 1], "
                         "which pairs query q[i] with key q[i] - L + 1")
def _(p, L):
    q = torch.arange(L + 1, 2 * L + 1)
    return p[..., q, :][..., q - L + 1].mean((-2, -1))
