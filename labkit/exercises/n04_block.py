"""Exercises of 04_transformer_block: LayerNorm, RMSNorm and the pre-norm block's wiring."""
import torch
import torch.nn.functional as F

from . import Case, exercise

# --- 04.layer_norm --------------------------------------------------------------------------------


def _norm_inputs(g):
    """(x, label) pairs: random tokens, tiny values (where eps matters), 4 channels (where dividing by
    C - 1 shows), a large mean (where centring matters), one token."""
    return [(torch.randn(2, 3, 8, generator=g), "(B, T, C) = (2, 3, 8) random tokens"),
            (1e-3 * torch.randn(1, 2, 16, generator=g), "tiny values (std 1e-3): eps is comparable to the "
                                                          "mean square, so where eps goes matters"),
            (torch.randn(3, 4, generator=g), "C = 4 channels"),
            (5 + torch.randn(2, 6, generator=g), "tokens with mean 5: centring (or not) changes everything"),
            (torch.randn(1, 1, 8, generator=g), "one token (B = T = 1)")]


def _gain(g, C):
    return 1 + 0.3 * torch.randn(C, generator=g)                  # gains away from 1: a dropped gain shows


@exercise("04.layer_norm", "LayerNorm by hand", cases=lambda g: [
    Case(x, _gain(g, x.shape[-1]), 0.5 * torch.randn(x.shape[-1], generator=g), 1e-5, label=label)
    for x, label in _norm_inputs(g)] + [
    Case(torch.randn(2, 8, generator=g), _gain(g, 8), None, 1e-5, label="bias=None (Llama-style: no bias)")])
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """(..., C) -> (..., C): each token to zero mean and unit variance over its C channels, then * weight + bias."""
    mu = x.mean(-1, keepdim=True)                                 # (..., 1) per-token mean
    var = x.var(-1, keepdim=True, unbiased=False)                 # (..., 1) divided by C, not C - 1 (as torch)
    y = (x - mu) / torch.sqrt(var + eps) * weight                 # eps inside the sqrt: finite for a constant token
    return y if bias is None else y + bias


@layer_norm.mistake("the variance is divided by C - 1 (x.var's default, unbiased=True): LayerNorm uses the "
                    "plain mean of squares, x.var(-1, unbiased=False) — 15% off with 4 channels")
def _(x, weight, bias, eps):
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps) * weight
    return y if bias is None else y + bias


@layer_norm.mistake("eps is outside the square root: divide by sqrt(var + eps), not sqrt(var) + eps; the two "
                    "differ wherever the variance is as small as eps")
def _(x, weight, bias, eps):
    y = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, unbiased=False).sqrt() + eps) * weight
    return y if bias is None else y + bias


@layer_norm.mistake("the token is not centred: subtract the mean before dividing (without it this is RMSNorm, "
                    "and the variance is then the wrong scale too)")
def _(x, weight, bias, eps):
    y = x / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * weight
    return y if bias is None else y + bias


@layer_norm.mistake("normalised over the wrong axis: the statistics are per token, over its C channels "
                    "(dim=-1), not over the tokens of a batch")
def _(x, weight, bias, eps):
    mu, var = x.mean(0, keepdim=True), x.var(0, keepdim=True, unbiased=False)
    y = (x - mu) / torch.sqrt(var + eps) * weight
    return y if bias is None else y + bias


# --- 04.rms_norm ----------------------------------------------------------------------------------

