"""Exercises of A1_qlora_basics: NF4 dequantization (the 4-bit base of QLoRA) and the LoRA forward."""
import torch

from ..quant import NF4_LEVELS
from . import Case, exercise

# --- A1.nf4_dequantize ----------------------------------------------------------------------------


def _pack(codes: list[int]) -> torch.Tensor:
    """4-bit codes -> bytes, two per byte, the first code in the HIGH nibble (bitsandbytes' layout)."""
    c = torch.tensor(codes, dtype=torch.uint8)
    return c[0::2] << 4 | c[1::2]


def _nf4_cases(g):
    random_codes = lambda n: torch.randint(0, 16, (n,), generator=g).tolist()
    return [
        Case(_pack([15, 0, 7, 12]), torch.tensor([1.0]), (4,), NF4_LEVELS, 4,
             label="one block of 4, absmax 1: codes 15, 0, 7, 12 are the levels +1, -1, 0 and 0.5626"),
        Case(_pack([15, 1, 2, 3, 15, 1, 2, 3]), torch.tensor([2.0, 0.5]), (2, 4), NF4_LEVELS, 4,
             label="two blocks with the same codes but absmax 2.0 and 0.5: each block has its own scale"),
        Case(_pack(random_codes(128)), torch.rand(2, generator=g) + 0.1, (4, 32), NF4_LEVELS, 64,
             label="a (4, 32) weight in blocks of 64: a block spans two rows (blocks cut the FLATTENED weight)"),
        Case(_pack(random_codes(192)), torch.tensor([0.03, 0.05, 0.02]), (2, 96), NF4_LEVELS, 64,
             label="a (2, 96) weight in blocks of 64: block 1 straddles the two rows"),
        Case(_pack(random_codes(64)), torch.tensor([0.03]), (8, 8), NF4_LEVELS, 64,
             label="one block of 64 with a realistic absmax 0.03"),
    ]


@exercise("A1.nf4_dequantize", "NF4 dequantization: unpack, look up, scale", cases=_nf4_cases, atol=1e-6)
def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape, levels: torch.Tensor,
                   block_size: int = 64) -> torch.Tensor:
    """The float32 weight of ``shape`` stored as NF4 codes.

    packed: (numel / 2,) uint8, two 4-bit codes per byte, the FIRST code in the HIGH nibble.
    absmax: (numel / block_size,) the scale of each block of ``block_size`` consecutive weights
    of the flattened weight. levels: (16,) the NF4 table. weight = levels[code] * absmax[block].
    """
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1).long()   # (numel,): high nibble first
    w = levels[codes].reshape(-1, block_size) * absmax[:, None]                     # (n_blocks, block): one scale per block
    return w.reshape(shape)


@nf4_dequantize.mistake("the nibbles are swapped: bitsandbytes puts the FIRST code of each byte in the HIGH "
                        "nibble (packed >> 4), the second in the low one (packed & 0xF); llama.cpp does the opposite")
def _(packed, absmax, shape, levels, block_size=64):
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(-1).long()
    return (levels[codes].reshape(-1, block_size) * absmax[:, None]).reshape(shape)


@nf4_dequantize.mistake("the codes were used as evenly spaced levels (code / 7.5 - 1): NF4's 16 levels are NOT "
                        "evenly spaced, they sit at quantiles of a normal distribution. Look each code up in "
                        "the table: levels[code]")
def _(packed, absmax, shape, levels, block_size=64):
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1).float()
    return ((codes / 7.5 - 1).reshape(-1, block_size) * absmax[:, None]).reshape(shape)


@nf4_dequantize.mistake("the block scales are missing: levels[code] lies in [-1, 1]; multiply each block of "
                        "block_size weights by its absmax")
def _(packed, absmax, shape, levels, block_size=64):
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1).long()
    return levels[codes].reshape(shape)


@nf4_dequantize.mistake("the scales were applied per ROW of the weight (reshape(shape) * absmax[:, None]): a block is "
                        "block_size consecutive weights of the FLATTENED weight and need not line up with rows. "
                        "Reshape the looked-up levels to (-1, block_size), scale, then reshape to the weight's shape")
def _(packed, absmax, shape, levels, block_size=64):
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1).long()
    return levels[codes].reshape(shape) * absmax[:, None]


# --- A1.lora_forward ------------------------------------------------------------------------------


def _lora_cases(g):
    rand = lambda *s: torch.randn(*s, generator=g)
    return [
        Case(rand(3, 6), rand(5, 6), rand(2, 6), rand(5, 2), 4.0, label="r=2, alpha=4: x (3, 6), W (5, 6)"),
        Case(rand(2, 4, 8), rand(8, 8), rand(4, 8), rand(8, 4), 8.0,
             label="batch and sequence axes: x (2, 4, 8), r=4, alpha=8"),
        Case(rand(3, 6), rand(5, 6), rand(1, 6), rand(5, 1), 16.0, label="r=1: a rank-one update"),
        Case(rand(3, 6), rand(5, 6), rand(3, 6), torch.zeros(5, 3), 6.0,
             label="B = 0 (LoRA's init): the output must equal the frozen layer's"),
        Case(rand(2, 6), rand(4, 6), rand(4, 6), rand(4, 4), 2.0, label="r=4, alpha=2: scaling alpha/r = 0.5"),
    ]


@exercise("A1.lora_forward", "the LoRA forward on a frozen layer", cases=_lora_cases)
def lora_forward(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    """x (..., in) through the frozen W (out, in) plus the low-rank update: A (r, in), B (out, r).

    y = x W^T + (alpha / r) * (x A^T) B^T: never form the (out, in) matrix B A, two thin matmuls do it.
    """
    r = A.shape[0]
    base = x @ W.T                          # (..., out): the frozen layer
    update = (x @ A.T) @ B.T                # (..., r) -> (..., out): down to r numbers per token, back up
    return base + (alpha / r) * update


@lora_forward.mistake("the update is not scaled: LoRA multiplies (x A^T) B^T by alpha / r, so that changing r "
                      "does not change how large the update starts")
def _(x, W, A, B, alpha):
    return x @ W.T + (x @ A.T) @ B.T


@lora_forward.mistake("scaled by alpha instead of alpha / r: divide by the rank r = A.shape[0]")
def _(x, W, A, B, alpha):
    return x @ W.T + alpha * (x @ A.T) @ B.T


@lora_forward.mistake("scaled by alpha / sqrt(r): that is rsLoRA (use_rslora=True in peft); LoRA's and peft's "
                      "default is alpha / r")
def _(x, W, A, B, alpha):
    return x @ W.T + alpha / A.shape[0] ** 0.5 * (x @ A.T) @ B.T


@lora_forward.mistake("the scaling is upside down (r / alpha): the update is multiplied by alpha / r")
def _(x, W, A, B, alpha):
    return x @ W.T + A.shape[0] / alpha * (x @ A.T) @ B.T
