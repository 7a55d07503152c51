"""Exercises of 09_grouped_query_attention: sharing KV heads, the cache's bytes per token, pooling heads."""
import torch

from . import Case, exercise

# --- 09.share_kv_heads ----------------------------------------------------------------------------


def _heads(B, n_kv, T, hd):
    """kv[b, h, t, d] = 1000 b + 100 h + 10 t + d: every entry says which head it came from."""
    return (1000 * torch.arange(B)[:, None, None, None] + 100 * torch.arange(n_kv)[None, :, None, None]
            + 10 * torch.arange(T)[None, None, :, None] + torch.arange(hd)[None, None, None, :]).float()


@exercise("09.share_kv_heads", "give every query head its KV head", cases=[
    Case(_heads(1, 3, 2, 2), 3, label="SmolLM2's grouping: 3 KV heads for 9 query heads (groups of 3)"),
    Case(_heads(2, 2, 3, 4), 2, label="2 KV heads, groups of 2, batch of 2"),
    Case(_heads(1, 1, 4, 2), 8, label="MQA: one KV head shared by 8 query heads"),
    Case(_heads(1, 4, 2, 2), 1, label="MHA: groups of 1, nothing to share (a copy of the input)")])
def share_kv_heads(kv: torch.Tensor, group: int) -> torch.Tensor:
    """(B, n_kv, T, hd) -> (B, n_kv * group, T, hd): query head h reads KV head h // group."""
    return kv.repeat_interleave(group, dim=1)          # heads 0,0,0,1,1,1,2,2,2 for group 3


@share_kv_heads.mistake("the heads are tiled, not repeated: kv.repeat(1, group, 1, 1) gives heads 0,1,2,0,1,2,..., "
                        "so query head 1 reads KV head 1 instead of 0. Query head h belongs to KV head h // group: "
                        "repeat_interleave(group, dim=1) gives 0,0,0,1,1,1,... (the Break of this notebook: no error, "
                        "a broken model)")
def _(kv, group):
    return kv.repeat(1, group, 1, 1)


@share_kv_heads.mistake("repeated along the wrong axis: the heads are dim 1 of (B, n_kv, T, hd); repeating dim 2 "
                        "makes the sequence longer instead of adding heads")
def _(kv, group):
    return kv.repeat_interleave(group, dim=2)


# --- 09.kv_bytes_per_token ------------------------------------------------------------------------

@exercise("09.kv_bytes_per_token", "the KV cache's bytes per token", cases=[
    Case(30, 3, 64, 4, label="SmolLM2 in fp32: 30 layers and 3 KV heads of 64 dims"),
    Case(30, 3, 64, 2, label="SmolLM2 in bf16 (2 bytes per number)"),
    Case(32, 8, 128, 2, label="a Llama-3-8B-shaped model in bf16: 32 layers and 8 KV heads of 128"),
    Case(12, 12, 64, 4, label="GPT-2 small in fp32 (MHA: 12 KV heads)")])
def kv_bytes_per_token(n_layer: int, n_kv_head: int, head_dim: int, bytes_per_number: int) -> int:
    """Bytes one more token adds to the cache: a K and a V vector per KV head per layer."""
    return 2 * n_layer * n_kv_head * head_dim * bytes_per_number     # 2: K and V


@kv_bytes_per_token.mistake("counted K only: every layer stores a key AND a value vector per KV head, a factor 2")
def _(n_layer, n_kv_head, head_dim, bytes_per_number):
    return n_layer * n_kv_head * head_dim * bytes_per_number


@kv_bytes_per_token.mistake("forgot the bytes per number: the cache holds head_dim numbers per vector, each "
                            "bytes_per_number bytes (4 in fp32, 2 in bf16)")
def _(n_layer, n_kv_head, head_dim, bytes_per_number):
    return 2 * n_layer * n_kv_head * head_dim


@kv_bytes_per_token.mistake("counted bits, not bytes: bytes_per_number is already in bytes (fp32 = 4 bytes = 32 "
                            "bits); do not multiply by 8")
def _(n_layer, n_kv_head, head_dim, bytes_per_number):
    return 2 * n_layer * n_kv_head * head_dim * bytes_per_number * 8


# --- 09.mean_pool_kv ------------------------------------------------------------------------------

def _pool_cases(g):
    return [Case(torch.randn(4 * 2, 3, generator=g), 4, 2, label="4 KV heads of 2 dims -> 2 groups (C=3)"),
            Case(torch.randn(6 * 4, 5, generator=g), 6, 3, label="6 heads of 4 dims -> 3 groups"),
            Case(torch.randn(3 * 2, 2, generator=g), 3, 1, label="3 heads -> 1 (MQA)"),
            Case(torch.randn(2 * 3, 4, generator=g), 2, 2, label="2 heads -> 2 groups: nothing pooled")]


@exercise("09.mean_pool_kv", "pool a K or V projection's heads into groups", cases=_pool_cases)
def mean_pool_kv(weight: torch.Tensor, n_kv: int, n_groups: int) -> torch.Tensor:
    """(n_kv * hd, C) -> (n_groups * hd, C): each group's rows are the mean of its n_kv // n_groups
    consecutive heads (head h joins group h // (n_kv // n_groups))."""
    hd, C = weight.shape[0] // n_kv, weight.shape[1]
    heads = weight.view(n_groups, n_kv // n_groups, hd, C)     # (groups, heads per group, hd, C)
    return heads.mean(dim=1).reshape(n_groups * hd, C)


@mean_pool_kv.mistake("the groups take interleaved heads (0, 2 | 1, 3): consecutive heads form a group, head h "
                      "joins group h // (n_kv // n_groups). View as (n_groups, heads_per_group, hd, C), not the reverse")
def _(weight, n_kv, n_groups):
    hd, C = weight.shape[0] // n_kv, weight.shape[1]
    return weight.view(n_kv // n_groups, n_groups, hd, C).mean(dim=0).reshape(n_groups * hd, C)


@mean_pool_kv.mistake("kept the first head of each group instead of the mean of its heads: the other heads' "
                      "knowledge is thrown away (average them: .mean(dim=1))")
def _(weight, n_kv, n_groups):
    hd, C = weight.shape[0] // n_kv, weight.shape[1]
    return weight.view(n_groups, n_kv // n_groups, hd, C)[:, 0].reshape(n_groups * hd, C)


@mean_pool_kv.mistake("pooled across the rows of the whole matrix, not per head: a head is hd consecutive rows, "
                      "so reshape to (n_groups, heads_per_group, hd, C) before averaging")
def _(weight, n_kv, n_groups):
    return weight.view(-1, n_kv // n_groups, weight.shape[1]).mean(dim=1)
