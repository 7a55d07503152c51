"""Exercises of D1_bayesian_wind_tunnel: the exact posterior at one key, KL(Bayes || model) in bits,
the entropy-per-position curve a model is graded on."""
import math

import torch

from . import Case, exercise

# --- D1.posterior ---------------------------------------------------------------------------------


@exercise("D1.posterior", "the exact posterior at one key", cases=[
    Case([], [], 2, 4, label="nothing shown yet: uniform over all V = 4 values"),
    Case([0, 3], [2, 0], 1, 5, label="two pairs shown: uniform over the 3 values still free"),
    Case([4, 1, 0], [1, 3, 2], 1, 5, label="a repeated key: its value was shown, so it is certain"),
    Case([0, 1, 2], [3, 0, 1], 3, 4, label="one value left: certain without a repeat"),
    Case([2, 0, 5, 1], [5, 4, 0, 2], 3, 6, label="V = 6, four values revealed")])
def posterior(shown_keys: list[int], shown_vals: list[int], key: int, V: int) -> torch.Tensor:
    """(V,) probabilities of the value behind ``key``, given the pairs shown before it."""
    if key in shown_keys:                                     # a bijection: the same key, the same value
        p = torch.zeros(V)
        p[shown_vals[shown_keys.index(key)]] = 1.0
        return p
    free = torch.ones(V)                                      # a fresh key: any value nobody has taken
    free[list(shown_vals)] = 0.0
    return free / free.sum()                                  # uniform over them: 1 / (V - #revealed)


@posterior.mistake("uniform over all V values: the context was ignored. A bijection never reuses a value, so "
                   "every value already shown is ruled out: give each still-free value 1 / (number free)")
def _(shown_keys, shown_vals, key, V):
    return torch.full((V,), 1.0 / V)


@posterior.mistake("the probabilities do not sum to 1: the revealed values got 0 but the free ones kept 1/V. "
                   "Renormalise: divide by the number of free values")
def _(shown_keys, shown_vals, key, V):
    p = torch.full((V,), 1.0 / V)
    p[list(shown_vals)] = 0.0
    return p


@posterior.mistake("a repeated key was treated as fresh, which rules out the very value it had: when the key "
                   "was shown before, all the mass goes on the value shown with it (0 bits)")
def _(shown_keys, shown_vals, key, V):
    free = torch.ones(V)
    free[list(shown_vals)] = 0.0
    return free / free.sum()


# --- D1.kl_bits -----------------------------------------------------------------------------------

def _kl_cases(g):
    p = torch.rand(3, 5, generator=g).softmax(-1)
    q = torch.randn(3, 5, generator=g).log_softmax(-1)
    post = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1 / 3, 1 / 3, 0.0, 1 / 3], [0.0, 0.5, 0.0, 0.5]])
    return [
        Case(p, q, label="random distributions, no zeros (3, 5)"),
        Case(post, torch.randn(3, 4, generator=g).log_softmax(-1),
             label="exact posteriors with zeros (ruled-out values): 0 log 0 counts as 0"),
        Case(post, post.clamp_min(1e-30).log(), label="the model equals Bayes: KL is 0"),
        Case(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]).log(), label="certain vs a coin: exactly 1 bit"),
        Case(post[None].expand(2, 3, 4), torch.randn(2, 3, 4, generator=g).log_softmax(-1),
             label="(B, L, V) batches: one KL per sequence and position"),
    ]


@exercise("D1.kl_bits", "KL(Bayes || model) in bits", cases=_kl_cases, atol=1e-5)
def kl_bits(p: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """sum_v p(v) (log p(v) - log q(v)) over the last axis, in bits; q given as natural log-probs."""
    log_p = torch.log(p.clamp_min(1e-30))                    # where p = 0 the term is p * (...) = 0, not NaN
    return (p * (log_p - q_logprobs)).sum(-1) / math.log(2)  # nats -> bits


@kl_bits.mistake("the result is in nats: torch.log is the natural log. Divide by ln 2 for bits")
def _(p, q_logprobs):
    return (p * (torch.log(p.clamp_min(1e-30)) - q_logprobs)).sum(-1)


@kl_bits.mistake("0 * log 0 gave NaN where the posterior is exactly 0 (a ruled-out value): torch.log(0) is -inf "
                 "and 0 * -inf is NaN. Clamp p before the log (p.clamp_min(1e-30)): those terms are 0")
def _(p, q_logprobs):
    return (p * (torch.log(p) - q_logprobs)).sum(-1) / math.log(2)


@kl_bits.mistake("the direction is reversed: this is KL(model || Bayes), weighted by the model's probabilities. "
                 "It is infinite wherever Bayes says 0; the excess loss over Bayes is KL(Bayes || model), "
                 "weighted by p")
def _(p, q_logprobs):
    q = q_logprobs.exp()
    return (q * (q_logprobs - torch.log(p))).sum(-1) / math.log(2)


@kl_bits.mistake("forgot to sum over the values (the last axis): KL is one number per distribution")
def _(p, q_logprobs):
    return p * (torch.log(p.clamp_min(1e-30)) - q_logprobs) / math.log(2)


# --- D1.entropy_curve -----------------------------------------------------------------------------

def _curve_cases(g):
    onehot = torch.eye(4)[torch.randint(0, 4, (3, 5), generator=g)]                        # (3, 5, 4)
    mixed = torch.stack([torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0]]),
                         torch.tensor([[0, 1.0, 0, 0], [0, 0, 0.5, 0.5]])])                   # (2, 2, 4)
    return [
        Case(torch.randn(4, 6, 5, generator=g).softmax(-1), label="random beliefs (B=4, L=6, V=5)"),
        Case(torch.full((2, 3, 8), 1 / 8), label="uniform over 8 values: 3 bits at every position"),
        Case(onehot, label="certain beliefs (one-hot): 0 bits, and no NaN from 0 log 0"),
        Case(mixed, label="two sequences certain of different values: each has 0 bits at t=0"),
        Case(torch.randn(1, 4, 3, generator=g).softmax(-1), label="one sequence (B=1)"),
    ]


@exercise("D1.entropy_curve", "the entropy-per-position curve", cases=_curve_cases, atol=1e-5)
def entropy_curve(probs: torch.Tensor) -> torch.Tensor:
    """(B, L, V) beliefs -> (L,) mean over the B sequences of each belief's entropy, in bits."""
    h = -(probs * torch.log2(probs.clamp_min(1e-30))).sum(-1)     # (B, L): one entropy per belief, 0 log 0 = 0
    return h.mean(0)                                              # average over sequences, per position


@entropy_curve.mistake("the entropy is in nats (torch.log): use torch.log2, or divide by ln 2, for bits")
def _(probs):
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1).mean(0)


@entropy_curve.mistake("averaged the distributions first, then took one entropy: the entropy of an average is "
                       "larger than the average entropy (two certain beliefs about different values average to "
                       "a coin, 1 bit). Take each sequence's entropy, then average")
def _(probs):
    p = probs.mean(0)
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(-1)


@entropy_curve.mistake("averaged over the wrong axis: the curve has one value per position t (average over the "
                       "sequences, axis 0), not one per sequence")
def _(probs):
    return -(probs * torch.log2(probs.clamp_min(1e-30))).sum(-1).mean(1)


@entropy_curve.mistake("0 log 0 gave NaN for a value with probability exactly 0: clamp before the log "
                       "(probs.clamp_min(1e-30)); those terms are 0")
def _(probs):
    return -(probs * torch.log2(probs)).sum(-1).mean(0)
