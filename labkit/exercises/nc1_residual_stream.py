"""Exercises of C1_residual_stream_probing: the stream as a sum of writes, a ridge probe in closed
form for every regularisation strength, and balanced accuracy."""
import torch

from . import Case, exercise

# --- C1.residual_stream ---------------------------------------------------------------------------


def _writes(g, L, B, T, D):
    return (torch.randn(B, T, D, generator=g), torch.randn(L, B, T, D, generator=g),
            torch.randn(L, B, T, D, generator=g))


def _stream_cases(g):
    return [
        Case(*_writes(g, 3, 2, 4, 5), label="3 blocks, B=2, T=4, d_model=5"),
        Case(*_writes(g, 1, 1, 3, 4), label="one block: the stream has 2 entries (before, after)"),
        Case(torch.ones(1, 1, 2), torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2),
             label="blocks that write nothing: the embedding passes through unchanged"),
        Case(torch.zeros(1, 2, 3), torch.ones(4, 1, 2, 3), 10 * torch.ones(4, 1, 2, 3),
             label="attention writes 1, the MLP 10, per block: the stream reads 0, 11, 22, 33, 44"),
    ]


@exercise("C1.residual_stream", "the residual stream as a running sum of writes", cases=_stream_cases)
def residual_stream(embed: torch.Tensor, attn_out: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
    """embed (B, T, D); attn_out, mlp_out (L, B, T, D): what block i's attention and MLP add.

    Returns (L + 1, B, T, D): entry i is what block i reads (resid_pre), entry L what comes out
    of the last block: stream[0] = embed, stream[i + 1] = stream[i] + attn_out[i] + mlp_out[i].
    """
    writes = (attn_out + mlp_out).cumsum(0)                       # (L, B, T, D): everything written up to block i
    return torch.cat([embed[None], embed[None] + writes])          # (L + 1, B, T, D): the embedding comes first


@residual_stream.mistake("the embedding is missing: the stream STARTS as the token embedding and every "
                         "block adds to it (stream[0] = embed), so add embed to every entry")
def _(embed, attn_out, mlp_out):
    writes = (attn_out + mlp_out).cumsum(0)
    return torch.cat([torch.zeros_like(embed)[None], writes])


@residual_stream.mistake("the stream has L entries, one too few: entry i must be what block i READS "
                         "(before its own writes), so stack the embedding first and then L running sums: L + 1 entries")
def _(embed, attn_out, mlp_out):
    return embed[None] + (attn_out + mlp_out).cumsum(0)


@residual_stream.mistake("only attention's writes are summed: each block adds TWO writes to the stream, "
                         "attn_out and then mlp_out")
def _(embed, attn_out, mlp_out):
    return torch.cat([embed[None], embed[None] + attn_out.cumsum(0)])


@residual_stream.mistake("each entry adds only that block's writes, not the running total: the stream "
                         "accumulates, so use a cumulative sum over blocks (.cumsum(0))")
def _(embed, attn_out, mlp_out):
    return torch.cat([embed[None], embed[None] + attn_out + mlp_out])


# --- C1.ridge_probe -------------------------------------------------------------------------------

def _ridge_cases(g):
    return [
        Case(torch.randn(20, 4, generator=g), torch.randn(20, 2, generator=g), [0.5, 5.0, 50.0],
             label="N=20 tokens, D=4 features, C=2 targets, three strengths"),
        Case(torch.randn(6, 10, generator=g), torch.randn(6, 3, generator=g), [1.0, 10.0],
             label="fewer tokens than features (N=6 < D=10): only lambda > 0 makes it solvable"),
        Case(torch.randn(3, 15, 5, generator=g), torch.randn(3, 15, 2, generator=g), [2.0],
             label="a batch of 3 layers at once: X (3, N, D), Y (3, N, C) -> (3, 1, D, C)"),
        Case(torch.randn(12, 3, generator=g), torch.randn(12, 1, generator=g), [1e4],
             label="a huge lambda: W shrinks towards X^T Y / lambda"),
    ]


@exercise("C1.ridge_probe", "a ridge probe in closed form, for several strengths", cases=_ridge_cases,
          atol=1e-5, rtol=1e-3)
def ridge_probe(X: torch.Tensor, Y: torch.Tensor, lams) -> torch.Tensor:
    """The ridge solution W = (X^T X + lam I)^-1 X^T Y for every lam in ``lams``.

    X (..., N, D) features, Y (..., N, C) targets, lams: K strengths -> W (..., K, D, C).
    W minimises ||X W - Y||^2 + lam ||W||^2. One eigendecomposition X^T X = V diag(s) V^T
    serves every lam: (X^T X + lam I)^-1 = V diag(1 / (s + lam)) V^T.
    """
    s, V = torch.linalg.eigh(X.transpose(-2, -1) @ X)              # (..., D), (..., D, D): the Gram matrix, once
    proj = V.transpose(-2, -1) @ (X.transpose(-2, -1) @ Y)         # (..., D, C): X^T Y in the eigenbasis
    W = [V @ (proj / (s[..., None] + lam)) for lam in lams]        # each (..., D, C): lam > 0 keeps s + lam > 0
    return torch.stack(W, dim=-3)                                  # (..., K, D, C)


@ridge_probe.mistake("lam was added to EVERY entry of X^T X (X.T @ X + lam): ridge adds it to the "
                     "diagonal only, X^T X + lam * I (torch.eye(D)), which shrinks W towards 0")
def _(X, Y, lams):
    G, XtY = X.transpose(-2, -1) @ X, X.transpose(-2, -1) @ Y
    return torch.stack([torch.linalg.solve(G + lam, XtY) for lam in lams], dim=-3)


@ridge_probe.mistake("lam is ignored: this is plain least squares (pinv / lstsq), the same W for every "
                     "strength. Ridge solves (X^T X + lam I) W = X^T Y")
def _(X, Y, lams):
    W = torch.linalg.pinv(X) @ Y
    return torch.stack([W for _ in lams], dim=-3)


@ridge_probe.mistake("the strengths are stacked on the first axis, (K, ..., D, C): put them just before "
                     "(D, C), torch.stack(..., dim=-3), so a batch of layers gives (layers, K, D, C)")
def _(X, Y, lams):
    G, XtY = X.transpose(-2, -1) @ X, X.transpose(-2, -1) @ Y
    eye = torch.eye(X.shape[-1], dtype=X.dtype)
    return torch.stack([torch.linalg.solve(G + lam * eye, XtY) for lam in lams], dim=0)


# --- C1.balanced_accuracy -------------------------------------------------------------------------

def _bacc_cases(g):
    return [
        Case(torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1]), 2,
             label="always predicting the majority class: 80% accuracy, but balanced accuracy 0.5"),
        Case(torch.tensor([0, 1, 1, 2, 2, 2]), torch.tensor([0, 1, 2, 2, 2, 1]), 3, label="three classes"),
        Case(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1]), 3,
             label="class 2 never occurs in y: average over the classes that occur"),
        Case(torch.randint(0, 4, (3, 50), generator=g), torch.randint(0, 4, (50,), generator=g), 4,
             label="predictions of 3 probes (3, N) against one y (N,) -> (3,)"),
    ]


