"""Exercises of 16_synthetic_data: the Jaccard similarity of two shingle sets, a MinHash signature,
and the LSH banding test that makes two documents a candidate pair."""
import numpy as np

from . import Case, exercise

# --- 16.jaccard -----------------------------------------------------------------------------------


@exercise("16.jaccard", "the Jaccard similarity of two shingle sets", cases=[
    Case(np.array([1, 2, 3, 4]), np.array([3, 4, 5, 6]), label="half of each set shared: J = 2/6"),
    Case(np.array([7, 8, 9]), np.array([7, 8, 9]), label="identical sets: J = 1"),
    Case(np.array([1, 2]), np.array([3, 4, 5]), label="disjoint sets: J = 0"),
    Case(np.array([1, 2, 3, 4, 5, 6, 7, 8]), np.array([2, 3]), label="one set inside a much larger one: J = 2/8"),
])
def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two sets given as arrays of distinct shingle hashes."""
    shared = len(np.intersect1d(a, b))                   # in both
    return shared / (len(a) + len(b) - shared)           # |A ∪ B| = |A| + |B| - |A ∩ B|: shared ones counted once


@jaccard.mistake("divided by |A| + |B|: a shared shingle is then counted twice in the denominator, so even two "
                 "identical sets score 0.5. The union counts it once: |A| + |B| - |A ∩ B|")
def _(a, b):
    return len(np.intersect1d(a, b)) / (len(a) + len(b))


@jaccard.mistake("divided by the smaller set (the overlap coefficient): a short text inside a long one then "
                 "scores 1, as if they were duplicates. Jaccard divides by the union")
def _(a, b):
    return len(np.intersect1d(a, b)) / min(len(a), len(b))


@jaccard.mistake("divided by the larger set only: |A ∪ B| is larger than either set whenever each has shingles "
                 "the other lacks")
def _(a, b):
    return len(np.intersect1d(a, b)) / max(len(a), len(b))


# --- 16.minhash -----------------------------------------------------------------------------------

PRIME = (1 << 31) - 1


def _minhash_cases(g):
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, PRIME, 8, dtype=np.int64), rng.integers(0, PRIME, 8, dtype=np.int64)
    return [
        Case(np.array([5, 17, 123456, 2_000_000_000], dtype=np.int64), a, b, PRIME,
             label="4 shingles, 8 hash functions (a·x + b) mod p"),
        Case(np.array([42], dtype=np.int64), a[:3], b[:3], PRIME, label="a one-shingle document"),
        Case(rng.integers(0, PRIME, 50, dtype=np.int64), a, b, PRIME, label="50 shingles, 8 hash functions"),
        Case(np.array([0, 1, 2, 3], dtype=np.int64), np.array([3, 5], dtype=np.int64), np.array([1, 4], dtype=np.int64),
             7, label="a small prime p = 7, worked by hand: h1 = 3x + 1 mod 7, h2 = 5x + 4 mod 7"),
    ]


@exercise("16.minhash", "a MinHash signature", cases=_minhash_cases)
def minhash(shingles: np.ndarray, a: np.ndarray, b: np.ndarray, prime: int) -> np.ndarray:
    """(k,) int64: for each hash function h_i(x) = (a_i·x + b_i) mod prime, the minimum over the
    document's shingles (S,)."""
    hashes = (a[:, None] * shingles[None, :] + b[:, None]) % prime    # (k, S): every function on every shingle
    return hashes.min(axis=1)                                          # (k,): the smallest per function


@minhash.mistake("took the minimum over the hash functions (axis 0), one number per shingle: the signature "
                 "has one entry per hash function, the minimum over the document's shingles (axis=1)")
def _(shingles, a, b, prime):
    return ((a[:, None] * shingles[None, :] + b[:, None]) % prime).min(axis=0)


@minhash.mistake("took the maximum: MinHash uses the minimum (the maximum works as well in theory, but then it is "
                 "a different signature and no longer matches anyone else's MinHash)")
def _(shingles, a, b, prime):
    return ((a[:, None] * shingles[None, :] + b[:, None]) % prime).max(axis=1)


@minhash.mistake("forgot `% prime`: without the modulus a·x + b is increasing in x, so every hash function "
                 "picks the same shingle (the smallest) and the k values carry one bit of information")
def _(shingles, a, b, prime):
    return (a[:, None] * shingles[None, :] + b[:, None]).min(axis=1)


# --- 16.lsh_candidate -----------------------------------------------------------------------------

def _sigs(agree_rows_per_band, rows=3):
    """Two signatures of len(agree_rows_per_band) bands x `rows` rows; band i agrees on its first
    agree_rows_per_band[i] rows."""
    a = np.arange(len(agree_rows_per_band) * rows, dtype=np.int64) + 100
    b = a.copy()
    for i, n in enumerate(agree_rows_per_band):
        b[i * rows + n:(i + 1) * rows] += 1000                 # the remaining rows of band i differ
    return a, b


@exercise("16.lsh_candidate", "the LSH banding test", cases=[
    Case(*_sigs([3, 3, 3, 3]), 4, 3, label="identical signatures: a candidate"),
    Case(*_sigs([0, 1, 3, 0]), 4, 3, label="only band 2 agrees in all its rows: a candidate"),
    Case(*_sigs([2, 2, 2, 2]), 4, 3,
         label="2 of 3 rows agree in every band (67% of the signature equal): no band agrees fully, NOT a candidate"),
    Case(*_sigs([3, 3, 3, 0]), 4, 3, label="every band but the last agrees: a candidate"),
    Case(*_sigs([0, 0, 3, 3, 3]), 2, 3, label="a longer signature: only the first 2 bands x 3 rows are used"),
])
def lsh_candidate(sig_a: np.ndarray, sig_b: np.ndarray, bands: int, rows: int) -> bool:
    """True if the first bands·rows values of two signatures agree in ALL rows of AT LEAST ONE band."""
    a = sig_a[:bands * rows].reshape(bands, rows)          # (bands, rows): band i is values i·rows .. i·rows + rows - 1
    b = sig_b[:bands * rows].reshape(bands, rows)
    return bool((a == b).all(axis=1).any())                # a band agrees when all its rows do; one such band suffices


@lsh_candidate.mistake("required every band to agree: one fully agreeing band is enough (that is what makes the "
                       "S-curve 1 - (1 - J^r)^b rise steeply). Use .all(axis=1).any(), not .all()")
def _(sig_a, sig_b, bands, rows):
    a, b = sig_a[:bands * rows].reshape(bands, rows), sig_b[:bands * rows].reshape(bands, rows)
    return bool((a == b).all())


@lsh_candidate.mistake("a band agrees only when ALL of its rows agree: with .any(axis=1) a single equal value "
                       "makes a candidate, and almost every pair becomes one")
def _(sig_a, sig_b, bands, rows):
    a, b = sig_a[:bands * rows].reshape(bands, rows), sig_b[:bands * rows].reshape(bands, rows)
    return bool((a == b).any(axis=1).any())


@lsh_candidate.mistake("compared the estimated Jaccard (share of equal values) with a threshold: that needs "
                       "every pair compared, which is what banding avoids. Cut the signature into bands of "
                       "`rows` values and ask whether one band agrees completely")
def _(sig_a, sig_b, bands, rows):
    n = bands * rows
    return bool((sig_a[:n] == sig_b[:n]).mean() >= (1 / bands) ** (1 / rows))
