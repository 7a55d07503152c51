"""Exercises of 02_positional_encodings: the sinusoidal table, RoPE's rotation, ALiBi's bias."""
import torch

from . import Case, exercise

# --- 02.sinusoidal --------------------------------------------------------------------------------


@exercise("02.sinusoidal", "the sinusoidal position table", cases=[
    Case(4, 2, label="T=4 and d=2: one frequency (1 radian per token)"),
    Case(8, 6, label="T=8 and d=6: three frequencies"),
    Case(1, 4, label="T=1: position 0 is [0, 1, 0, 1, ...]"),
    Case(16, 8, 100.0, label="base 100 instead of 10,000")], atol=1e-5)
def sinusoidal(T: int, d: int, base: float = 10000.0) -> torch.Tensor:
    """(T, d): row p = [sin(p w_0), cos(p w_0), sin(p w_1), cos(p w_1), ...], w_i = base^(-2i/d)."""
    p = torch.arange(T, dtype=torch.float32)[:, None]                  # (T, 1)
    w = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)      # (d/2,) radians per token
    return torch.stack([torch.sin(p * w), torch.cos(p * w)], dim=-1).reshape(T, d)   # interleave


@sinusoidal.mistake("the sines and cosines are in two halves [sin ... sin, cos ... cos] instead of interleaved "
                    "[sin, cos, sin, cos, ...]: stack them on a last axis and reshape, do not cat")
def _(T, d, base=10000.0):
    p = torch.arange(T, dtype=torch.float32)[:, None]
    w = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    return torch.cat([torch.sin(p * w), torch.cos(p * w)], dim=-1)


@sinusoidal.mistake("the frequencies grow instead of shrink: w_i = base^(-2i/d) (a minus sign), so the first "
                    "pair turns fastest (1 radian per token) and the last barely moves")
def _(T, d, base=10000.0):
    p = torch.arange(T, dtype=torch.float32)[:, None]
    w = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    return torch.stack([torch.sin(p * w), torch.cos(p * w)], dim=-1).reshape(T, d)


@sinusoidal.mistake("the exponent uses i/d instead of 2i/d: with d/2 frequencies the slowest must reach "
                    "base^(-(d-2)/d), close to 1/base; arange(0, d, 2) / d gives exactly 2i/d")
def _(T, d, base=10000.0):
    p = torch.arange(T, dtype=torch.float32)[:, None]
    w = base ** (-torch.arange(d // 2, dtype=torch.float32) / d)
    return torch.stack([torch.sin(p * w), torch.cos(p * w)], dim=-1).reshape(T, d)


# --- 02.rope --------------------------------------------------------------------------------------

def _rope_cases(g):
    return [Case(torch.randn(3, 4, generator=g), label="T=3 positions of head size 4"),
            Case(torch.randn(2, 2, 5, 8, generator=g), label="(B=2, nh=2, T=5, hd=8)"),
            Case(torch.randn(6, 2, generator=g), 100.0, label="head size 2 (one pair) and base 100"),
            Case(torch.ones(1, 4), label="T=1: position 0 is not rotated at all")]


@exercise("02.rope", "RoPE's rotation (Llama's layout)", cases=_rope_cases, atol=1e-5)
def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """x (..., T, hd): rotate the pair (x_i, x_{i+hd/2}) at position p by the angle p * base^(-2i/hd)."""
    T, hd = x.shape[-2:]
    theta = base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)     # (hd/2,)
    angle = torch.arange(T, dtype=torch.float32)[:, None] * theta            # (T, hd/2)
    cos, sin = angle.cos(), angle.sin()
    a, b = x[..., : hd // 2], x[..., hd // 2:]                               # the two halves
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)         # (a + ib) e^{i angle}


@rope.mistake("the pairs are adjacent dimensions (x_0, x_1), (x_2, x_3) ...: that is the original paper's "
              "layout (and GPT-J's); Llama, HF and labkit pair dimension i with i + hd/2 (the two halves)")
def _(x, base=10000.0):
    T, hd = x.shape[-2:]
    theta = base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angle = torch.arange(T, dtype=torch.float32)[:, None] * theta
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.stack([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], dim=-1)
    return out.reshape(x.shape)


@rope.mistake("the rotation goes the wrong way (the sign of sin is flipped): multiplying a + ib by e^{iφ} gives "
              "(a cos φ - b sin φ) + i (a sin φ + b cos φ)")
def _(x, base=10000.0):
    T, hd = x.shape[-2:]
    theta = base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angle = torch.arange(T, dtype=torch.float32)[:, None] * theta
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([a * angle.cos() + b * angle.sin(), -a * angle.sin() + b * angle.cos()], dim=-1)


@rope.mistake("positions start at 1: the first token (position 0) must not be rotated; use arange(T)")
def _(x, base=10000.0):
    T, hd = x.shape[-2:]
    theta = base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angle = torch.arange(1, T + 1, dtype=torch.float32)[:, None] * theta
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], dim=-1)


# --- 02.alibi_bias --------------------------------------------------------------------------------

@exercise("02.alibi_bias", "ALiBi's distance penalty", cases=[
    Case(4, 2, label="T=4 and 2 heads: slopes 1/16 and 1/256"),
    Case(3, 8, label="8 heads: slopes 1/2, 1/4, ..., 1/256 (the paper's)"),
    Case(1, 4, label="T=1: nothing to penalise"),
    Case(6, 1, label="one head: slope 2^-8")])
def alibi_bias(T: int, n_head: int) -> torch.Tensor:
    """(n_head, T, T): -slope_h * (i - j) for keys j <= i (0 above the diagonal: the causal mask removes
    those), with slope_h = 2^(-8 (h + 1) / n_head)."""
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / n_head) for h in range(n_head)])     # (nh,)
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp(min=0)           # (T, T) i - j
    return -slopes[:, None, None] * dist


@alibi_bias.mistake("the bias is a bonus, not a penalty: far keys must score LOWER, so subtract slope * distance")
def _(T, n_head):
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / n_head) for h in range(n_head)])
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp(min=0)
    return slopes[:, None, None] * dist


@alibi_bias.mistake("the slopes start at h = 0 (slope 1 for the first head): the sequence is 2^(-8/n), "
                    "2^(-16/n), ..., 2^-8, so use h + 1")
def _(T, n_head):
    slopes = torch.tensor([2.0 ** (-8 * h / n_head) for h in range(n_head)])
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp(min=0)
    return -slopes[:, None, None] * dist


@alibi_bias.mistake("the distance is j - i (transposed): query i sits in row i and key j in column j; the "
                    "penalty grows with how far BACK the key is, i - j")
def _(T, n_head):
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / n_head) for h in range(n_head)])
    dist = (torch.arange(T)[None, :] - torch.arange(T)[:, None]).clamp(min=0)
    return -slopes[:, None, None] * dist
