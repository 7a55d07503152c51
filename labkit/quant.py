"""Weight quantization by hand: each weight stored in a few bits, plus a scale per group.

    w = model.model.layers[0].mlp.down_proj.weight.detach()       # (out, in) = (576, 1536), fp32
    q = absmax_quantize(w, bits=8, group_size="row")               # int8 codes, one fp16 scale per row
    w_hat = q.dequantize()                                         # (576, 1536): |w - w_hat| <= scale/2
    q = zeropoint_quantize(w, bits=4, group_size=32)               # codes 0..15, a scale and a zero per group
    packed, absmax = nf4_quantize(w)                               # = bitsandbytes quantize_4bit(nf4, blocksize=64)
    blob = q4_0_quantize(w)                                        # llama.cpp's bytes = gguf.quants.quantize(w, Q4_0)
    w_hat, bits = fake_quantize(w, "int4-g32")                     # any format by name: round trip, bits/weight
    with fake_quantized(model, "q4_0"): ...                        # every weight replaced by its round trip
    report = quantize_model(model, bits=4, group_size=32)          # nn.Linear -> Int4Linear: 4-bit storage

Conventions. A weight is (out, in), as ``nn.Linear`` stores it. A group is ``g`` consecutive
weights of one row, along the input dimension: the one a matmul sums over, so one scale
multiplies one partial sum, and each output channel keeps its own scales. llama.cpp (32-weight
blocks), GPTQ and AWQ group the same way; bitsandbytes blocks the flattened tensor, which is the
same thing when ``in`` is a multiple of the block. Our own formats store fp16 scales (as llama.cpp,
GPTQ and AWQ do) and quantize against the stored scale, so their error bound holds for what is
stored; their ``bits_per_weight`` counts codes, scales and zero points.

Three families, from the simplest:
  * absmax (symmetric):  q = round(w / s), s = max|w| / (2^(b-1) - 1)          0 is exact
  * zero-point:          q = round(w / s) + z, s = range / (2^b - 1)           all 2^b codes used
  * lookup tables:       NF4's 16 levels sit at the quantiles of a normal distribution, where
    weights are dense; llama.cpp's Q8_0 / Q4_0 / Q4_1 are absmax / signed-absmax / min-offset
    blocks of 32, each block a fixed run of bytes.
"""
from __future__ import annotations

import math
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- groups and scales

def _grouped(w: torch.Tensor, group_size) -> torch.Tensor:
    """(out, in) -> (rows, n_groups, g): the weights that share one scale, in the last dim.

    ``"tensor"``: one group; ``"row"``: one group per output channel; an int g: groups of g
    along each row. A row that is not a multiple of g ends with a shorter group, padded with
    zeros, which change neither an absmax nor a range that already contains 0.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    w = w.detach().float()
    if group_size == "tensor":
        return w.reshape(1, 1, -1)
    if group_size == "row":
        return w.unsqueeze(1)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be 'tensor', 'row' or a positive int, got {group_size!r}")
    out, n_in = w.shape
    n_groups = math.ceil(n_in / group_size)
    w = F.pad(w, (0, n_groups * group_size - n_in))
    return w.reshape(out, n_groups, group_size)


def _ungrouped(t: torch.Tensor, shape) -> torch.Tensor:
    """(rows, n_groups, g) -> (out, in), dropping the padding of a short last group."""
    return t.reshape(shape[0], -1)[:, :shape[1]]


def _fp16_scale(s: torch.Tensor) -> torch.Tensor:
    """The scale as it is stored: fp16, rounded *up*, never below fp16's smallest normal number.

    Rounding up keeps every w / s inside the code range, so nothing clips and |w - w_hat| <= s/2
    holds for the stored s. Below 2^-14 fp16 loses relative precision; only (near-)zero groups
    get there, and their error s/2 <= 3e-5 anyway.
    """
    s = s.clamp(min=2.0 ** -14)
    s16 = s.to(torch.float16)
    return torch.where(s16.float() < s, torch.nextafter(s16, torch.tensor(math.inf, dtype=torch.float16)), s16)


@dataclass
class Quantized:
    """Integer codes and what maps them back: w_hat = (q - zero) * scale, group by group.

    >>> w = torch.tensor([[0.6, -1.75, 0.3, 0.1]])
    >>> q = absmax_quantize(w, bits=4, group_size="row")             # s = 1.75 / 7 = 0.25
    >>> q.q.flatten().tolist(), q.scale.item()
    ([2, -7, 1, 0], 0.25)
    >>> q.dequantize()                                              # each within s/2 = 0.125 of w
    tensor([[ 0.5000, -1.7500,  0.2500,  0.0000]])
    """
    q: torch.Tensor                  # (rows, n_groups, g) integer codes (int8 or uint8)
    scale: torch.Tensor              # (rows, n_groups, 1) fp16
    zero: torch.Tensor | None        # (rows, n_groups, 1) integer zero points, None if symmetric
    bits: int
    shape: torch.Size                # the original (out, in)

    def dequantize(self) -> torch.Tensor:
        codes = self.q.float() - (0 if self.zero is None else self.zero.float())
        return _ungrouped(codes * self.scale.float(), self.shape)               # (out, in)

    def error_bound(self) -> torch.Tensor:
        """(out, in): half a step of each weight's grid, the most rounding can move it."""
        return _ungrouped((self.scale.float() / 2).expand_as(self.q), self.shape)

    @property
    def bits_per_weight(self) -> float:
        """Codes at ``bits`` each, fp16 scales, zero points at ``bits`` each."""
        n_groups = self.scale.numel()
        stored = self.shape.numel() * self.bits + n_groups * 16 + (0 if self.zero is None else n_groups * self.bits)
        return stored / self.shape.numel()


