"""Exercises of 11_pretraining_lab: BERT's 80/10/10 corruption, the prefix-LM mask, the update-to-data ratio."""
import torch

from . import Case, exercise

# --- 11.mlm_corrupt -------------------------------------------------------------------------------


def _mlm_cases(g):
    def case(T, rate, label):
        x = torch.randint(0, 20, (T,), generator=g)
        target = torch.rand(T, generator=g) < rate
        u = torch.rand(T, generator=g)
        random_ids = torch.randint(0, 20, (T,), generator=g)
        return Case(x, target, u, random_ids, 99, label=label)
    return [case(12, 0.5, "12 positions with half of them targets"),
            case(200, 0.15, "200 positions at BERT's 15% rate"),
            case(8, 1.0, "every position a target"),
            case(8, 0.0, "no target: the input must come back unchanged")]


@exercise("11.mlm_corrupt", "BERT's 80/10/10 corruption", cases=_mlm_cases)
def mlm_corrupt(x: torch.Tensor, is_target: torch.Tensor, u: torch.Tensor, random_ids: torch.Tensor,
                mask_id: int) -> torch.Tensor:
    """The masked LM's input: a target shows [MASK] when u < 0.8, a random id when 0.8 <= u < 0.9, itself
    otherwise; positions that are not targets are never changed. (u: one uniform draw per position.)"""
    out = x.clone()                                          # never modify the caller's ids
    out[is_target & (u < 0.8)] = mask_id
    swap = is_target & (u >= 0.8) & (u < 0.9)
    out[swap] = random_ids[swap]
    return out


@mlm_corrupt.mistake("positions that are not targets were corrupted too: only targets (is_target) get [MASK] or a "
                     "random id; the rest is the context the model reads, unchanged")
def _(x, is_target, u, random_ids, mask_id):
    out = x.clone()
    out[u < 0.8] = mask_id
    swap = (u >= 0.8) & (u < 0.9)
    out[swap] = random_ids[swap]
    return out


@mlm_corrupt.mistake("every target became [MASK]: BERT masks 80% of targets, swaps 10% for a random id and leaves "
                     "10% unchanged, so the model cannot assume that an unmasked token is always right")
def _(x, is_target, u, random_ids, mask_id):
    out = x.clone()
    out[is_target] = mask_id
    return out


@mlm_corrupt.mistake("the 10% bands are swapped: u < 0.8 -> [MASK], 0.8 <= u < 0.9 -> a random id, u >= 0.9 -> the "
                     "token itself")
def _(x, is_target, u, random_ids, mask_id):
    out = x.clone()
    out[is_target & (u < 0.8)] = mask_id
    swap = is_target & (u >= 0.9)
    out[swap] = random_ids[swap]
    return out


# --- 11.prefix_mask -------------------------------------------------------------------------------

@exercise("11.prefix_mask", "the prefix-LM attention mask", cases=[
    Case(4, 2, label="T=4 with a prefix of 2"), Case(5, 1, label="prefix 1: the causal mask"),
    Case(3, 3, label="prefix T: fully bidirectional"), Case(6, 0, label="prefix 0: the causal mask too")])
def prefix_mask(T: int, prefix: int) -> torch.Tensor:
    """(T, T) bool, True where query i may read key j: every query reads the whole prefix (j < prefix),
    and, as in a causal LM, itself and everything before it (j <= i)."""
    j = torch.arange(T)
    return (j[None, :] < prefix) | (j[None, :] <= j[:, None])


@prefix_mask.mistake("the prefix is one token too long: keys j < prefix are the prefix (positions 0 .. prefix-1), "
                     "not j <= prefix")
def _(T, prefix):
    j = torch.arange(T)
    return (j[None, :] <= prefix) | (j[None, :] <= j[:, None])


@prefix_mask.mistake("this is the plain causal mask: the prefix is missing. Inside the prefix every query reads "
                     "every prefix key, also the ones after it (j < prefix), which is what makes the prefix bidirectional")
def _(T, prefix):
    return torch.ones(T, T, dtype=torch.bool).tril()


@prefix_mask.mistake("the mask is transposed: rows are queries i and columns keys j; True where j < prefix or "
                     "j <= i")
def _(T, prefix):
    j = torch.arange(T)
    return ((j[None, :] < prefix) | (j[None, :] <= j[:, None])).T


# --- 11.update_ratio ------------------------------------------------------------------------------

def _ud_cases(g):
    w = torch.randn(16, 8, generator=g)
    return [Case(w, w - 1e-3 * torch.randn(16, 8, generator=g), label="a small step: about 10^-3"),
            Case(w, w + 0.1 * torch.randn(16, 8, generator=g), label="a big step: about 10^-1"),
            Case(3 * w, 3 * w - 0.02 * torch.sign(w), label="a sign-like step (Adam's early updates)"),
            Case(w + 5.0, w + 5.0 + 1e-2 * torch.randn(16, 8, generator=g),
                 label="weights with a large mean: std measures spread, not size")]


@exercise("11.update_ratio", "the update-to-data ratio (log10)", cases=_ud_cases, atol=1e-4)
def update_ratio(before: torch.Tensor, after: torch.Tensor) -> float:
    """log10( std(after - before) / std(before) ): how big one optimizer step is next to the weights
    (labkit.diagnostics logs it per matrix; about -3 is the folklore's healthy value)."""
    return torch.log10((after - before).std() / before.std()).item()


@update_ratio.mistake("compared the weights after the step with the weights before (after / before), not the "
                      "UPDATE (after - before) with the weights: the update is the difference")
def _(before, after):
    return torch.log10(after.std() / before.std()).item()


@update_ratio.mistake("the ratio is not in log10: the lab reads it in decades (-3 means the step is a thousandth "
                      "of the weights' spread), so take torch.log10 of the ratio")
def _(before, after):
    return ((after - before).std() / before.std()).item()


@update_ratio.mistake("used the norm or the mean instead of the standard deviation: the ratio compares spreads, "
                      "std(update) / std(weights), so a matrix with a large mean is not called 'big'")
def _(before, after):
    return torch.log10((after - before).abs().mean() / before.abs().mean()).item()
