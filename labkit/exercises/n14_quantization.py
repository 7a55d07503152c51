"""Exercises of 14_quantization: absmax int8 per row (LLM.int8()'s, = bitsandbytes), group-wise
int4 (one scale per group of weights along a row) and a llama.cpp Q4_1 block, byte for byte."""
import torch

from . import Case, exercise


def _weights(out, n_in, seed, spread=True):
    """(out, n_in) weights; with ``spread`` each row has its own scale (1e-3 .. 1), as real rows do."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g)
    if spread:
        w = w * torch.logspace(-3, 0, out)[:, None]
    return w


def _one_outlier():
    w = _weights(3, 16, 1, spread=False) * 0.02
    w[1, 5] = 1.5                                         # one large weight: only its own row's scale grows
    return w


def _zero_row():
    w = _weights(3, 8, 2, spread=False)
    w[1] = 0                                              # a pruned output channel: no scale to divide by
    return w


# --- 14.absmax_int8 -------------------------------------------------------------------------------

@exercise("14.absmax_int8", "absmax int8, one scale per output channel", cases=[
    Case(_weights(4, 8, 0), label="4 rows whose scales differ 1000x"),
    Case(_one_outlier(), label="one outlier weight in row 1: rows 0 and 2 keep their resolution"),
    Case(torch.tensor([[0.5, -1.0, 0.25, 1 / 254]]), label="one row: -1.0 -> -127, 1/254 is exactly half a step"),
    Case(_zero_row(), label="a row of zeros: codes 0, absmax 0, no NaN"),
], output_names=("codes", "absmax"))
def absmax_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) fp32 -> (codes (out, in) int8 in -127..127, absmax (out,) fp32), one scale per
    row as ``bitsandbytes.functional.int8_vectorwise_quant`` computes it: codes = round(w * 127 /
    absmax). Each row's largest |w| becomes ±127; w is recovered as codes * absmax / 127."""
    absmax = w.abs().amax(dim=1)                                           # (out,) one per output channel
    inv = 127.0 / absmax.clamp(min=1e-30)                                  # a zero row: codes 0, not NaN
    codes = torch.round(w * inv[:, None]).to(torch.int8)                   # (out, in); |codes| <= 127 by construction
    return codes, absmax


@absmax_int8.mistake("one absmax for the whole tensor: the row with the largest weight sets every row's step, so "
                     "the small rows get only a few codes. Take the max over each row: w.abs().amax(dim=1)")
def _(w):
    absmax = w.abs().max().expand(w.shape[0])
    return torch.round(w * (127.0 / absmax.clamp(min=1e-30))[:, None]).to(torch.int8), absmax.clone()


@absmax_int8.mistake("the max was taken over the columns (dim=0): a scale per *input* feature, not per output "
                     "channel (row). Use w.abs().amax(dim=1), one scale per row")
def _(w):
    absmax = w.abs().amax(dim=0)                                           # (in,)
    return torch.round(w * (127.0 / absmax.clamp(min=1e-30))[None, :]).to(torch.int8), absmax


@absmax_int8.mistake("the codes were truncated (.to(torch.int8) cuts towards zero), so every weight can be off by "
                     "almost a full step instead of half a step. Round first: torch.round(...).to(torch.int8)")
def _(w):
    absmax = w.abs().amax(dim=1)
    return (w * (127.0 / absmax.clamp(min=1e-30))[:, None]).to(torch.int8), absmax


@absmax_int8.mistake("the largest |w| was mapped to 128: int8 stops at 127, so +128 wraps around to -128 and the "
                     "largest weight flips sign. Map absmax to 127")
def _(w):
    absmax = w.abs().amax(dim=1)
    return torch.round(w * (128.0 / absmax.clamp(min=1e-30))[:, None]).to(torch.int8), absmax


# --- 14.group_int4 --------------------------------------------------------------------------------