def absmax_quantize(w: torch.Tensor, bits: int = 8, group_size="tensor") -> Quantized:
    """Symmetric: the group's largest |w| maps to the largest code, 0 maps to 0.

    Codes are -(2^(b-1) - 1) .. 2^(b-1) - 1 (int8: -127..127; -128 is left out so that the
    grid is symmetric). One outlier stretches the scale of its whole group: that is why
    per-row and small groups beat per-tensor.

    >>> w = torch.tensor([[1.0, -0.3], [0.02, 0.005]])              # row 2 is 50x smaller
    >>> absmax_quantize(w, 8, "row").q.squeeze(1)
    tensor([[127, -38],
            [127,  32]], dtype=torch.int8)
    >>> absmax_quantize(w, 8, "tensor").q.reshape(2, 2)             # row 2 gets 3 codes of 255
    tensor([[127, -38],
            [  3,   1]], dtype=torch.int8)
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    g = _grouped(w, group_size)                                                 # (rows, n_groups, g)
    qmax = 2 ** (bits - 1) - 1
    scale = _fp16_scale(g.abs().amax(dim=-1, keepdim=True) / qmax)            # (rows, n_groups, 1)
    q = torch.round(g / scale.float()).clamp(-qmax, qmax).to(torch.int8)
    return Quantized(q, scale, None, bits, w.shape)


def zeropoint_quantize(w: torch.Tensor, bits: int = 8, group_size="tensor") -> Quantized:
    """Asymmetric: the range [min(w, 0), max(w, 0)] maps onto all codes 0 .. 2^b - 1.

    The zero point z is the code of 0.0 (so 0 stays exact). A lopsided group (all weights
    positive, say) gets twice the resolution absmax would give it.

    >>> q = zeropoint_quantize(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), bits=2, group_size="row")
    >>> q.q.flatten().tolist(), q.zero.item(), q.scale.item()
    ([0, 1, 2, 3], 0, 1.0)
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    g = _grouped(w, group_size)                                                 # (rows, n_groups, g)
    lo = g.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = g.amax(dim=-1, keepdim=True).clamp(min=0)
    qmax = 2 ** bits - 1
    scale = _fp16_scale((hi - lo) / qmax)                                       # (rows, n_groups, 1)
    zero = torch.round(-lo / scale.float()).clamp(0, qmax)
    q = (torch.round(g / scale.float()) + zero).clamp(0, qmax).to(torch.uint8)
    return Quantized(q, scale, zero.to(torch.uint8), bits, w.shape)


# ----------------------------------------------------------------------------- NF4 (QLoRA, bitsandbytes)

