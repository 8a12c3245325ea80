import itertools
import random

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from zhllama.data import builtin
from zhllama.data.dedup import SCHEME, SEED, NearDuplicateIndex, lsh_params, minhash, shingle_hashes, shingles


@pytest.fixture(scope="module")
def long_docs():
    """Real People's Daily paragraphs of 300+ characters."""
    docs = (d["text"] for d in builtin.documents("train", ["peoples_daily"]) if len(d["text"]) >= 300)
    return list(itertools.islice(docs, 40))


def edit(text: str, share: float, rng: random.Random) -> str:
    """Replace, insert or delete `share` of the characters at random (replacements drawn from the text)."""
    chars = list(text)
    for _ in range(round(len(text) * share)):
        op, i = rng.choice("rid"), rng.randrange(len(chars))
        if op == "r":
            chars[i] = rng.choice(text)
        elif op == "i":
            chars.insert(i, rng.choice(text))
        else:
            del chars[i]
    return "".join(chars)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def test_shingles_ignore_whitespace():
    assert shingles("中华 人民\n共和", 3) == {"中华人", "华人民", "人民共", "民共和"}
    assert shingles("中 华", 5) == {"中华"}
    assert shingles(" \n", 5) == set()


def test_shingle_hashes_are_one_per_distinct_shingle(long_docs):
    for text in long_docs:
        assert len(shingle_hashes(text, 5)) == len(shingles(text, 5))


def test_minhash_is_deterministic_and_estimates_jaccard(long_docs):
    rng = random.Random(1)
    a = long_docs[0]
    assert np.array_equal(minhash(a).hashvalues, minhash(a).hashvalues)
    for share in (0.02, 0.1, 0.3):
        b = edit(a, share, rng)
        true = jaccard(shingles(a, 5), shingles(b, 5))
        assert abs(minhash(a).jaccard(minhash(b)) - true) < 0.12


def test_signature_is_bit_identical_to_datasketch_update_batch(long_docs):
    for text in long_docs[:10] + ["短", "", "中" * 20_000 + "".join(long_docs)]:
        reference = MinHash(num_perm=128, seed=SEED, scheme=SCHEME, hashfunc=int)
        reference.update_batch(shingle_hashes(text, 5).tolist())
        assert np.array_equal(minhash(text).hashvalues, reference.hashvalues)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 0.8, 0.9])
def test_lsh_params_keep_recall_at_the_threshold(threshold):
    bands, rows = lsh_params(threshold, 128)
    assert bands * rows <= 128
    assert 1 - (1 - threshold ** rows) ** bands >= 0.95
    more = rows + 1  # one more row per band would lose recall
    assert 1 - (1 - threshold ** more) ** (128 // more) < 0.95


def test_index_candidates_equal_datasketch_minhashlsh(long_docs):
    rng = random.Random(2)
    texts = long_docs + [edit(t, share, rng) for t in long_docs[:20] for share in (0.03, 0.15, 0.4)]
    signatures = [minhash(t) for t in texts]
    ours = NearDuplicateIndex(0.5, 128)
    theirs = MinHashLSH(threshold=0.5, num_perm=128, params=(ours.bands, ours.rows))
    for key, sig in enumerate(signatures):
        assert ours.candidates(sig) == set(theirs.query(sig))
        ours.add(key, sig)
        theirs.insert(key, sig)
    assert any(len(ours.candidates(sig)) > 1 for sig in signatures)


def test_index_finds_light_edits_and_not_heavy_ones(long_docs):
    rng = random.Random(3)
    index = NearDuplicateIndex(0.5, 128)
    for key, text in enumerate(long_docs[:30]):
        assert index.add_if_new(key, minhash(text)) is None, "distinct documents must all be kept"
    for key, text in enumerate(long_docs[:30]):
        assert index.match(minhash(edit(text, 0.05, rng))) == key
        assert index.match(minhash(edit(text, 0.5, rng))) is None
    assert len(index) == 30