@exercise("14.group_int4", "group-wise absmax int4", cases=[
    Case(_weights(2, 8, 3), 4, label="2 rows of 8, groups of 4"),
    Case(_one_outlier(), 4, label="an outlier: only its own group of 4 loses resolution"),
    Case(_weights(3, 6, 4), 6, label="one group per row (group_size = the row): per-channel int4"),
    Case(torch.tensor([[0.7, -0.1, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0]]), 4, label="a group of zeros: scale 0, codes 0"),
], output_names=("codes", "scale"))
def group_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) fp32, ``in`` a multiple of ``group_size`` -> (codes (out, in/g, g) int8 in -7..7,
    scale (out, in/g, 1) fp32). Each group of ``group_size`` consecutive weights of a row shares
    one scale = its max |w| / 7; w is recovered as codes * scale, group by group."""
    out, n_in = w.shape
    groups = w.reshape(out, n_in // group_size, group_size)                # (out, n_groups, g): consecutive inputs
    scale = groups.abs().amax(dim=-1, keepdim=True) / 7                     # (out, n_groups, 1): 4 bits, -7..7
    codes = torch.round(groups / scale.clamp(min=1e-30)).clamp(-7, 7).to(torch.int8)
    return codes, scale


@group_int4.mistake("the scale was max|w| / 8: 4 bits hold -8..7, but +8 does not exist, so the largest positive "
                    "weight clips to 7. Symmetric absmax uses -7..7: scale = max|w| / 7")
def _(w, group_size):
    out, n_in = w.shape
    groups = w.reshape(out, n_in // group_size, group_size)
    scale = groups.abs().amax(dim=-1, keepdim=True) / 8
    codes = torch.round(groups / scale.clamp(min=1e-30)).clamp(-8, 7).to(torch.int8)
    return codes, scale


@group_int4.mistake("one scale per row (group_size ignored): that is per-channel int4, where one large weight "
                    "costs its whole row. Reshape to (out, in // g, g) and take the max over the last dim")
def _(w, group_size):
    out, n_in = w.shape
    scale = w.abs().amax(dim=-1, keepdim=True) / 7                          # (out, 1)
    codes = torch.round(w / scale.clamp(min=1e-30)).clamp(-7, 7).to(torch.int8)
    n_groups = n_in // group_size
    return codes.reshape(out, n_groups, group_size), scale[:, None].expand(out, n_groups, 1).clone()


# --- 14.q4_1_block --------------------------------------------------------------------------------

def _ramp():
    return torch.linspace(1.0, 2.55, 32)[None]                             # all positive: the min matters


@exercise("14.q4_1_block", "a llama.cpp Q4_1 block, byte for byte", cases=[
    Case(_weights(3, 32, 5, spread=False) * 0.05, label="3 blocks of 32 random weights"),
    Case(_ramp(), label="one all-positive block 1.0 .. 2.55: codes 0..15 start at the min"),
    Case(torch.arange(32.0)[None] - 8, label="32 distinct values -8..23: every nibble position visible"),
    Case(torch.full((1, 32), 0.25), label="a constant block: d = 0, every code 0, w = m"),
])
def q4_1_block(w: torch.Tensor) -> torch.Tensor:
    """w (n, 32) fp32, one llama.cpp block per row -> (n, 20) uint8, the bytes a GGUF file holds:
    fp16 d = (max - min) / 15, fp16 m = min (2 bytes each, little-endian: ``x.half().view(torch.uint8)``),
    then 16 bytes of 4-bit codes q = trunc((w - min) * (1/d) + 0.5), byte j = q[j] | q[j + 16] << 4.
    w is recovered as d * q + m. (ggml multiplies by 1/d rather than dividing: bit-exactness.)"""
    lo = w.amin(dim=-1, keepdim=True)                                      # (n, 1) the block's min
    d = (w.amax(dim=-1, keepdim=True) - lo) / 15                           # 16 codes = 15 steps
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.trunc((w - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)     # (n, 32) codes 0..15
    packed = q[:, :16] | q[:, 16:] << 4                                    # (n, 16): low nibble j, high nibble j + 16
    as_bytes = lambda x: x.to(torch.float16).view(torch.uint8)             # (n, 1) fp32 -> (n, 2) bytes
    return torch.cat([as_bytes(d), as_bytes(lo), packed], dim=-1)          # (n, 20)


@q4_1_block.mistake("d = (max - min) / 16: sixteen codes 0..15 span fifteen steps, so the max lands on code 15 "
                    "only with d = (max - min) / 15")
def _(w):
    lo = w.amin(dim=-1, keepdim=True)
    d = (w.amax(dim=-1, keepdim=True) - lo) / 16
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.trunc((w - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([d.half().view(torch.uint8), lo.half().view(torch.uint8), q[:, :16] | q[:, 16:] << 4], dim=-1)


@q4_1_block.mistake("neighbouring codes were packed together (q[0::2] | q[1::2] << 4): llama.cpp's layout puts "
                    "code j in the low nibble and code j + 16 in the high nibble of byte j")
def _(w):
    lo = w.amin(dim=-1, keepdim=True)
    d = (w.amax(dim=-1, keepdim=True) - lo) / 15
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.trunc((w - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([d.half().view(torch.uint8), lo.half().view(torch.uint8), q[:, 0::2] | q[:, 1::2] << 4], dim=-1)


@q4_1_block.mistake("the nibbles are swapped: code j goes to the LOW nibble (q[j] | q[j + 16] << 4), "
                    "code j + 16 to the high one")
def _(w):
    lo = w.amin(dim=-1, keepdim=True)
    d = (w.amax(dim=-1, keepdim=True) - lo) / 15
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.trunc((w - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([d.half().view(torch.uint8), lo.half().view(torch.uint8), q[:, :16] << 4 | q[:, 16:]], dim=-1)


@q4_1_block.mistake("the codes were not shifted by the min (q = round(w / d)): Q4_1 stores w ~ d * q + m, so "
                    "subtract the block's min before dividing by d, and store m after d")
def _(w):
    lo = w.amin(dim=-1, keepdim=True)
    d = (w.amax(dim=-1, keepdim=True) - lo) / 15
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.trunc(w * inv + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([d.half().view(torch.uint8), lo.half().view(torch.uint8), q[:, :16] | q[:, 16:] << 4], dim=-1)