# bitsandbytes' NF4 table, fp32 as it ships (bitsandbytes/backends/utils.py): nf4_levels() derives it.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


def nf4_levels(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NormalFloat levels: quantiles of N(0, 1), scaled to [-1, 1] (QLoRA, appendix E).

    Weights are roughly normal, so levels at equal-probability quantiles put codes where the
    weights are. 8 levels for the positive half, 7 for the negative and an exact 0 (16 in all,
    asymmetric so that 0 is a level); ``offset`` is where the outermost quantile sits.

    >>> bool((nf4_levels() - NF4_LEVELS).abs().max() < 1e-6)
    True
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])   # 8
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()


def nf4_quantize(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """w -> (packed (numel/2,) uint8, absmax (numel/block_size,) fp32), as bitsandbytes' CPU
    ``quantize_4bit(w, blocksize=64, quant_type="nf4")`` computes them, bit for bit.

    Each block of the flattened tensor is divided by its absmax (into [-1, 1]) and each value
    takes the code of the nearest level. Two codes per byte, the first in the HIGH nibble
    (llama.cpp puts it in the low one).

    >>> packed, absmax = nf4_quantize(torch.tensor([1.0, -1.0, 0.0, 0.5]), block_size=4)
    >>> [f"{b:08b}" for b in packed.tolist()], absmax.tolist()      # codes 15, 0 | 7, 12
    (['11110000', '01111100'], [1.0])
    """
    flat = w.detach().float().reshape(-1)
    if flat.numel() % block_size or block_size % 2:
        raise ValueError(f"{flat.numel()} weights do not split into blocks of {block_size} (an even number)")
    blocks = flat.reshape(-1, block_size)                                       # (n_blocks, block)
    absmax = blocks.abs().amax(dim=-1)                                          # (n_blocks,)
    x = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)        # in [-1, 1]
    # The nearest level = how many midpoints lie below x (bucketize counts them; a value exactly
    # on a midpoint goes to the lower level, as in bitsandbytes).
    midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2                          # (15,)
    codes = torch.bucketize(x, midpoints).to(torch.uint8).reshape(-1)           # (numel,) 0..15
    return codes[0::2] << 4 | codes[1::2], absmax


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape, block_size: int = 64) -> torch.Tensor:
    """Inverse of ``nf4_quantize``: level[code] * absmax of the block, reshaped to ``shape``."""
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1).long()     # (numel,)
    w = NF4_LEVELS[codes].reshape(-1, block_size) * absmax[:, None]
    return w.reshape(shape)


# ----------------------------------------------------------------------------- llama.cpp blocks

QK = 32                                   # weights per llama.cpp block (QK8_0 = QK4_0 = QK4_1 = 32)
GGUF_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}   # fp16 scale (+ fp16 min) + codes


def _gguf_blocks(w: torch.Tensor) -> torch.Tensor:
    """(..., in) -> (n_blocks, 32) fp32: blocks never cross a row, so ``in`` must divide by 32."""
    if w.shape[-1] % QK:
        raise ValueError(f"rows of {w.shape[-1]} weights do not split into llama.cpp blocks of {QK}")
    return w.detach().float().reshape(-1, QK)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(n, 1) fp32 -> (n, 2) uint8: the fp16 value's little-endian bytes, as the file holds them."""
    return x.to(torch.float16).view(torch.uint8)


def _fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()                           # (n, 2) -> (n, 1)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (ggml uses it): halves go away from 0. torch.round sends them to even."""
    a = x.abs()
    return torch.sign(x) * torch.where(a - a.floor() >= 0.5, a.floor() + 1, a.floor())