@exercise("04.rms_norm", "RMSNorm by hand", cases=lambda g: [
    Case(x, _gain(g, x.shape[-1]), 1e-5, label=label) for x, label in _norm_inputs(g)])
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., C) -> (..., C): each token divided by its root-mean-square over C channels, then * weight."""
    ms = x.pow(2).mean(-1, keepdim=True)                          # (..., 1) mean of squares: no centring
    return x * torch.rsqrt(ms + eps) * weight                     # eps inside the root, as torch.nn.RMSNorm


@rms_norm.mistake("the mean was subtracted: RMSNorm does not centre the token (that is LayerNorm); divide x "
                  "itself by sqrt(mean(x²) + eps)")
def _(x, weight, eps):
    c = x - x.mean(-1, keepdim=True)
    return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps) * weight


@rms_norm.mistake("eps is outside the square root: x / sqrt(mean(x²) + eps), not x / (sqrt(mean(x²)) + eps)")
def _(x, weight, eps):
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight


@rms_norm.mistake("summed the squares instead of averaging them: the root-MEAN-square divides by C "
                  "(x.pow(2).mean(-1)), else every output is sqrt(C) times too small")
def _(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * weight


@rms_norm.mistake("the gain `weight` is missing: multiply the normalised token by it, channel by channel")
def _(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# --- 04.prenorm_block -----------------------------------------------------------------------------
# Stand-ins for the sublayers, distinct enough that every wiring mistake changes the output.

_G = torch.Generator().manual_seed(4)
_A = torch.randn(8, 8, generator=_G) / 8 ** 0.5                  # (C, C) the stand-in attention's projection
_M1, _M2 = torch.randn(8, 16, generator=_G) / 8 ** 0.5, torch.randn(16, 8, generator=_G) / 4
_GAIN_1, _GAIN_2 = 1 + 0.5 * torch.rand(8, generator=_G), 0.5 + 0.5 * torch.rand(8, generator=_G)


def toy_attn(h):
    """(B, T, C): each token averages itself and the tokens before it (causal), then a projection."""
    T = h.shape[1]
    return (h.cumsum(1) / torch.arange(1, T + 1)[:, None]) @ _A


def toy_mlp(h):
    """(B, T, C): per token, a small tanh network."""
    return torch.tanh(h @ _M1) @ _M2


def toy_norm_1(h):
    return F.layer_norm(h, (h.shape[-1],), _GAIN_1)


def toy_norm_2(h):
    return F.layer_norm(h, (h.shape[-1],), _GAIN_2)


def _block_cases(g):
    sub = (toy_attn, toy_mlp, toy_norm_1, toy_norm_2)
    return [
        Case(torch.randn(2, 5, 8, generator=g), *sub, label="(B, T, C) = (2, 5, 8), stand-in sublayers"),
        Case(30 * torch.randn(1, 4, 8, generator=g), *sub, label="a large stream (std 30): pre-norm adds the same "
                                                               "size of update, post-norm rescales it to ~1"),
        Case(torch.randn(1, 1, 8, generator=g), *sub, label="one token (T = 1)"),
        Case(torch.randn(3, 6, 8, generator=g) + 2, *sub, label="a stream with mean 2"),
    ]


@exercise("04.prenorm_block", "the pre-norm block's wiring", cases=_block_cases)
def prenorm_block(x, attn, mlp, norm_1, norm_2):
    """x (B, T, C) -> (B, T, C). Each sublayer reads a normalised copy of the stream and ADDS its output."""
    x = x + attn(norm_1(x))                                       # tokens read earlier tokens
    x = x + mlp(norm_2(x))                                        # each token on its own; reads the updated x
    return x


@prenorm_block.mistake("this is the POST-norm block (x = norm(x + sublayer(x))): in the pre-norm block each "
                       "sublayer reads norm(x) and the sum is never normalised: x = x + attn(norm_1(x))")
def _(x, attn, mlp, norm_1, norm_2):
    x = norm_1(x + attn(x))
    return norm_2(x + mlp(x))


@prenorm_block.mistake("the stream itself was normalised (x = norm_1(x), then x + attn(x)): the norm must act "
                       "on a copy that the sublayer reads, so the residual stream keeps its size")
def _(x, attn, mlp, norm_1, norm_2):
    x = norm_1(x)
    x = x + attn(x)
    x = norm_2(x)
    return x + mlp(x)


@prenorm_block.mistake("both sublayers read the block's INPUT (a 'parallel' block, as in GPT-J): the MLP must "
                       "read the stream after attention has added to it, x + mlp(norm_2(x)) with the updated x")
def _(x, attn, mlp, norm_1, norm_2):
    return x + attn(norm_1(x)) + mlp(norm_2(x))


@prenorm_block.mistake("the MLP's output replaces the stream: add it (x = x + mlp(norm_2(x))), or everything "
                       "attention and the blocks before wrote is lost")
def _(x, attn, mlp, norm_1, norm_2):
    x = x + attn(norm_1(x))
    return mlp(norm_2(x))


@prenorm_block.mistake("the same norm is used twice: attention reads norm_1(x), the MLP reads norm_2(x) — each "
                       "has its own gain")
def _(x, attn, mlp, norm_1, norm_2):
    x = x + attn(norm_1(x))
    return x + mlp(norm_1(x))
