"""Exercises of 05_sampling: top-p (nucleus) filtering, min-p filtering, the repetition penalty.

The two filters return the *probabilities* the next token is drawn from (what is left after the
filter, renormalised), so any correct implementation passes, in logit or in probability space.
The penalty returns logits, as Hugging Face's ``RepetitionPenaltyLogitsProcessor`` does.
"""
import torch

from . import Case, exercise

NEG_INF = float("-inf")

# --- 05.top_p -------------------------------------------------------------------------------------


def _top_p_cases(g):
    masked = 2 * torch.randn(2, 12, generator=g)
    masked[:, 6:] = NEG_INF                                      # half the vocabulary already removed (top-k first)
    return [
        Case(2 * torch.randn(2, 10, generator=g), 0.9, label="two rows of random logits, p=0.9"),
        Case(torch.tensor([[5.0, 0.0, 0.0, -1.0]]), 0.5, label="one dominant token (p=0.98): keep just it"),
        Case(torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]), 0.75,
             label="probabilities 0.50 0.18 0.11 ...: 0.50 < 0.75, so the next token (crossing 0.75) stays too"),
        Case(torch.randn(1, 6, generator=g), 1.0, label="p=1: nothing is removed"),
        Case(torch.randn(2, 8, generator=g), 0.0, label="p=0: only the most likely token is left (never an empty row)"),
        Case(masked, 0.8, label="a row whose last 6 tokens are already -inf"),
        Case(3 * torch.randn(3, 50, generator=g), 0.5, label="three rows of 50 logits, p=0.5"),
    ]


@exercise("05.top_p", "top-p (nucleus) filtering", cases=_top_p_cases)
def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities: keep the most likely tokens until their probabilities
    add up to p (the token that crosses p included, and always at least the top one), renormalise."""
    probs = logits.softmax(dim=-1)                                      # (B, V)
    # The rule: keep a token when the tokens ranked above it hold less than p (so the token that
    # crosses p stays). Summed from the least likely token up, as Hugging Face does, the cumulative
    # sum up to a token is 1 - (mass above it): keep it when that is > 1 - p. Summing from the top
    # is the same rule, but its float32 rounding can flip the token sitting right on the boundary.
    sorted_probs, order = probs.sort(dim=-1, descending=False)          # (B, V) least likely first
    mass_up_to = sorted_probs.cumsum(dim=-1)                            # (B, V) = 1 - mass of the tokens above
    keep_sorted = mass_up_to > 1 - p                                    # mass above < p
    keep_sorted[..., -1] = True                                         # p -> 0 still keeps the argmax: never an empty row
    keep = keep_sorted.scatter(-1, order, keep_sorted)                  # (B, V) back to vocabulary order
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)                        # renormalise: each row sums to 1 again


@top_p.mistake("dropped the token that crosses p: keeping tokens whose cumulative probability is < p keeps "
               "too few (and none at all when the top token alone is above p: 0/0 = NaN). Keep a token when the "
               "mass of the tokens ranked *above* it is < p: cumsum - prob < p")
def _(logits, p):
    probs = logits.softmax(-1)
    s, order = probs.sort(-1, descending=True)
    keep_sorted = s.cumsum(-1) < p
    kept = probs * keep_sorted.scatter(-1, order, keep_sorted)
    return kept / kept.sum(-1, keepdim=True)


@top_p.mistake("forgot to renormalise: after zeroing the tail, divide by the kept mass so each row sums to 1 "
               "(sampling from unnormalised weights is what torch.multinomial does silently — the filter must not rely on it)")
def _(logits, p):
    probs = logits.softmax(-1)
    s, order = probs.sort(-1, descending=True)
    keep_sorted = (s.cumsum(-1) - s) < p
    keep_sorted[..., 0] = True
    return probs * keep_sorted.scatter(-1, order, keep_sorted)


@top_p.mistake("sorted ascending: the cumulative sum then starts at the LEAST likely tokens, so the filter keeps "
               "the tail and drops the head. Sort with descending=True")
def _(logits, p):
    probs = logits.softmax(-1)
    s, order = probs.sort(-1, descending=False)
    keep_sorted = (s.cumsum(-1) - s) < p
    keep_sorted[..., 0] = True
    kept = probs * keep_sorted.scatter(-1, order, keep_sorted)
    return kept / kept.sum(-1, keepdim=True)


@top_p.mistake("at p = 0 nothing is kept (0/0 = NaN): always keep at least the most likely token, as Hugging Face "
               "does with min_tokens_to_keep=1 (keep_sorted[..., 0] = True)")
def _(logits, p):
    probs = logits.softmax(-1)
    s, order = probs.sort(-1, descending=True)
    keep_sorted = (s.cumsum(-1) - s) < p
    kept = probs * keep_sorted.scatter(-1, order, keep_sorted)
    return kept / kept.sum(-1, keepdim=True)


@top_p.mistake("the cumulative sum ran over the vocabulary in its own order (no sort): top-p must add the "
               "probabilities from the most likely token down, so sort first and scatter the mask back")
def _(logits, p):
    probs = logits.softmax(-1)
    keep = (probs.cumsum(-1) - probs) < p
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


# --- 05.min_p -------------------------------------------------------------------------------------


@exercise("05.min_p", "min-p filtering", cases=lambda g: [
    Case(torch.tensor([[2.0, 1.5, 0.0, -1.0]]), 0.2, label="probabilities 0.52 0.32 0.12 0.04, p=0.2: cut at 0.104"),
    Case(2 * torch.randn(2, 10, generator=g), 0.1, label="two rows of random logits, p=0.1"),
    Case(torch.zeros(1, 40), 0.1, label="a flat row of 40 tokens (each 0.025): every token is within p of the top one"),
    Case(torch.tensor([[8.0, 0.0, 0.0, 0.0]]), 0.05, label="a confident row: only the top token survives"),
    Case(torch.randn(1, 6, generator=g), 0.0, label="p=0: nothing is removed"),
    Case(torch.tensor([[1.0, 1.0, 0.0]]), 1.0, label="p=1: only the tokens tied with the top one"),
])
def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities: keep the tokens at least p times as likely as the most
    likely one, renormalise."""
    probs = logits.softmax(dim=-1)                                      # (B, V)
    threshold = p * probs.amax(dim=-1, keepdim=True)                    # (B, 1): scales with the model's confidence
    kept = probs * (probs >= threshold)                                 # the top token always passes (p <= 1)
    return kept / kept.sum(dim=-1, keepdim=True)                        # renormalise


