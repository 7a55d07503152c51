"""Exercises of 03_attention_basics: the causal mask, a numerically stable softmax, splitting heads."""
import torch

from . import Case, exercise

# --- 03.causal_mask -------------------------------------------------------------------------------


@exercise("03.causal_mask", "the causal mask", cases=[
    Case(1, label="T=1: a single token must still see itself"), Case(2, label="T=2"),
    Case(5, label="T=5"), Case(16, label="T=16")])
def causal_mask(T: int) -> torch.Tensor:
    """(T, T) bool, True where query i (row) may read key j (column): j <= i, itself included."""
    return torch.ones(T, T, dtype=torch.bool).tril()


@causal_mask.mistake("the mask is off by one: position t must see itself, so keep the diagonal "
                     "(tril(), not tril(-1)); without it row 0 has no key at all and its softmax is NaN")
def _(T):
    return torch.ones(T, T, dtype=torch.bool).tril(-1)


@causal_mask.mistake("True marks the FUTURE here (the blocked keys, nn.MultiheadAttention's convention); "
                     "this lab, like SDPA, uses True = may attend: True on and below the diagonal")
def _(T):
    return torch.ones(T, T, dtype=torch.bool).triu(1)


@causal_mask.mistake("the mask is transposed: rows are queries and columns keys, so query i reads keys "
                     "j <= i — True on and BELOW the diagonal (tril, not triu)")
def _(T):
    return torch.ones(T, T, dtype=torch.bool).triu()


@causal_mask.mistake("the mask holds 0/1 floats: make it boolean (dtype=torch.bool). A float mask means "
                     "something else — SDPA ADDS it to the scores, so 1.0 is a small bonus, not a block")
def _(T):
    return torch.ones(T, T).tril()


# --- 03.softmax -----------------------------------------------------------------------------------

def _softmax_cases(g):
    inf = float("inf")
    return [
        Case(torch.randn(3, 5, generator=g), label="small random scores (3, 5)"),
        Case(torch.tensor([[1000.0, 999.0, 998.0, 990.0], [-1000.0, -1001.0, -1002.0, -1010.0]]),
             label="large scores: exp(1000) overflows float32 (exp of anything above ~88.7 is inf)"),
        Case(torch.tensor([[50.0, 49.0, 48.0], [-60.0, -61.0, -62.0]]),
             label="rows of very different sizes (each row is its own softmax)"),
        Case(torch.tensor([[0.5, -inf, -inf], [1.0, 2.0, -inf], [0.1, 0.2, 0.3]]),
             label="masked keys: -inf scores must get weight exactly 0"),
        Case(torch.randn(4, 3, generator=g), dim=0, label="dim=0: each column sums to 1"),
        Case(3 * torch.randn(2, 3, 4, 4, generator=g), label="attention-shaped scores (B, nh, T, T)"),
    ]


@exercise("03.softmax", "a numerically stable softmax", cases=_softmax_cases, atol=1e-6)
def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x) / sum(exp(x)) along ``dim``, without overflow: softmax(x) = softmax(x - c) for any c."""
    z = x - x.amax(dim=dim, keepdim=True)        # each row's largest score becomes 0: exp(z) <= 1, never inf
    e = z.exp()                                  # exp(-inf) = 0: masked keys get exactly zero weight
    return e / e.sum(dim=dim, keepdim=True)      # each row sums to 1


@softmax.mistake("forgot to subtract the max before exp: large logits overflow to inf, and inf/inf is NaN. "
                 "Subtract each row's max first — softmax(x) = softmax(x - c) for any constant c")
def _(x, dim=-1):
    e = x.exp()
    return e / e.sum(dim=dim, keepdim=True)


@softmax.mistake("subtracted ONE max for the whole tensor (x.max()): a row far below it underflows to "
                 "exp(-110) = 0 everywhere, and 0/0 is NaN. Subtract each row's own max: x.amax(dim, keepdim=True)")
def _(x, dim=-1):
    e = (x - x.max()).exp()
    return e / e.sum(dim=dim, keepdim=True)


@softmax.mistake("the probabilities are not renormalised: after exp, divide by the sum along dim "
                 "so each row sums to 1")
def _(x, dim=-1):
    return (x - x.amax(dim=dim, keepdim=True)).exp()


@softmax.mistake("the `dim` argument is ignored (always the last axis): use dim in amax and sum")
def _(x, dim=-1):
    z = (x - x.amax(dim=-1, keepdim=True)).exp()
    return z / z.sum(dim=-1, keepdim=True)


@softmax.mistake("forgot keepdim=True: x.amax(dim) drops the axis, so each max no longer lines up with its "
                 "row — a shape error, or silently wrong numbers when the tensor is square")
def _(x, dim=-1):
    z = (x - x.amax(dim=dim)).exp()
    return z / z.sum(dim=dim, keepdim=True)


@softmax.mistake("modified the scores in place (x -= ..., x.exp_()): the caller's tensor changed. "
                 "Write z = x - m; e = z.exp() instead")
def _(x, dim=-1):
    x -= x.amax(dim=dim, keepdim=True)
    x.exp_()
    return x / x.sum(dim=dim, keepdim=True)


# --- 03.split_heads -------------------------------------------------------------------------------

def _channels(B, T, C):
    """x[b, t, c] = 100 b + 10 t + c: every entry says which sequence, token and channel it is."""
    return (100 * torch.arange(B)[:, None, None] + 10 * torch.arange(T)[None, :, None]
            + torch.arange(C)[None, None, :]).float()


@exercise("03.split_heads", "cut the channels into heads", cases=[
    Case(_channels(2, 3, 8), 2, label="B=2, T=3, C=8 into 2 heads of 4 (x[b, t, c] = 100b + 10t + c)"),
    Case(_channels(1, 4, 6), 3, label="3 heads of 2"),
    Case(_channels(2, 1, 8), 4, label="T=1: a single token"),
    Case(_channels(1, 3, 4), 1, label="one head: it holds every channel"),
    Case(_channels(1, 2, 4), 4, label="head size 1: one channel per head")])
def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, C) -> (B, n_head, T, C // n_head): head h owns channels h*hd .. (h+1)*hd - 1."""
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)   # cut channels, then move heads next to batch


@split_heads.mistake("reshaped straight to (B, n_head, T, hd): the shape is right but that cuts the sequence, "
                     "not the channels, so one head gets the first tokens' channels. View as (B, T, n_head, hd) "
                     "first, then transpose(1, 2)")
def _(x, n_head):
    B, T, C = x.shape
    return x.view(B, n_head, T, C // n_head)


@split_heads.mistake("the heads are interleaved: head h took every n_head-th channel. Each head owns a "
                     "contiguous slice of hd channels: view(B, T, n_head, hd), not view(B, T, hd, n_head)")
def _(x, n_head):
    B, T, C = x.shape
    return x.view(B, T, C // n_head, n_head).permute(0, 3, 1, 2)


@split_heads.mistake("forgot to move the head axis: (B, T, n_head, hd) must become (B, n_head, T, hd) "
                     "(transpose(1, 2)) so the attention matmuls run per head over T")
def _(x, n_head):
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head)