@exercise("C1.balanced_accuracy", "balanced accuracy: the mean recall over classes", cases=_bacc_cases)
def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor, n_cls: int) -> torch.Tensor:
    """pred (..., N), y (..., N) integer classes in 0..n_cls-1 -> (...) float: the mean over the classes
    that occur in y of their recall (the share of class-c tokens predicted as c). Chance = 1 / classes."""
    pred, y = torch.broadcast_tensors(pred, y)                      # (3, N) predictions against one y (N,)
    recall, present = [], []
    for c in range(n_cls):
        is_c = y == c
        count = is_c.sum(-1)                                        # (...): tokens of class c
        recall.append(((pred == c) & is_c).sum(-1) / count.clamp_min(1))
        present.append(count > 0)                                   # a class absent from y has no recall
    recall, present = torch.stack(recall), torch.stack(present)    # (n_cls, ...)
    return (recall * present).sum(0) / present.sum(0)


@balanced_accuracy.mistake("this is plain accuracy: it rewards the majority class, so a probe that always "
                           "answers 'not a speaker line' scores 0.9 on 10% speaker lines. Average the "
                           "recall of each class instead")
def _(pred, y, n_cls):
    return (pred == y).float().mean(-1).expand(torch.broadcast_shapes(pred.shape, y.shape)[:-1])


@balanced_accuracy.mistake("this averages precision (correct / times class c was PREDICTED); recall divides "
                           "by how often class c OCCURS in y")
def _(pred, y, n_cls):
    prec = [((pred == c) & (y == c)).sum(-1) / (pred == c).sum(-1).clamp_min(1) for c in range(n_cls)]
    return torch.stack(prec).mean(0)


@balanced_accuracy.mistake("a class that never occurs in y counted as recall 0, which drags the mean "
                           "down: average only over the classes present in y")
def _(pred, y, n_cls):
    rec = [((pred == c) & (y == c)).sum(-1) / (y == c).sum(-1).clamp_min(1) for c in range(n_cls)]
    return torch.stack(rec).mean(0)
