"""Exercises of 15_inference_stacks: the bytes a decode step reads, the roofline bound, and the block
tables of a paged KV cache."""
import math

import torch

from . import Case, exercise

# --- 15.weight_bytes ------------------------------------------------------------------------------


@exercise("15.weight_bytes", "the bytes of weights one decode step reads", cases=[
    Case(1000, 32, label="fp32, no scales: 4 bytes per weight"),
    Case(1000, 16, label="fp16 / bf16: 2 bytes per weight"),
    Case(576 * 1536, 8, 576, label="int8, one fp16 scale per row of 576 weights"),
    Case(576 * 1536, 4, 32, label="int4 in groups of 32, one fp16 scale per group"),
    Case(64, 4, 32, 4, label="int4, groups of 32, fp32 scales"),
    Case(96, 3, 32, label="3 bits: a weight is not a whole number of bytes"),
])
def weight_bytes(n_weights: int, bits: int, group_size: int | None = None, scale_bytes: int = 2) -> float:
    """Bytes to read ``n_weights`` weights stored with ``bits`` bits each and, when ``group_size`` is
    given, one scale of ``scale_bytes`` bytes per group of ``group_size`` weights."""
    codes = n_weights * bits / 8                           # bits -> bytes: 8 bits a byte, fractions allowed
    scales = 0 if group_size is None else math.ceil(n_weights / group_size) * scale_bytes   # one per group
    return codes + scales


@weight_bytes.mistake("bits are not bytes: n_weights * bits counts bits; divide by 8 to get bytes")
def _(n_weights, bits, group_size=None, scale_bytes=2):
    return n_weights * bits + (0 if group_size is None else math.ceil(n_weights / group_size) * scale_bytes)


@weight_bytes.mistake("forgot the scales: a grouped format also reads one scale per group of group_size weights "
                      "(int4 with groups of 32 and fp16 scales is 4.5 bits per weight, not 4)")
def _(n_weights, bits, group_size=None, scale_bytes=2):
    return n_weights * bits / 8


@weight_bytes.mistake("one scale per weight: a scale is shared by a whole group, so there are "
                      "n_weights / group_size of them, not n_weights")
def _(n_weights, bits, group_size=None, scale_bytes=2):
    return n_weights * bits / 8 + (0 if group_size is None else n_weights * scale_bytes)


# --- 15.roofline ----------------------------------------------------------------------------------


@exercise("15.roofline", "the roofline: attainable FLOP/s at an arithmetic intensity", cases=[
    Case(torch.tensor([0.5, 1.0, 4.0]), 100.0, 10.0, label="all below the ridge (10 FLOP/byte): memory-bound"),
    Case(torch.tensor([20.0, 100.0]), 100.0, 10.0, label="all above the ridge: compute-bound, flat at the peak"),
    Case(torch.tensor([0.25, 2.0, 8.0, 64.0, 512.0]), 150.0, 20.0, label="both sides of the ridge at 7.5 FLOP/byte"),
    Case(torch.tensor([10.0]), 100.0, 10.0, label="exactly at the ridge"),
])
def roofline(intensity: torch.Tensor, peak_gflops: float, bandwidth_gbs: float) -> torch.Tensor:
    """Attainable GFLOP/s for kernels doing ``intensity`` FLOPs per byte moved (a tensor), on a machine
    with ``peak_gflops`` of arithmetic and ``bandwidth_gbs`` of memory bandwidth."""
    memory_bound = bandwidth_gbs * intensity               # GB/s x FLOP/byte = GFLOP/s if the bytes are the limit
    return memory_bound.clamp(max=peak_gflops)             # ... and never more than the arithmetic can do


@roofline.mistake("took the larger of the two bounds: a kernel is held back by whichever limit it hits first, "
                  "so the attainable rate is the minimum of peak and bandwidth x intensity")
def _(intensity, peak_gflops, bandwidth_gbs):
    return (bandwidth_gbs * intensity).clamp(min=peak_gflops)


@roofline.mistake("divided the bandwidth by the intensity: FLOP/s = bytes/s x FLOPs per byte, a product "
                  "(more FLOPs per byte moved means more FLOP/s from the same bandwidth)")
