"""Repetition within a document (Gopher's repeated lines and n-grams) and across documents (MinHash LSH).

Chinese has no spaces between words, so a document's "set" is its character k-grams (shingles) taken with
whitespace removed: re-wrapping or re-indenting a document does not make it new. Signatures (datasketch
MinHash, fixed seed) are computed in the worker processes, the expensive part, and travel back as raw hash
values; the index lives in the parent, which sees documents in input order, so the first copy is the one kept.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from datasketch import MinHash

SEED = 1  # fixed, so the same text always gets the same signature, in every process and every run
SCHEME = "affine32"
_BLOCK = 8192  # shingles per step of `signature`
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier for the polynomial shingle hash


def codepoints(text: str) -> np.ndarray:
    """The code points of `text` without whitespace, as uint64."""
    chars = "".join(text.split())
    return np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)


def shingles(text: str, k: int = 5) -> set[str]:
    """The set of k-character shingles of `text` with whitespace removed (the whole text if shorter)."""
    chars = "".join(text.split())
    if len(chars) <= k:
        return {chars} if chars else set()
    return {chars[i:i + k] for i in range(len(chars) - k + 1)}


def ngram_hashes(codes: np.ndarray, n: int) -> np.ndarray:
    """64-bit polynomial hashes of every n-gram of `codes` (uint64 code points); equal n-grams, equal hashes.

    Vectorised, because a Python loop over every character of every document would be the bottleneck of
    `clean`. Distinct n-grams collide with probability about 2^-64 per pair, which no corpus notices.
    """
    count = len(codes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    h = codes[:count].copy()
    for j in range(1, n):
        h = h * _MULT + codes[j:j + count]  # uint64 arithmetic wraps silently, as a hash should
    return h


def shingle_hashes(text: str, k: int = 5) -> np.ndarray:
    """One 32-bit hash per distinct shingle of `text` (the hashed counterpart of `shingles`)."""
    codes = codepoints(text)
    if len(codes) == 0:
        return np.empty(0, dtype=np.uint32)
    h = ngram_hashes(codes, min(k, len(codes)))
    folded = (h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
    return np.unique(folded.astype(np.uint32))


def repeated_line_shares(text: str) -> tuple[float, float]:
    """Share of lines that repeat an earlier line, and share of characters in them."""
    seen, lines, dup_lines, chars, dup_chars = set(), 0, 0, 0, 0
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        lines += 1
        chars += len(line)
        if line in seen:
            dup_lines += 1
            dup_chars += len(line)
        else:
            seen.add(line)
    return (dup_lines / lines, dup_chars / chars) if lines else (0.0, 0.0)


def top_ngram_share(codes: np.ndarray, n: int) -> float:
    """Share of characters in the most frequent n-gram (0 when no n-gram occurs twice)."""
    h = ngram_hashes(codes, n)
    if len(h) < 2:
        return 0.0
    top = np.unique(h, return_counts=True)[1].max()
    return float(top * n / len(codes)) if top > 1 else 0.0


def repeated_ngram_share(codes: np.ndarray, n: int) -> float:
    """Share of characters covered by an n-gram that already occurred earlier in the document."""
    h = ngram_hashes(codes, n)
    if len(h) < 2:
        return 0.0
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    starts = np.flatnonzero(first[inverse] < np.arange(len(h)))
    if len(starts) == 0:
        return 0.0
    edges = np.zeros(len(codes) + 1, dtype=np.int32)
    edges[starts] += 1
    edges[starts + n] -= 1
    return float(np.count_nonzero(np.cumsum(edges[:-1])) / len(codes))


@lru_cache(maxsize=4)
def _permutations(num_perm: int) -> np.ndarray:
    return MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME).permutations


def signature(text: str, num_perm: int = 128, k: int = 5) -> np.ndarray:
    """The MinHash hash values of `text`'s k-character shingles, exactly as datasketch's MinHash computes them.

    datasketch's "affine32" scheme: mix each value with MurmurHash3's 32-bit finalizer, permute it with
    a*h+b mod 2^32, keep the minimum per permutation. MinHash.update_batch does the same but first calls
    its hash function once per value in a Python loop, which doubled the cost of `clean`'s workers.
    tests/data/test_dedup.py checks the two agree bit for bit.
    """
    a, b = _permutations(num_perm)
    values = np.full(num_perm, np.uint32(0xFFFFFFFF), dtype=np.uint32)
    hashes = shingle_hashes(text, k)
    for start in range(0, len(hashes), _BLOCK):  # blocks bound the (shingles x num_perm) matrix to a few MB
        h = hashes[start:start + _BLOCK, None]
        h = (h ^ (h >> np.uint32(16))) * np.uint32(0x85EBCA6B)
        h = (h ^ (h >> np.uint32(13))) * np.uint32(0xC2B2AE35)
        h = h ^ (h >> np.uint32(16))
        np.minimum(values, (h * a + b).min(axis=0), out=values)
    return values


def minhash(text: str, num_perm: int = 128, k: int = 5) -> MinHash:
    """The datasketch MinHash of `text`'s k-character shingles; identical for identical text, in any process."""
    return MinHash(seed=SEED, scheme=SCHEME, hashvalues=signature(text, num_perm, k),
                   permutations=_permutations(num_perm))


