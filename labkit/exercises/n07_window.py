"""Exercises of 07_long_context: the sliding-window mask, and sliding-window attention in chunks."""
import math

import torch
import torch.nn.functional as F

from . import Case, exercise

# --- 07.band_mask ---------------------------------------------------------------------------------


@exercise("07.band_mask", "the sliding-window mask", cases=[
    Case(1, 1, label="T=1, W=1: the one token sees itself"),
    Case(8, 3, label="T=8, W=3: itself and the 2 tokens before it"),
    Case(5, 1, label="W=1: only the diagonal"),
    Case(6, 10, label="W >= T: the window never bites, plain causal"),
    Case(12, 4, label="T=12, W=4")])
def band_mask(T: int, W: int) -> torch.Tensor:
    """(T, T) bool, True where query i may read key j: j <= i (causal) and i - j < W (inside the window)."""
    i = torch.arange(T)[:, None]                                  # (T, 1) query positions
    j = torch.arange(T)[None, :]                                  # (1, T) key positions
    return (j <= i) & (i - j < W)                                 # a band of width W ending on the diagonal


@band_mask.mistake("the window is one too wide: a query reads itself and the W - 1 tokens before it, so "
                   "the condition is i - j < W, not i - j <= W")
def _(T, W):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (j <= i) & (i - j <= W)


@band_mask.mistake("the mask is not causal: |i - j| < W lets a query read W - 1 FUTURE tokens too; keep j <= i")
def _(T, W):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (i - j).abs() < W


@band_mask.mistake("the mask is transposed: rows are queries, columns keys, and a query reads keys BEFORE it "
                   "(j <= i): the band lies on and below the diagonal")
def _(T, W):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (i <= j) & (j - i < W)


@band_mask.mistake("True marks the BLOCKED keys here (nn.MultiheadAttention's convention); this lab, like SDPA, "
                   "uses True = may attend")
def _(T, W):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return ~((j <= i) & (i - j < W))


# --- 07.chunked_window ----------------------------------------------------------------------------

def _qkv(g, B, nh, T, hd):
    return tuple(torch.randn(B, nh, T, hd, generator=g) for _ in range(3))


@exercise("07.chunked_window", "sliding-window attention in chunks", cases=lambda g: [
    Case(*_qkv(g, 1, 2, 8, 4), 4, label="T=8, W=4: two whole chunks"),
    Case(*_qkv(g, 2, 1, 10, 3), 4, label="T=10, W=4: the last chunk is ragged (padded)"),
    Case(*_qkv(g, 1, 1, 6, 2), 1, label="W=1: each query reads only itself"),
    Case(*_qkv(g, 1, 2, 5, 4), 8, label="W >= T: one chunk, plain causal attention"),
    Case(*_qkv(g, 2, 3, 24, 8), 6, label="T=24, W=6, 3 heads")])