@min_p.mistake("used p as an absolute probability threshold (probs >= p): min-p scales the cut with the most "
               "likely token, probs >= p * probs.max(); on a flat row your version removes every token (NaN)")
def _(logits, p):
    probs = logits.softmax(-1)
    kept = probs * (probs >= p)
    return kept / kept.sum(-1, keepdim=True)


@min_p.mistake("compared logits, not probabilities: logits are log-probabilities up to a constant (and often "
               "negative), so p * max(logit) is no threshold at all. Take the softmax first")
def _(logits, p):
    probs = logits.softmax(-1)
    kept = probs * (logits >= p * logits.amax(-1, keepdim=True))
    return kept / kept.sum(-1, keepdim=True)


@min_p.mistake("forgot to renormalise: after zeroing the removed tokens, divide by the kept mass so each row "
               "sums to 1")
def _(logits, p):
    probs = logits.softmax(-1)
    return probs * (probs >= p * probs.amax(-1, keepdim=True))


# --- 05.repetition_penalty ------------------------------------------------------------------------


def _penalty_cases(g):
    mixed = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.5, 0.0], [1.0, 1.0, -2.0, 0.2, -0.5, 3.0]])
    return [
        Case(mixed, torch.tensor([[0, 1, 1, 1], [5, 2, 2, 4]]), 1.5,
             label="positive and negative logits, tokens repeated in the history, two rows with their own histories"),
        Case(2 * torch.randn(3, 12, generator=g), torch.randint(0, 12, (3, 6), generator=g), 1.3,
             label="three rows of random logits, penalty 1.3"),
        Case(torch.tensor([[3.0, -2.0, 1.0]]), torch.tensor([[0, 1, 0, 0]]), 0.5,
             label="penalty 0.5 < 1: seen tokens become MORE likely"),
        Case(torch.tensor([[1.0, -1.0, 0.0, 2.0]]), torch.tensor([[0, 1, 2]]), 1.0, label="penalty 1: nothing changes"),
    ]


@exercise("05.repetition_penalty", "the repetition penalty (CTRL, Hugging Face)", cases=_penalty_cases)
def repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """(B, V) logits, (B, T) token ids each row has seen -> (B, V) logits where every seen token is
    pushed down once: a positive logit divided by the penalty, a negative one multiplied by it."""
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, history, True)   # (B, V): row b saw token v
    pushed_down = torch.where(logits > 0, logits / penalty, logits * penalty)     # toward -inf, whatever the sign
    return torch.where(seen, pushed_down, logits)                                 # unseen tokens keep their logit


@repetition_penalty.mistake("multiplied a positive logit by the penalty: 2.0 * 1.5 = 3.0 makes a seen token MORE "
                            "likely. A positive logit is divided by the penalty, a negative one multiplied")
def _(logits, history, penalty):
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, history, True)
    return torch.where(seen, logits * penalty, logits)


@repetition_penalty.mistake("divided every seen logit by the penalty: a negative logit moves toward 0 "
                            "(-3 / 1.5 = -2), so a seen token becomes MORE likely. Multiply the negative ones")
def _(logits, history, penalty):
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, history, True)
    return torch.where(seen, logits / penalty, logits)


@repetition_penalty.mistake("penalised a token once per occurrence (penalty ** count): that is a frequency penalty; "
                            "CTRL's and Hugging Face's repetition penalty applies once to every token seen at least once")
def _(logits, history, penalty):
    counts = torch.zeros_like(logits).scatter_add(1, history, torch.ones_like(history, dtype=logits.dtype))
    factor = penalty ** counts
    return torch.where(logits > 0, logits / factor, logits * factor)


@repetition_penalty.mistake("every row was penalised with the tokens of ALL rows: each sequence in the batch has its "
                            "own history; scatter row by row (scatter(1, history, True)), not into one shared set")
def _(logits, history, penalty):
    seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
    seen[history.flatten()] = True
    pushed_down = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, pushed_down, logits)