def _pack_halves(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) codes 0..15 -> (n, 16) bytes: byte j = q[j] (low nibble) | q[j + 16] (high nibble)."""
    return q[:, :QK // 2] | q[:, QK // 2:] << 4


def _unpack_halves(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)                               # (n, 16) -> (n, 32)


def q8_0_quantize(w: torch.Tensor) -> torch.Tensor:
    """(rows, in) -> (rows, in/32 * 34) bytes: per block, an fp16 d = max|w| / 127 and 32 int8.

    8.5 bits per weight. Equal to ``gguf.quants.quantize(w, Q8_0)`` byte for byte. The fp16 d
    is where tiny blocks die: below max|w| ~ 127 * 2^-25 ~ 4e-6 it rounds to 0 (all of llama.cpp's
    formats share this).

    >>> blob = q8_0_quantize(torch.linspace(-1, 1, 32)[None])
    >>> blob.shape, blob[0, 2:].view(torch.int8)[[0, 1, -1]].tolist()   # -1 -> -127, 1 -> 127
    (torch.Size([1, 34]), [-127, -119, 127])
    """
    b = _gguf_blocks(w)                                                         # (n, 32)
    d = b.abs().amax(dim=-1, keepdim=True) / 127                                # (n, 1)
    inv = torch.where(d == 0, 0.0, 1.0 / d)          # multiply by 1/d, as ggml does: bit-exactness
    q = _round_half_away(b * inv).to(torch.int8)
    return torch.cat([_fp16_bytes(d), q.view(torch.uint8)], dim=-1).reshape(*w.shape[:-1], -1)


def q8_0_dequantize(blob: torch.Tensor) -> torch.Tensor:
    """(rows, nbytes) -> (rows, in) fp32: int8 code * fp16 d."""
    b = blob.reshape(-1, GGUF_BLOCK_BYTES["q8_0"])
    w = b[:, 2:].contiguous().view(torch.int8).float() * _fp16_from_bytes(b[:, :2])
    return w.reshape(*blob.shape[:-1], -1)


def q4_0_quantize(w: torch.Tensor) -> torch.Tensor:
    """(rows, in) -> (rows, in/32 * 18) bytes: an fp16 d and 32 codes 0..15, w ~ d * (code - 8).

    The signed-absmax trick: d = (the value of largest |w|) / -8, so that value lands exactly
    on code 0 (= -8 d) and all 16 codes are used (plain absmax uses 15). 4.5 bits per weight.

    >>> blob = q4_0_quantize(torch.linspace(-1, 0.5, 32)[None])      # -1 is the largest |w|
    >>> blob.shape, _fp16_from_bytes(blob[:, :2]).item()            # d = -1 / -8
    (torch.Size([1, 18]), 0.125)
    """
    b = _gguf_blocks(w)                                                         # (n, 32)
    idx = b.abs().argmax(dim=-1, keepdim=True)                                  # first largest |w|
    d = b.gather(-1, idx) / -8                                                  # (n, 1), signed
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.trunc(b * inv + 8.5).clamp(0, 15).to(torch.uint8)                 # round half up, shifted
    return torch.cat([_fp16_bytes(d), _pack_halves(q)], dim=-1).reshape(*w.shape[:-1], -1)


def q4_0_dequantize(blob: torch.Tensor) -> torch.Tensor:
    b = blob.reshape(-1, GGUF_BLOCK_BYTES["q4_0"])
    codes = _unpack_halves(b[:, 2:]).to(torch.int8) - 8                         # (n, 32) -8..7
    return (_fp16_from_bytes(b[:, :2]) * codes.float()).reshape(*blob.shape[:-1], -1)


def q4_1_quantize(w: torch.Tensor) -> torch.Tensor:
    """(rows, in) -> (rows, in/32 * 20) bytes: fp16 d = (max - min) / 15, fp16 m = min, 32 codes,
    w ~ d * code + m. The min is stored as a float offset (not an integer zero point), so
    the block's own range is used exactly. 5 bits per weight.

    >>> blob = q4_1_quantize(torch.linspace(1, 2.55, 32)[None])     # all positive: absmax would waste half
    >>> [_fp16_from_bytes(blob[:, i:i + 2]).item() for i in (0, 2)]  # d = 1.55 / 15, m = 1 (fp16)
    [0.10333251953125, 1.0]
    """
    b = _gguf_blocks(w)                                                         # (n, 32)
    lo = b.amin(dim=-1, keepdim=True)
    hi = b.amax(dim=-1, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.trunc((b - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(lo), _pack_halves(q)], dim=-1).reshape(*w.shape[:-1], -1)


def q4_1_dequantize(blob: torch.Tensor) -> torch.Tensor:
    b = blob.reshape(-1, GGUF_BLOCK_BYTES["q4_1"])
    codes = _unpack_halves(b[:, 4:]).float()                                    # (n, 32) 0..15
    w = _fp16_from_bytes(b[:, :2]) * codes + _fp16_from_bytes(b[:, 2:4])
    return w.reshape(*blob.shape[:-1], -1)


GGUF_QUANTIZERS = {"q8_0": (q8_0_quantize, q8_0_dequantize), "q4_0": (q4_0_quantize, q4_0_dequantize),
                   "q4_1": (q4_1_quantize, q4_1_dequantize)}


# ----------------------------------------------------------------------------- any format, by name

_OWN = re.compile(r"^int([2-8])(-zp)?-(tensor|row|g\d+)$")
_NF4 = re.compile(r"^nf4-g(\d+)$")
FORMAT_EXAMPLES = ("int8-tensor", "int8-row", "int4-g32", "int4-zp-g32", "int3-g32", "nf4-g64",
                   "q8_0", "q4_0", "q4_1")


def fake_quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, float]:
    """Round-trip ``w`` through a format: (dequantized w, bits stored per weight).

    Names: ``int{b}-{tensor|row|g<N>}`` absmax, ``int{b}-zp-...`` zero-point, ``nf4-g<N>``,
    ``q8_0``, ``q4_0``, ``q4_1``. "Fake" quantization keeps fp32 values on the low-bit grid:
    the quality of the format, without its storage (that is ``quantize_model``).

    >>> w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    >>> [(fmt, fake_quantize(w, fmt)[1]) for fmt in ("int8-row", "int4-g32", "nf4-g64", "q4_0")]
    [('int8-row', 8.125), ('int4-g32', 4.5), ('nf4-g64', 4.5), ('q4_0', 4.5)]
    """
    if fmt in GGUF_QUANTIZERS:
        quantize, dequantize = GGUF_QUANTIZERS[fmt]
        blob = quantize(w)
        return dequantize(blob).reshape(w.shape), blob.numel() * 8 / w.numel()
    if m := _NF4.match(fmt):
        block = int(m[1])
        packed, absmax = nf4_quantize(w, block)
        return nf4_dequantize(packed, absmax, w.shape, block), (packed.numel() * 8 + absmax.numel() * 32) / w.numel()
    if m := _OWN.match(fmt):
        bits, zp, gran = int(m[1]), bool(m[2]), m[3]
        group_size = int(gran[1:]) if gran.startswith("g") else gran
        q = (zeropoint_quantize if zp else absmax_quantize)(w, bits, group_size)
        return q.dequantize(), q.bits_per_weight
    raise ValueError(f"unknown format {fmt!r}: use e.g. {', '.join(FORMAT_EXAMPLES)}")


def _linears(model: nn.Module, exclude) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """Every nn.Linear of ``model`` by name, minus those named in ``exclude`` (or ending in
    '.' + an excluded name)."""
    chosen, skipped = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if any(name == e or name.endswith("." + e) for e in exclude):
                skipped.append(name)
            else:
                chosen.append((name, module))
    return chosen, skipped


@dataclass
class FakeQuantReport:
    fmt: str
    layers: list[str]
    n_weights: int
    bits_per_weight: float           # over the quantized layers, weighted by their sizes

    def __str__(self):
        return f"{self.fmt}: {len(self.layers)} linear layers, {self.n_weights:,} weights at {self.bits_per_weight:.3f} bits"


@contextmanager
def fake_quantized(model: nn.Module, fmt: str, exclude=("lm_head",)):
    """Inside the block, every nn.Linear weight of ``model`` (minus ``exclude``) is replaced by
    its round trip through ``fmt``; on exit the fp32 weights come back (a copy is kept).

        with fake_quantized(model, "q4_0") as report:
            loss = model(ids, labels=ids).loss

    lm_head is excluded by default: in SmolLM2 (and labkit's GPT) it *is* the embedding matrix.
    """
    chosen, _ = _linears(model, exclude)
    saved, bits = [], 0.0
    try:
        with torch.no_grad():
            for name, lin in chosen:
                w_hat, b = fake_quantize(lin.weight, fmt)
                saved.append(lin.weight.detach().clone())
                lin.weight.copy_(w_hat)
                bits += b * lin.weight.numel()
        n = sum(lin.weight.numel() for _, lin in chosen)
        yield FakeQuantReport(fmt, [name for name, _ in chosen], n, bits / max(n, 1))
    finally:
        with torch.no_grad():
            for (_, lin), w in zip(chosen, saved):
                lin.weight.copy_(w)


# ----------------------------------------------------------------------------- real low-bit layers

def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2n) codes 0..15 -> (..., n) bytes: even index in the low nibble, odd in the high one.

    >>> pack_int4(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist()   # 0x21, 0x0F
    [33, 15]
    >>> unpack_int4(pack_int4(torch.tensor([1, 2, 15, 0], dtype=torch.uint8))).tolist()
    [1, 2, 15, 0]
    """
    return codes[..., 0::2] | codes[..., 1::2] << 4


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)      # (..., n) -> (..., 2n)