def chunked_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, W: int) -> torch.Tensor:
    """q, k, v (B, nh, T, hd) -> (B, nh, T, hd): causal attention where query i reads keys i-W+1 .. i,
    computed chunk by chunk: (T/W, W, 2W) scores instead of (T, T)."""
    B, nh, T, hd = q.shape
    n = -(-T // W)                                                # chunks of W queries; the last one padded
    pad = n * W - T
    q = F.pad(q, (0, 0, 0, pad)).view(B, nh, n, W, hd)            # (B, nh, n, W, hd)
    k = F.pad(k, (0, 0, W, pad)).view(B, nh, n + 1, W, hd)        # an empty chunk in front of chunk 0
    v = F.pad(v, (0, 0, W, pad)).view(B, nh, n + 1, W, hd)
    k2 = torch.cat([k[:, :, :-1], k[:, :, 1:]], dim=3)            # (B, nh, n, 2W, hd): previous chunk + own
    v2 = torch.cat([v[:, :, :-1], v[:, :, 1:]], dim=3)
    att = (q @ k2.transpose(-2, -1)) / math.sqrt(hd)              # (B, nh, n, W, 2W): 2TW scores
    i = torch.arange(W)[:, None]                                  # (W, 1) query offset in its chunk
    j = torch.arange(2 * W)[None, :]                              # (1, 2W) key offset in the pair
    in_band = (j > i) & (j <= i + W)                              # distance W + i - j in [0, W)
    real = (torch.arange(n)[:, None] - 1) * W + torch.arange(2 * W) >= 0   # (n, 2W) not the padding in front
    att = att.masked_fill(~(in_band[None] & real[:, None, :]), float("-inf")).softmax(dim=-1)
    return (att @ v2).view(B, nh, n * W, hd)[:, :, :T]            # (B, nh, T, hd), padding dropped


@chunked_window.mistake("each chunk of queries reads only its own chunk of keys ('block-local'): the first query "
                        "of a chunk then sees only itself. A query needs the W - 1 keys before it, which may lie "
                        "in the previous chunk: score every chunk against [previous chunk, own chunk]")
def _(q, k, v, W):
    B, nh, T, hd = q.shape
    n = -(-T // W)
    pad = n * W - T
    qc, kc, vc = (F.pad(t, (0, 0, 0, pad)).view(B, nh, n, W, hd) for t in (q, k, v))
    att = (qc @ kc.transpose(-2, -1)) / math.sqrt(hd)             # (B, nh, n, W, W)
    att = att.masked_fill(~torch.ones(W, W, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    return (att @ vc).view(B, nh, n * W, hd)[:, :, :T]


@chunked_window.mistake("the padding chunk in front of chunk 0 is not masked: its keys are zeros, score 0, and "
                        "take weight from the first W queries. Mask key positions < 0 as well as the band")
def _(q, k, v, W):
    B, nh, T, hd = q.shape
    n = -(-T // W)
    pad = n * W - T
    q = F.pad(q, (0, 0, 0, pad)).view(B, nh, n, W, hd)
    k = F.pad(k, (0, 0, W, pad)).view(B, nh, n + 1, W, hd)
    v = F.pad(v, (0, 0, W, pad)).view(B, nh, n + 1, W, hd)
    k2 = torch.cat([k[:, :, :-1], k[:, :, 1:]], dim=3)
    v2 = torch.cat([v[:, :, :-1], v[:, :, 1:]], dim=3)
    att = (q @ k2.transpose(-2, -1)) / math.sqrt(hd)
    i, j = torch.arange(W)[:, None], torch.arange(2 * W)[None, :]
    att = att.masked_fill(~((j > i) & (j <= i + W)), float("-inf")).softmax(dim=-1)
    return (att @ v2).view(B, nh, n * W, hd)[:, :, :T]


@chunked_window.mistake("the band inside a chunk pair is one too wide: query i of a chunk sits at key offset "
                        "W + i, so it may read offsets i+1 .. W+i (j > i), not i .. W+i — that is W + 1 keys")
def _(q, k, v, W):
    B, nh, T, hd = q.shape
    n = -(-T // W)
    pad = n * W - T
    q = F.pad(q, (0, 0, 0, pad)).view(B, nh, n, W, hd)
    k = F.pad(k, (0, 0, W, pad)).view(B, nh, n + 1, W, hd)
    v = F.pad(v, (0, 0, W, pad)).view(B, nh, n + 1, W, hd)
    k2 = torch.cat([k[:, :, :-1], k[:, :, 1:]], dim=3)
    v2 = torch.cat([v[:, :, :-1], v[:, :, 1:]], dim=3)
    att = (q @ k2.transpose(-2, -1)) / math.sqrt(hd)
    i, j = torch.arange(W)[:, None], torch.arange(2 * W)[None, :]
    real = (torch.arange(n)[:, None] - 1) * W + torch.arange(2 * W) >= 0
    att = att.masked_fill(~(((j >= i) & (j <= i + W))[None] & real[:, None, :]), float("-inf")).softmax(dim=-1)
    return (att @ v2).view(B, nh, n * W, hd)[:, :, :T]
