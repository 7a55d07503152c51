"""Exercises of D2_bayesian_geometry: the logit lens, the RMS cosine of a "hypothesis frame", and the
R² of the strongest simple control (a group-mean predictor) that a geometric claim must beat."""
import torch
import torch.nn.functional as F

from . import Case, exercise

# --- D2.logit_lens --------------------------------------------------------------------------------


def _lens_case(g, B, L, C, V, label):
    weight, bias = 1 + 0.5 * torch.randn(C, generator=g), 0.3 * torch.randn(C, generator=g)   # a trained-looking norm
    resid = 3 * torch.randn(B, L, C, generator=g) + 2        # off-centre and large: the norm matters
    return Case(resid, weight, bias, torch.randn(2 * V, C, generator=g), V, label=label)


@exercise("D2.logit_lens", "the logit lens on value tokens", cases=lambda g: [
    _lens_case(g, 2, 3, 8, 4, "B=2, L=3 key positions, width 8, V=4"),
    _lens_case(g, 1, 1, 6, 2, "one position, V=2"),
    _lens_case(g, 3, 5, 16, 5, "B=3, L=5, width 16, V=5")])
def logit_lens(resid: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, W_U: torch.Tensor,
               n_keys: int) -> torch.Tensor:
    """Read a residual stream (B, L, C) as the model's belief: (B, L, V) log-probabilities over the values.

    ``ln_weight``, ``ln_bias`` (C,): the final LayerNorm's (eps 1e-5); ``W_U`` (2V, C): the unembedding
    (rows 0..V-1 are the key tokens, V..2V-1 the values).
    """
    x = F.layer_norm(resid, resid.shape[-1:], ln_weight, ln_bias, eps=1e-5)   # what the unembedding reads
    logits = x @ W_U.T                                        # (B, L, 2V): what the model would output here
    return logits[..., n_keys:].log_softmax(-1)               # a key is never the answer: softmax over values


@logit_lens.mistake("skipped the final LayerNorm: the unembedding was trained on ln_f(resid), never on the raw "
                    "residual, whose scale and offset differ. Normalise first (F.layer_norm with its weight and bias)")
def _(resid, ln_weight, ln_bias, W_U, n_keys):
    return (resid @ W_U.T)[..., n_keys:].log_softmax(-1)


@logit_lens.mistake("normalised without the LayerNorm's learned weight and bias: pass them to F.layer_norm "
                    "(the model always applies them)")
def _(resid, ln_weight, ln_bias, W_U, n_keys):
    return (F.layer_norm(resid, resid.shape[-1:], eps=1e-5) @ W_U.T)[..., n_keys:].log_softmax(-1)


@logit_lens.mistake("the softmax ran over all 2V tokens, keys included: keep the value logits (columns V..2V-1) "
                    "first, then log_softmax, so the belief over the V values sums to 1")
def _(resid, ln_weight, ln_bias, W_U, n_keys):
    x = F.layer_norm(resid, resid.shape[-1:], ln_weight, ln_bias, eps=1e-5)
    return (x @ W_U.T).log_softmax(-1)[..., n_keys:]


@logit_lens.mistake("these are the KEY tokens' logits (columns 0..V-1): the values are tokens V..2V-1")
def _(resid, ln_weight, ln_bias, W_U, n_keys):
    x = F.layer_norm(resid, resid.shape[-1:], ln_weight, ln_bias, eps=1e-5)
    return (x @ W_U.T)[..., :n_keys].log_softmax(-1)


@logit_lens.mistake("returned logits, not log-probabilities: apply log_softmax over the values")
def _(resid, ln_weight, ln_bias, W_U, n_keys):
    x = F.layer_norm(resid, resid.shape[-1:], ln_weight, ln_bias, eps=1e-5)
    return (x @ W_U.T)[..., n_keys:]


# --- D2.rms_cosine --------------------------------------------------------------------------------

@exercise("D2.rms_cosine", "how orthogonal is a frame? (RMS off-diagonal cosine)", cases=lambda g: [
    Case(torch.eye(4) * torch.tensor([[1.0], [2.0], [0.5], [3.0]]), label="orthogonal vectors of different lengths: 0"),
    Case(torch.tensor([[1.0, 0.0], [0.5, 0.75 ** 0.5]]), label="two unit vectors at 60 degrees: 0.5"),
    Case(torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]),
         label="opposite vectors count like aligned ones (cos -1), plus one orthogonal"),
    Case(torch.randn(6, 16, generator=g), label="6 random vectors in 16 dimensions"),
    Case(torch.randn(20, 8, generator=g), label="20 vectors in 8 dimensions (more vectors than dimensions)")])
