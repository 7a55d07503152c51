"""Exercises of A4_forgetting: perplexity from log-probabilities, a replay batch mixer."""
import math

import torch
import torch.nn.functional as F

from . import Case, exercise

# --- A4.perplexity --------------------------------------------------------------------------------


def _perplexity_cases(g):
    V = 7
    targets = torch.randint(V, (2, 6), generator=g)
    targets[0, :2] = -100                                         # a masked prompt
    targets[1, -1] = -100                                         # padding at the end
    one = torch.full((1, 4), -100)
    one[0, 2] = 3
    return [
        Case(torch.randn(2, 6, V, generator=g), targets, label="(2, 6, 7) logits, some targets -100 (not scored)"),
        Case(torch.randn(3, 5, V, generator=g), torch.randint(V, (3, 5), generator=g), label="every position scored"),
        Case(torch.zeros(2, 3, 10), torch.randint(10, (2, 3), generator=g),
             label="uniform logits: the perplexity is the vocabulary size, 10"),
        Case(torch.randn(1, 4, V, generator=g), one, label="a single scored token"),
        Case(*_one_unlikely_target(),
             label="50 confident tokens and one target 120 nats below the best: p = e^-120 underflows float32"),
    ]


def _one_unlikely_target():
    """(1, 50, 5) logits where every target is the obvious token except one, at log p = -120."""
    logits = torch.zeros(1, 50, 5)
    logits[..., 0] = 20.0                        # token 0: p = 1 - 4e-9
    logits[0, 7, 3] = -100.0                     # token 3 at position 7: log p = -120 - ... < log(1e-45)
    targets = torch.zeros(1, 50, dtype=torch.long)
    targets[0, 7] = 3
    return logits, targets


@exercise("A4.perplexity", "perplexity from log-probabilities", cases=_perplexity_cases, rtol=1e-4)
def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean negative log-likelihood, in nats) over the scored positions (targets != -100).

    logits: (B, T, V) scores for the next token; targets: (B, T) the next token, -100 where not scored.
    """
    logp = F.log_softmax(logits.float(), dim=-1)                          # (B, T, V): stable, no exp overflow
    scored = targets != -100                                              # (B, T)
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)   # (B, T): log p(target)
    nll = -(picked * scored).sum() / scored.sum()                         # mean over scored tokens only
    return math.exp(nll.item())                                           # e^(nats): natural log throughout


@perplexity.mistake("the positions with target -100 are scored too (as token 0): they are the prompt and the "
                    "padding, which the model is not asked to predict. Average over targets != -100 only "
                    "(F.cross_entropy(..., ignore_index=-100) or a mask)")
def _(logits, targets):
    return math.exp(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().clamp_min(0)).item())


@perplexity.mistake("this is the mean of the per-token perplexities, exp(nll).mean(): one unlikely token "
                    "dominates it. Perplexity is exp of the MEAN negative log-likelihood: average first, then exp")
def _(logits, targets):
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return nll[targets.flatten() != -100].exp().mean().item()


@perplexity.mistake("2 ** nll mixes units: cross-entropy and log_softmax are in nats (natural log), so "
                    "perplexity is e ** nll (math.exp). 2 ** x is for entropies measured in bits")
def _(logits, targets):
    return 2 ** F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100).item()


@perplexity.mistake("softmax(...).log() underflows: a probability below ~1e-38 becomes 0 and its log -inf, so "
                    "the perplexity is inf. Use F.log_softmax (it subtracts the max and never takes log of 0)")
def _(logits, targets):
    logp = logits.float().softmax(-1).log()
    scored = targets != -100
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return math.exp((-(picked * scored).sum() / scored.sum()).item())


# --- A4.replay_mix --------------------------------------------------------------------------------

def _rows(B, T, start):
    """x[b, t] = start + 10 b + t and y = x + 1: each row says where it came from."""
    x = start + 10 * torch.arange(B)[:, None] + torch.arange(T)[None, :]
    return x, x + 1


@exercise("A4.replay_mix", "a replay batch mixer", output_names=("x", "y"), cases=[
    Case(_rows(8, 4, 1000), _rows(8, 4, 2000), 0.25, label="B=8, 25% replay: 6 task rows, then 2 general rows"),
    Case(_rows(4, 3, 1000), _rows(4, 3, 2000), 0.0, label="no replay: the task batch unchanged"),
    Case(_rows(4, 3, 1000), _rows(4, 3, 2000), 1.0, label="100% replay: only general rows"),
    Case(_rows(5, 2, 1000), _rows(5, 2, 2000), 0.4, label="B=5, 40%: 3 task rows, 2 general rows"),
    Case(_rows(10, 2, 1000), _rows(10, 2, 2000), 0.7, label="B=10, 70%: 3 task rows, 7 general rows"),
])
def replay_mix(task: tuple, general: tuple, fraction: float) -> tuple:
    """One batch of B rows: the first B - n rows of the task batch, then the first n rows of the
    general batch, n = round(fraction * B). task and general are (x, y) pairs of (B, T) tensors."""
    (x_task, y_task), (x_gen, y_gen) = task, general
    B = x_task.shape[0]
    n = round(fraction * B)                                   # rows of general text replayed
    x = torch.cat([x_task[:B - n], x_gen[:n]])                # (B, T): the batch size does not change
    y = torch.cat([y_task[:B - n], y_gen[:n]])                # each row keeps its own targets
    return x, y


@replay_mix.mistake("the batch grew: the general rows were appended to all B task rows. Replay REPLACES "
                    "part of the batch (B - n task rows + n general rows = B), so the step costs the same and "
                    "the task keeps 1 - fraction of each batch")
def _(task, general, fraction):
    n = round(fraction * task[0].shape[0])
    return torch.cat([task[0], general[0][:n]]), torch.cat([task[1], general[1][:n]])


@replay_mix.mistake("the fraction is inverted: `fraction` is the share of GENERAL (replayed) rows, "
                    "n = round(fraction * B); you took that many task rows")
def _(task, general, fraction):
    B = task[0].shape[0]
    n = round((1 - fraction) * B)
    return torch.cat([task[0][:B - n], general[0][:n]]), torch.cat([task[1][:B - n], general[1][:n]])


@replay_mix.mistake("the targets do not match the inputs: y was taken from the task batch for every row, so "
                    "the replayed rows ask the model to predict task text after general text. Mix y exactly "
                    "like x")
def _(task, general, fraction):
    B = task[0].shape[0]
    n = round(fraction * B)
    return torch.cat([task[0][:B - n], general[0][:n]]), task[1]
