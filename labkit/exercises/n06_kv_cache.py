"""Exercises of 06_kv_cache: writing new keys into a preallocated cache, the mask of a decode step
(empty slots, a sliding window), and the cache's bytes per token."""
import torch

from . import Case, exercise

# --- 06.cache_write -------------------------------------------------------------------------------


def _buffer(B, nkv, S, hd, filled):
    """A cache buffer (B, nkv, S, hd) whose first `filled` slots hold 100*b + 10*slot + head + dim/10, the rest 0."""
    b = torch.arange(B)[:, None, None, None]
    h = torch.arange(nkv)[None, :, None, None]
    s = torch.arange(S)[None, None, :, None]
    d = torch.arange(hd)[None, None, None, :]
    values = (100 * b + 10 * s + h + d / 10).float()
    return values * (s < filled)


def _new(B, nkv, T, hd, start):
    """T new keys for slots start.. : -(100*b + 10*slot + head + dim/10), negative so they stand out."""
    return -(_buffer(B, nkv, start + T, hd, start + T)[:, :, start:])


@exercise("06.cache_write", "write new keys into a preallocated cache", cases=[
    Case(_buffer(1, 2, 8, 4, 0), _new(1, 2, 3, 4, 0), 0, label="prefill: 3 tokens into an empty cache of 8 slots"),
    Case(_buffer(1, 2, 8, 4, 3), _new(1, 2, 1, 4, 3), 3, label="decode: 1 token after 3 cached ones"),
    Case(_buffer(2, 3, 6, 2, 4), _new(2, 3, 2, 2, 4), 4, label="2 rows, 3 KV heads: 2 tokens after 4"),
    Case(_buffer(1, 1, 5, 4, 4), _new(1, 1, 1, 4, 4), 4, label="the last free slot: the cache is full afterwards"),
])
def cache_write(buffer: torch.Tensor, new: torch.Tensor, start: int) -> torch.Tensor:
    """Write ``new`` (B, nkv, T, hd) into slots [start, start + T) of ``buffer`` (B, nkv, S, hd) in
    place, and return what the new queries attend over: the view of slots [0, start + T)."""
    T = new.shape[2]
    buffer[:, :, start:start + T] = new                  # in place: the buffer was allocated once, never again
    return buffer[:, :, :start + T]                      # (B, nkv, start + T, hd): the past and the new, no empty slot


@cache_write.mistake("torch.cat made a new tensor and the buffer was never written: the output is right for this "
                     "step, but the next step reads an empty cache (and every step allocates again). Write into the "
                     "buffer's slots: buffer[:, :, start:start + T] = new")
def _(buffer, new, start):
    return torch.cat([buffer[:, :, :start], new], dim=2)


@cache_write.mistake("returned the whole buffer: the empty slots after start + T hold zeros, and a zero key still "
                     "gets softmax weight (score 0, not -inf). Return only the filled slots: buffer[:, :, :start + T]")
def _(buffer, new, start):
    buffer[:, :, start:start + new.shape[2]] = new
    return buffer


@cache_write.mistake("off by one: slot `start` is the first free slot (slots 0 .. start-1 hold the past), so the "
                     "new keys go to [start, start + T), not [start + 1, start + T + 1)")
def _(buffer, new, start):
    T = new.shape[2]
    buffer[:, :, start + 1:start + T + 1] = new
    return buffer[:, :, :start + T + 1]


@cache_write.mistake("returned only the new keys: the new token must attend over every cached key as well "
                     "(the past is the point of the cache). Return buffer[:, :, :start + T]")
def _(buffer, new, start):
    buffer[:, :, start:start + new.shape[2]] = new
    return new


# --- 06.decode_mask -------------------------------------------------------------------------------