def lsh_params(threshold: float, num_perm: int, recall: float = 0.95) -> tuple[int, int]:
    """(bands, rows): the most rows per band that still make a pair exactly at `threshold` a candidate with
    probability `recall`. More rows mean fewer chance candidates to verify; fewer mean fewer misses."""
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


class NearDuplicateIndex:
    """The signatures of the documents kept so far; answers "is this a near-duplicate of one of them?".

    This is MinHash LSH banding, as datasketch.MinHashLSH does it (same bands and rows give the same candidates;
    tests/data/test_dedup.py checks that), but with one flat dict of integer band keys. MinHashLSH keeps a set
    per bucket and byte-swaps every band twice per document: measured at 0.5 (42 bands), about 400 us and 14 KB
    per kept document, all of it in the one parent process that owns the index, which capped `clean` at about
    2,500 documents/s however many cores it had. This index takes about 50 us and 3 KB.

    LSH only proposes candidates: its S-curve lets through some pairs well below the threshold and misses a few
    above it. So the bands are tuned for recall (`lsh_params`) and every candidate is confirmed by its
    estimated Jaccard similarity, which makes `threshold` mean what it says.
    """

    def __init__(self, threshold: float = 0.5, num_perm: int = 128):
        self.threshold = threshold
        self.num_perm = num_perm
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.buckets: dict[int, int | list[int]] = {}  # band key -> kept document(s) in that bucket
        self.signatures: dict[int, np.ndarray] = {}  # hash values only: a MinHash object is much bigger

    def __len__(self) -> int:
        return len(self.signatures)

    def band_keys(self, hashvalues: np.ndarray) -> list[int]:
        """One 64-bit key per band; the band's number is hashed in, so one dict serves all bands."""
        rows = hashvalues[:self.bands * self.rows].reshape(self.bands, self.rows).astype(np.uint64)
        h = np.arange(1, self.bands + 1, dtype=np.uint64)
        for j in range(self.rows):
            h = h * _MULT + rows[:, j]
        return h.tolist()

    def candidates(self, sig: MinHash | np.ndarray) -> set[int]:
        """Kept documents that share at least one band with `sig` (what MinHashLSH.query returns)."""
        return self._candidates(self.band_keys(_values(sig, self.num_perm)))

    def match(self, sig: MinHash | np.ndarray) -> int | None:
        """The key of a kept document at least `threshold` similar to `sig`, if there is one."""
        values = _values(sig, self.num_perm)
        return self._match(values, self.band_keys(values))

    def add(self, key: int, sig: MinHash | np.ndarray) -> None:
        values = _values(sig, self.num_perm)
        self._add(key, values, self.band_keys(values))

    def add_if_new(self, key: int, sig: MinHash | np.ndarray) -> int | None:
        """Index `sig` under `key` unless it near-duplicates a kept document; return that document's key."""
        values = _values(sig, self.num_perm)
        bands = self.band_keys(values)
        found = self._match(values, bands)
        if found is None:
            self._add(key, values, bands)
        return found

    def _candidates(self, bands: list[int]) -> set[int]:
        found: set[int] = set()
        for hit in map(self.buckets.get, bands):
            if hit is None:
                continue
            if isinstance(hit, list):
                found.update(hit)
            else:
                found.add(hit)
        return found

    def _match(self, values: np.ndarray, bands: list[int]) -> int | None:
        for key in sorted(self._candidates(bands)):  # sorted: the answer must not depend on set order
            if np.count_nonzero(self.signatures[key] == values) >= self.threshold * self.num_perm:
                return key
        return None

    def _add(self, key: int, values: np.ndarray, bands: list[int]) -> None:
        for band in bands:
            hit = self.buckets.setdefault(band, key)
            if hit is key:  # the usual case: a bucket of its own
                continue
            if isinstance(hit, list):
                hit.append(key)
            else:
                self.buckets[band] = [hit, key]
        self.signatures[key] = values


def _values(sig: MinHash | np.ndarray, num_perm: int) -> np.ndarray:
    values = np.asarray(getattr(sig, "hashvalues", sig), dtype=np.uint32)
    if len(values) != num_perm:
        raise ValueError(f"expected a signature of {num_perm} hash values, got {len(values)}")
    return values