def _(intensity, peak_gflops, bandwidth_gbs):
    return (bandwidth_gbs / intensity).clamp(max=peak_gflops)


@roofline.mistake("forgot the compute roof: bandwidth x intensity grows forever, but no kernel runs faster "
                  "than the peak arithmetic rate (clamp at peak_gflops)")
def _(intensity, peak_gflops, bandwidth_gbs):
    return bandwidth_gbs * intensity


# --- 15.page_tables -------------------------------------------------------------------------------


@exercise("15.page_tables", "the block tables of a paged KV cache", cases=[
    Case([("append", "a", 5)], 8, 4, label="5 tokens in blocks of 4: 2 blocks"),
    Case([("append", "a", 3), ("append", "a", 1), ("append", "a", 1)], 8, 4,
         label="grow one token at a time: a new block only when the last one is full"),
    Case([("append", "a", 8), ("append", "b", 4)], 8, 4, label="exactly full blocks: no spare block"),
    Case([("append", "a", 6), ("append", "b", 2), ("free", "a"), ("append", "c", 9)], 8, 4,
         label="a finished request's blocks are reused, lowest id first"),
    Case([("append", "a", 1), ("append", "b", 1), ("append", "a", 4), ("append", "b", 4)], 8, 4,
         label="two requests growing in turn: their blocks interleave"),
])
def page_tables(events: list, n_blocks: int, block_size: int) -> dict:
    """Replay ``events`` — ("append", request, n_tokens) or ("free", request) — on a pool of ``n_blocks``
    KV blocks of ``block_size`` tokens and return each live request's block table (its block ids in
    order). A request holds ceil(tokens / block_size) blocks; new blocks are the lowest free ids."""
    free = list(range(n_blocks))                           # the pool: every block starts free
    tables, lengths = {}, {}
    for kind, request, *n in events:
        if kind == "free":
            free = sorted(free + tables.pop(request))      # its blocks go back to the pool
            lengths.pop(request)
            continue
        lengths[request] = lengths.get(request, 0) + n[0]
        table = tables.setdefault(request, [])
        while len(table) < math.ceil(lengths[request] / block_size):   # a block only when the last one is full
            if not free:
                raise MemoryError(f"out of KV blocks: {n_blocks} blocks of {block_size} tokens are all in use")
            table.append(free.pop(0))                      # lowest free id first
    return tables


@page_tables.mistake("the freed blocks never went back to the pool: a finished request must return its blocks, "
                     "or the cache leaks until no request fits")
def _(events, n_blocks, block_size):
    free, tables, lengths = list(range(n_blocks)), {}, {}
    for kind, request, *n in events:
        if kind == "free":
            tables.pop(request)
            lengths.pop(request)
            continue
        lengths[request] = lengths.get(request, 0) + n[0]
        table = tables.setdefault(request, [])
        while len(table) < math.ceil(lengths[request] / block_size):
            table.append(free.pop(0))
    return tables


@page_tables.mistake("a new block for every append: the last block usually has room left; allocate only "
                     "when ceil(tokens / block_size) exceeds the blocks held")
def _(events, n_blocks, block_size):
    free, tables = list(range(n_blocks)), {}
    for kind, request, *n in events:
        if kind == "free":
            free = sorted(free + tables.pop(request))
            continue
        table = tables.setdefault(request, [])
        for _ in range(math.ceil(n[0] / block_size)):
            table.append(free.pop(0))
    return tables


@page_tables.mistake("off by one: tokens // block_size + 1 blocks takes a spare block whenever the blocks are "
                     "exactly full; the number of blocks is ceil(tokens / block_size)")
def _(events, n_blocks, block_size):
    free, tables, lengths = list(range(n_blocks)), {}, {}
    for kind, request, *n in events:
        if kind == "free":
            free = sorted(free + tables.pop(request))
            lengths.pop(request)
            continue
        lengths[request] = lengths.get(request, 0) + n[0]
        table = tables.setdefault(request, [])
        while len(table) < lengths[request] // block_size + 1:
            table.append(free.pop(0))
    return tables