@exercise("06.decode_mask", "the attention mask of a cached step", cases=[
    Case(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3, -1, -1]), label="prefill of 4 tokens, 2 empty slots"),
    Case(torch.tensor([5]), torch.tensor([0, 1, 2, 3, 4, 5, -1, -1]), label="one decode step at position 5"),
    Case(torch.tensor([0]), torch.tensor([0, -1, -1]), label="the very first token: it sees only itself"),
    Case(torch.tensor([9]), torch.tensor([8, 9, 6, 7]), window=4,
         label="a ring buffer of 4 slots (position t in slot t % 4), window 4"),
    Case(torch.tensor([9]), torch.tensor([8, 9, 6, 7]), window=3, label="the same slots, window 3: position 6 is too old"),
    Case(torch.tensor([4, 5, 6]), torch.tensor([0, 1, 2, 3, 4, 5, 6, -1]), window=2,
         label="3 new tokens, window 2: each sees itself and one earlier"),
])
def decode_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(T,) positions of the new queries, (K,) the position held by each cache slot (-1: empty) ->
    (T, K) bool, True where query i may read slot j: filled, not in the future (itself included)
    and, with a window, fewer than ``window`` positions back."""
    q, k = q_pos[:, None], k_pos[None, :]                # (T, 1), (1, K)
    allowed = (k >= 0) & (k <= q)                        # a filled slot, at or before the query's position
    if window is not None:
        allowed &= (q - k) < window                      # itself and window - 1 earlier positions
    return allowed


@decode_mask.mistake("a token must see itself: allow k_pos <= q_pos, not k_pos < q_pos (the first token then has "
                     "no key at all and its softmax is NaN)")
def _(q_pos, k_pos, window=None):
    q, k = q_pos[:, None], k_pos[None, :]
    allowed = (k >= 0) & (k < q)
    if window is not None:
        allowed &= (q - k) < window
    return allowed


@decode_mask.mistake("an empty slot (position -1) passed as 'in the past' (-1 <= q): the query reads zeros that "
                     "were never written. Require k_pos >= 0 as well")
def _(q_pos, k_pos, window=None):
    q, k = q_pos[:, None], k_pos[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (q - k) < window
    return allowed


@decode_mask.mistake("the window is off by one: a window of W means the token itself and W - 1 earlier ones, "
                     "q - k < W (with <= a token sees W + 1 positions)")
def _(q_pos, k_pos, window=None):
    q, k = q_pos[:, None], k_pos[None, :]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= (q - k) <= window
    return allowed


@decode_mask.mistake("the mask is (K, T), transposed: rows are the new queries, columns the cache slots "
                     "(q_pos[:, None] against k_pos[None, :])")
def _(q_pos, k_pos, window=None):
    q, k = q_pos[None, :], k_pos[:, None]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= (q - k) < window
    return allowed


# --- 06.kv_bytes_per_token ------------------------------------------------------------------------


@exercise("06.kv_bytes_per_token", "the KV cache's bytes per token", cases=[
    Case(30, 9, 3, 576, 4, label="SmolLM2-135M in fp32: 30 layers, 9 query heads, 3 KV heads, width 576"),
    Case(32, 32, 32, 4096, 2, label="Llama-2-7B in fp16: multi-head attention (32 KV heads)"),
    Case(32, 32, 8, 4096, 2, label="Mistral-7B in fp16: grouped-query attention (8 KV heads)"),
    Case(32, 71, 1, 4544, 2, label="Falcon-7B in fp16: multi-query attention (1 KV head)"),
    Case(1, 2, 2, 8, 4, label="one layer, 2 heads of 4 dims"),
])
def kv_bytes_per_token(n_layer: int, n_head: int, n_kv_head: int, d_model: int, bytes_per_number: int) -> int:
    """Bytes one more token adds to the KV cache of a decoder with these dimensions."""
    head_dim = d_model // n_head                         # the query heads split the model width; KV heads are as wide
    return 2 * n_layer * n_kv_head * head_dim * bytes_per_number   # a key AND a value, per layer, per KV head


@kv_bytes_per_token.mistake("forgot the factor 2: every layer caches a key AND a value for each KV head")
def _(n_layer, n_head, n_kv_head, d_model, bytes_per_number):
    return n_layer * n_kv_head * (d_model // n_head) * bytes_per_number


@kv_bytes_per_token.mistake("counted every query head (n_head, or d_model = n_head x head_dim): the cache stores only "
                            "the n_kv_head key/value heads — that is the whole point of GQA and MQA")
def _(n_layer, n_head, n_kv_head, d_model, bytes_per_number):
    return 2 * n_layer * d_model * bytes_per_number


@kv_bytes_per_token.mistake("forgot the layers: each of the n_layer layers keeps its own keys and values")
def _(n_layer, n_head, n_kv_head, d_model, bytes_per_number):
    return 2 * n_kv_head * (d_model // n_head) * bytes_per_number