def rms_cosine(vectors: torch.Tensor) -> float:
    """(n, d) vectors -> the root mean square of the cosines between every pair of DIFFERENT vectors."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True)               # (n, d): length no longer matters
    cos = unit @ unit.T                                               # (n, n); the diagonal is cos(v, v) = 1
    off = ~torch.eye(len(vectors), dtype=torch.bool)                  # pairs i != j only
    return cos[off].pow(2).mean().sqrt().item()                       # RMS: +cos and -cos both count


@rms_cosine.mistake("the vectors were not normalised: dot products grow with the vectors' lengths. Divide each "
                    "vector by its norm first, so only the angles count")
def _(vectors):
    dots = vectors @ vectors.T
    off = ~torch.eye(len(vectors), dtype=torch.bool)
    return dots[off].pow(2).mean().sqrt().item()


@rms_cosine.mistake("the diagonal was included: each vector's cosine with itself is 1, which pulls the RMS up. "
                    "Average over pairs i != j only")
def _(vectors):
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    return (unit @ unit.T).pow(2).mean().sqrt().item()


@rms_cosine.mistake("a plain mean of the cosines: +0.5 and -0.5 cancel, so aligned and opposite pairs look "
                    "orthogonal. Square them, average, then take the square root (RMS)")
def _(vectors):
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    off = ~torch.eye(len(vectors), dtype=torch.bool)
    return (unit @ unit.T)[off].mean().item()


# --- D2.group_r2 ----------------------------------------------------------------------------------

def _group_cases(g):
    groups = torch.randint(0, 4, (40,), generator=g)
    y = groups.float() + 0.3 * torch.randn(40, generator=g)
    return [
        Case(groups[:20], y[:20], groups[20:], y[20:], label="4 groups, y = group + noise"),
        Case(torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 3.0, 5.0, 7.0]), torch.tensor([0, 1, 1, 0]),
             torch.tensor([2.0, 6.0, 5.0, 1.0]), label="two groups, worked by hand: R² = 1 - 2/17 = 0.88"),
        Case(torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 3.0, 5.0, 7.0]), torch.tensor([0, 2, 1]),
             torch.tensor([2.0, 4.0, 6.0]), label="a test group never seen while fitting: predict the overall fit mean"),
        Case(torch.zeros(6, dtype=torch.long), torch.arange(6.0), torch.zeros(4, dtype=torch.long),
             torch.tensor([1.0, 2.0, 3.0, 4.0]), label="one group only: it knows nothing, R² = 0"),
    ]


@exercise("D2.group_r2", "R² of the best predictor that knows only a discrete feature", cases=_group_cases)
def group_r2(groups_fit: torch.Tensor, y_fit: torch.Tensor, groups_test: torch.Tensor,
             y_test: torch.Tensor) -> float:
    """Predict each test point by the mean of ``y_fit`` over the fitting points of its group (the overall
    fitting mean for a group never seen), and score on the test points: R² = 1 - SSE / SST."""
    pred = torch.full_like(y_test, y_fit.mean().item())                 # unseen group: the best guess left
    for grp in groups_test.unique():
        seen = groups_fit == grp
        if seen.any():
            pred[groups_test == grp] = y_fit[seen].mean()               # the group's mean, learnt on the fit half
    sse = (y_test - pred).pow(2).sum()
    sst = (y_test - y_test.mean()).pow(2).sum()                         # what predicting the mean would cost
    return (1 - sse / sst).item()


@group_r2.mistake("the group means were taken from the TEST points, so the predictor saw the answers: learn "
                  "each group's mean on the fitting half only, then score it on the test half")
def _(groups_fit, y_fit, groups_test, y_test):
    pred = torch.empty_like(y_test)
    for grp in groups_test.unique():
        pred[groups_test == grp] = y_test[groups_test == grp].mean()
    return (1 - (y_test - pred).pow(2).sum() / (y_test - y_test.mean()).pow(2).sum()).item()


@group_r2.mistake("a test group never seen while fitting got NaN (the mean of nothing): fall back to the overall "
                  "mean of y_fit for it")
def _(groups_fit, y_fit, groups_test, y_test):
    pred = torch.empty_like(y_test)
    for grp in groups_test.unique():
        pred[groups_test == grp] = y_fit[groups_fit == grp].mean()
    return (1 - (y_test - pred).pow(2).sum() / (y_test - y_test.mean()).pow(2).sum()).item()


@group_r2.mistake("R² is upside down: it is 1 - SSE / SST (the share of the variance explained), not SSE / SST")
def _(groups_fit, y_fit, groups_test, y_test):
    pred = torch.full_like(y_test, y_fit.mean().item())
    for grp in groups_test.unique():
        if (groups_fit == grp).any():
            pred[groups_test == grp] = y_fit[groups_fit == grp].mean()
    return ((y_test - pred).pow(2).sum() / (y_test - y_test.mean()).pow(2).sum()).item()
