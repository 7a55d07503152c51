"""Exercises of A3_lora_rank: the trainable-parameter count of LoRA, and the effective rank of an update."""
import torch

from . import Case, exercise

# --- A3.lora_parameters ---------------------------------------------------------------------------

SMOLLM2_QKVO = [(576, 576), (192, 576), (192, 576), (576, 576)]   # (out, in) of q, k, v, o: k and v are GQA-narrow


@exercise("A3.lora_parameters", "LoRA's trainable-parameter count", cases=[
    Case([(576, 576)], 8, label="one square 576 x 576 layer, r=8"),
    Case(SMOLLM2_QKVO, 1, label="SmolLM2's q, k, v, o of one layer (k and v are 192 x 576: GQA), r=1"),
    Case([(1536, 576), (576, 1536)], 64, label="rectangular MLP layers, r=64"),
    Case([], 16, label="no layer wrapped: nothing trains"),
    Case(SMOLLM2_QKVO * 30, 8, label="all 30 layers of SmolLM2, r=8"),
])
def lora_parameters(shapes: list[tuple[int, int]], r: int) -> int:
    """Trainable numbers of rank-r LoRA on Linear layers of weight shapes (out, in): A (r, in) + B (out, r) each."""
    return sum(r * (n_in + n_out) for n_out, n_in in shapes)


@lora_parameters.mistake("only A was counted (r x in): each wrapped layer trains A (r, in) AND B (out, r), "
                         "r * (in + out) numbers")
def _(shapes, r):
    return sum(r * n_in for n_out, n_in in shapes)


@lora_parameters.mistake("counted the full matrix (out x in): that is what full fine-tuning trains. LoRA trains "
                         "r * (in + out) per layer, far fewer when r is small")
def _(shapes, r):
    return sum(n_out * n_in for n_out, n_in in shapes)


@lora_parameters.mistake("assumed square layers (2 * r * in): k and v of a GQA model are narrower (192 x 576 in "
                         "SmolLM2), so use r * (in + out) with each layer's own out")
def _(shapes, r):
    return sum(2 * r * n_in for n_out, n_in in shapes)


# --- A3.effective_rank ----------------------------------------------------------------------------


@exercise("A3.effective_rank", "the effective rank: directions carrying most of the energy", cases=[
    Case(torch.tensor([1.0, 0.0, 0.0]), label="one nonzero singular value: rank 1"),
    Case(torch.tensor([1.0, 1.0, 1.0, 1.0]), label="four equal values: 3 carry only 75%, all 4 are needed"),
    Case(torch.tensor([1.0, 10.0]), label="not sorted: the largest (10: 100 of 101 energy) comes last"),
    Case(torch.tensor([3.0, 1.0]), label="energy 9/10 exactly reaches 0.9 with one value"),
    Case(torch.tensor([5.0, 2.0, 1.0, 0.5]), energy=0.5, label="energy=0.5"),
    Case(torch.zeros(4), label="a zero matrix: no direction at all"),
    Case(torch.tensor([10.0, 3.0, 3.0, 3.0, 1.0]), label="one dominant direction and a flat tail"),
])
def effective_rank(singular_values: torch.Tensor, energy: float = 0.9) -> int:
    """How many of the largest singular values carry ``energy`` of the total energy sum(s^2)."""
    s2 = singular_values.double().sort(descending=True).values ** 2     # energy per direction, largest first
    total = s2.sum()
    if total == 0:
        return 0
    carried = s2.cumsum(0) / total                                       # energy of the top 1, 2, ... directions
    return int((carried < energy).sum()) + 1                             # the first k whose share reaches energy


@effective_rank.mistake("used the singular values, not their squares: a direction's energy (its share of the "
                        "squared Frobenius norm) is s^2, so the large values count more than s says")
def _(singular_values, energy=0.9):
    s = singular_values.double().sort(descending=True).values
    if s.sum() == 0:
        return 0
    return int((s.cumsum(0) / s.sum() < energy).sum()) + 1


@effective_rank.mistake("the values were not sorted: take the LARGEST first (sort descending) — torch.linalg.svdvals "
                        "returns them sorted, but a list from elsewhere need not be")
def _(singular_values, energy=0.9):
    s2 = singular_values.double() ** 2
    if s2.sum() == 0:
        return 0
    return int((s2.cumsum(0) / s2.sum() < energy).sum()) + 1


@effective_rank.mistake("off by one: the number of directions whose cumulative share is still below the energy "
                        "is k - 1; k is the first count that reaches it (add 1)")
def _(singular_values, energy=0.9):
    s2 = singular_values.double().sort(descending=True).values ** 2
    if s2.sum() == 0:
        return 0
    return int((s2.cumsum(0) / s2.sum() < energy).sum())


@effective_rank.mistake("a share that exactly reaches the energy was not counted as enough (> instead of >=): "
                        "9 of 10 is 90%, so one direction carries 0.9 of the energy")
def _(singular_values, energy=0.9):
    s2 = singular_values.double().sort(descending=True).values ** 2
    if s2.sum() == 0:
        return 0
    return int((s2.cumsum(0) / s2.sum() <= energy).sum()) + 1