def _buffer_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


_workspace = threading.local()


def _scratch(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused buffer for the de-quantized weight of the layer running now (one per thread,
    as large as the largest layer so far). Why: a fresh 1-4 MB fp32 tensor per call is often
    served by glibc as newly mapped pages, and faulting them in can cost more than the matmul
    (the same int8 stack of SmolLM2's shapes took 2.0 M page faults in one run, 0.3 M in
    another, and its speed followed). One reused buffer stays in cache: what is left is the
    int8 -> fp32 conversion."""
    n = math.prod(shape)
    key = (dtype, device)
    buffers = getattr(_workspace, "buffers", None) or {}
    _workspace.buffers = buffers
    if key not in buffers or buffers[key].numel() < n:
        buffers[key] = torch.empty(n, dtype=dtype, device=device)
    return buffers[key][:n].view(shape)


def _reuse_buffer(x: torch.Tensor) -> bool:
    """Autograd keeps the weight of F.linear for the backward pass: then it must not be reused."""
    return not (torch.is_grad_enabled() and x.requires_grad)


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and one fp16 scale per output channel (weight-only: the
    input and the output stay fp32). y = (x @ q.T) * scale + bias.

    ``kernel="dequant"``: convert the int8 codes to fp32 (into a reused buffer that stays in
    cache) and call F.linear, every forward: memory traffic is 1 byte per weight, plus the
    conversion. ``kernel="int8pack"``: torch's fused CPU kernel ``aten._weight_int8pack_mm``.
    Which one beats fp32 depends on the machine: measure it (notebooks 14 and 15).

    >>> layer = Int8Linear.from_linear(nn.Linear(64, 32))
    >>> layer.nbytes                                                # 64*32 int8 + 32 fp16 + 32 fp32 bias
    2240
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, kernel: str = "dequant"):
        super().__init__()
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "dequant") -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel)
        q = absmax_quantize(linear.weight, bits=8, group_size="row")
        layer.weight_int8.copy_(q.q.squeeze(1))                                 # (out, in)
        layer.scale.copy_(q.scale.flatten())                                    # (out,)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def dequantize_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale.float()[:, None]           # (out, in)

    @property
    def nbytes(self) -> int:
        return _buffer_bytes(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                        # (..., in) -> (..., out)
        scale = self.scale.to(x.dtype)
        if self.kernel == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(),
                                                    self.weight_int8, scale)
            y = y.reshape(*x.shape[:-1], self.out_features)
        elif self.kernel == "dequant":
            codes = self.weight_int8                                            # (out, in) int8
            w = _scratch(codes.shape, x.dtype, x.device).copy_(codes) if _reuse_buffer(x) else codes.to(x.dtype)
            # A per-row scale commutes with the matmul: scale the (.., out) result, not the weight.
            y = F.linear(x, w) * scale
        else:
            raise ValueError(f"kernel={self.kernel!r}: use 'dequant' or 'int8pack'")
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel, kernel={self.kernel}"


class Int4Linear(nn.Module):
    """nn.Linear with 4-bit weights: symmetric codes -7..7 stored as 1..15, two per byte, and
    one fp16 scale per group of ``group_size`` inputs. Forward = unpack, scale, F.linear.

    >>> layer = Int4Linear.from_linear(nn.Linear(64, 32, bias=False), group_size=32)
    >>> layer.nbytes, layer.nbytes * 8 / (64 * 32)                 # 32*64/2 codes + 32*2 fp16 scales
    (1152, 4.5)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32):
        super().__init__()
        if in_features % 2:
            raise ValueError(f"in_features={in_features} is odd: two 4-bit weights share a byte")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = math.ceil(in_features / group_size)
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "Int4Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        q = absmax_quantize(linear.weight, bits=4, group_size=group_size)      # codes -7..7
        codes = (q.q.reshape(linear.out_features, -1)[:, :linear.in_features] + 8).to(torch.uint8)
        layer.weight_packed.copy_(pack_int4(codes))                             # (out, in/2)
        layer.scale.copy_(q.scale.squeeze(-1))                                  # (out, n_groups)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def dequantize_weight(self, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """(out, in) fp32 weights; computed inside ``buffer`` when one is given (the forward pass
        reuses one), else in a new tensor."""
        codes = unpack_int4(self.weight_packed)                                 # (out, in) 1..15
        n_groups = self.scale.size(1)
        if n_groups * self.group_size > self.in_features:                      # a short last group:
            codes = F.pad(codes, (0, n_groups * self.group_size - self.in_features), value=8)   # code 8 = 0.0
        codes = codes.view(self.out_features, n_groups, self.group_size)       # (out, n_groups, g)
        w = codes.float() if buffer is None else buffer.view(codes.shape).copy_(codes)
        # In place: out-of-place arithmetic would allocate and stream a new tensor per step.
        w.sub_(8).mul_(self.scale.float()[..., None])
        return w.view(self.out_features, -1)[:, :self.in_features]             # (out, in)

    @property
    def nbytes(self) -> int:
        return _buffer_bytes(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                        # (..., in) -> (..., out)
        n = self.out_features * self.scale.size(1) * self.group_size
        buffer = _scratch((n,), torch.float32, x.device) if _reuse_buffer(x) else None
        return F.linear(x, self.dequantize_weight(buffer).to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 groups of {self.group_size}"


@dataclass
class QuantizeReport:
    replaced: list[str]
    skipped: list[str]
    bytes_before: int                # weights + biases of the replaced layers, as they were
    bytes_after: int                 # codes + scales + biases of their replacements, as stored
    n_weights: int = field(default=0)

    @property
    def bits_per_weight(self) -> float:
        return self.bytes_after * 8 / max(self.n_weights, 1)

    def __str__(self):
        return (f"{len(self.replaced)} linear layers quantized ({', '.join(self.skipped) or 'none'} kept): "
                f"{self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB "
                f"({self.bits_per_weight:.2f} bits per weight)")


def quantize_model(model: nn.Module, bits: int = 8, group_size: int = 32, exclude=("lm_head",),
                   kernel: str = "dequant") -> QuantizeReport:
    """Swap every nn.Linear of ``model`` (minus ``exclude``) for an Int8Linear (``bits=8``,
    per-channel) or an Int4Linear (``bits=4``, groups of ``group_size``), in place.

    A layer whose weight is shared with an embedding (SmolLM2's tied lm_head) must be excluded:
    quantizing it would untie it and keep the fp32 embedding too, using more memory, not less.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: Int8Linear (8) and Int4Linear (4) exist; other widths are in "
                         f"fake_quantize")
    chosen, skipped = _linears(model, exclude)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    tied = [name for name, lin in chosen if id(lin.weight) in embeddings]
    if tied:
        raise ValueError(f"{tied} share their weight with an embedding: add them to exclude= "
                         f"(e.g. exclude=('lm_head',)) or untie them first")
    report = QuantizeReport([], skipped, 0, 0)
    for name, lin in chosen:
        new = Int8Linear.from_linear(lin, kernel) if bits == 8 else Int4Linear.from_linear(lin, group_size)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        report.replaced.append(name)
        report.bytes_before += sum(p.numel() * p.element_size() for p in lin.parameters())
        report.bytes_after += new.nbytes
        report.n_weights += lin.weight.numel()
    return report
