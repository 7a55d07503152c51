"""Exercises of 01_tokenization_embeddings: the two BPE primitives (count pairs, merge a pair) and decoding bytes."""
from . import Case, exercise

# --- 01.get_stats ---------------------------------------------------------------------------------


@exercise("01.get_stats", "count adjacent pairs", cases=[
    Case([1, 2, 3, 1, 2], label="[1, 2, 3, 1, 2]: (1, 2) twice"),
    Case([7], label="a single id: no pair at all"),
    Case([], label="an empty list"),
    Case([5, 5, 5, 5], label="a run of equal ids: (5, 5) three times (overlapping pairs all count)"),
    Case([1, 2, 1, 2], weight=10, label="weight=10: a chunk seen 10 times in the text counts 10 per pair")])
def get_stats(ids: list[int], counts: dict | None = None, weight: int = 1) -> dict[tuple[int, int], int]:
    """{(a, b): how often b follows a in ids}, each occurrence adding `weight` (into `counts` if given:
    training keeps one running count and updates it with weight -f / +f when a chunk changes)."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


@get_stats.mistake("the last pair is missing: zip(ids, ids[1:]) pairs every id with the next one; a range that "
                   "stops at len(ids) - 2 drops the final pair")
def _(ids, counts=None, weight=1):
    counts = {} if counts is None else counts
    for i in range(len(ids) - 2):
        counts[(ids[i], ids[i + 1])] = counts.get((ids[i], ids[i + 1]), 0) + weight
    return counts


@get_stats.mistake("overlapping pairs were skipped (stepping by 2): in [5, 5, 5, 5] the pair (5, 5) occurs three "
                   "times; counting looks at every position, merging is what skips overlaps")
def _(ids, counts=None, weight=1):
    counts = {} if counts is None else counts
    for i in range(0, len(ids) - 1, 2):
        counts[(ids[i], ids[i + 1])] = counts.get((ids[i], ids[i + 1]), 0) + weight
    return counts


@get_stats.mistake("the weight is ignored: a chunk that occurs `weight` times in the text contributes `weight` "
                   "to each of its pairs (that is the trick that makes training on 2M characters fast)")
def _(ids, counts=None, weight=1):
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


# --- 01.merge -------------------------------------------------------------------------------------

@exercise("01.merge", "replace a pair by a new id", cases=[
    Case([5, 6, 6, 7, 5, 6], (5, 6), 99, label="[5, 6, 6, 7, 5, 6], (5, 6) -> 99"),
    Case([1, 1, 1], (1, 1), 9, label="[1, 1, 1]: overlapping pairs merge left to right, once"),
    Case([1, 2, 3], (3, 4), 9, label="the pair does not occur: the ids come back unchanged"),
    Case([4], (4, 4), 9, label="a single id"),
    Case([3, 4, 3, 4], (3, 4), 256, label="the pair at the very end is merged too")])
def merge(ids: list[int], pair: tuple[int, int], idx: int) -> list[int]:
    """ids with every occurrence of `pair` (left to right, no overlap) replaced by `idx`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(idx)
            i += 2                      # skip both halves of the pair
        else:
            out.append(ids[i])
            i += 1
    return out


@merge.mistake("after a merge the loop advanced by one instead of two: the second half of the pair was kept "
               "as well ([5, 6] became [99, 6]); skip both ids of a merged pair")
def _(ids, pair, idx):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(idx)
        else:
            out.append(ids[i])
        i += 1
    return out


@merge.mistake("the last id is dropped or a pair at the end is missed: the loop must run while i < len(ids) and "
               "check i + 1 < len(ids) before looking at the pair")
def _(ids, pair, idx):
    out, i = [], 0
    while i < len(ids) - 1:
        if ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


@merge.mistake("modified the input list in place: build and return a new list, the caller's ids must not change")
def _(ids, pair, idx):
    i = 0
    while i < len(ids) - 1:
        if ids[i] == pair[0] and ids[i + 1] == pair[1]:
            ids[i:i + 2] = [idx]
        i += 1
    return ids


# --- 01.decode ------------------------------------------------------------------------------------

_VOCAB = {i: bytes([i]) for i in range(256)} | {256: b"\xc3", 257: b"\xa9!", 258: b"th", 259: b"the"}


@exercise("01.decode", "ids back to text", cases=[
    Case([258, 101, 32, 259], _VOCAB, label="plain ASCII: 'the the'"),
    Case([99, 97, 102, 256, 257], _VOCAB, label="'café!': é is two bytes split across two tokens"),
    Case([256], _VOCAB, label="half a character alone: invalid UTF-8, must not raise"),
    Case([], _VOCAB, label="no ids: the empty string")])
def decode(ids: list[int], vocab: dict[int, bytes]) -> str:
    """Join every token's bytes, then decode once as UTF-8 (invalid bytes become '�')."""
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


@decode.mistake("decoded each token separately: a character's bytes can be split across two tokens (é = c3 a9), "
                "so join ALL the bytes first and decode once")
def _(ids, vocab):
    return "".join(vocab[i].decode("utf-8", errors="replace") for i in ids)


@decode.mistake("decode raised on invalid UTF-8: a model can emit half a character; use "
                "errors='replace' (the '�' character) so decoding never fails")
def _(ids, vocab):
    return b"".join(vocab[i] for i in ids).decode("utf-8")
