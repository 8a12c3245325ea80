import sentencepiece as spm
from transformers import AutoTokenizer

from tests.conftest import EXTENDED_SIZE
from tests.tokenizer.strings import random_strings
from zhllama import tokenizer
from zhllama.data import builtin
from zhllama.tokenizer.merge import is_chinese_piece, merge_protos
from zhllama.tokenizer.spm import NORMAL, load_proto


def test_base_pieces_ids_scores_and_types_are_kept(llama2_dir, extended_dir):
    base, merged = load_proto(llama2_dir), load_proto(extended_dir)
    assert len(merged.pieces) == EXTENDED_SIZE
    for old, new in zip(base.pieces, merged.pieces[:32000], strict=False):
        assert (old.piece, old.score, old.type) == (new.piece, new.score, new.type)
    assert merged.trainer_spec.byte_fallback and merged.normalizer_spec.name == "identity"


def test_new_pieces_are_chinese_with_distinct_scores(llama2_dir, extended_dir):
    base, merged = load_proto(llama2_dir), load_proto(extended_dir)
    new = merged.pieces[32000:]
    assert all(p.type == NORMAL and is_chinese_piece(p.piece) for p in new)
    # Distinct scores, none equal to a base score: ties would let the fast tokenizer drift from sentencepiece.
    scores = [p.score for p in new]
    assert len(set(scores)) == len(scores)
    assert not set(scores) & {p.score for p in base.pieces}


def test_round_trip_and_fast_equals_slow_on_10000_random_strings(extended_dir):
    sp = spm.SentencePieceProcessor(model_file=str(extended_dir / "tokenizer.model"))
    fast = AutoTokenizer.from_pretrained(str(extended_dir))
    texts = random_strings(10_000, seed=0)
    ids = fast(texts, split_special_tokens=True)["input_ids"]
    assert ids == [[1] + x for x in sp.encode(texts)]
    assert fast.batch_decode(ids, skip_special_tokens=True) == texts
    assert sp.decode(sp.encode(texts)) == texts


def test_english_and_code_ids_are_unchanged(llama2_dir, extended_dir):
    base = AutoTokenizer.from_pretrained(str(llama2_dir))
    ext = AutoTokenizer.from_pretrained(str(extended_dir))
    texts = builtin.english_texts()[:200] + builtin.code_texts()
    assert ext(texts)["input_ids"] == base(texts)["input_ids"]


def test_chinese_needs_far_fewer_tokens(llama2_dir, extended_dir, zh_heldout_texts):
    base = AutoTokenizer.from_pretrained(str(llama2_dir))
    ext = AutoTokenizer.from_pretrained(str(extended_dir))
    chars = sum(map(len, zh_heldout_texts))
    before = sum(map(len, base(zh_heldout_texts, add_special_tokens=False)["input_ids"])) / chars
    after = sum(map(len, ext(zh_heldout_texts, add_special_tokens=False)["input_ids"])) / chars
    assert before > 1.4 and after < 0.75 * before, (before, after)


def test_equal_scores_break_fast_slow_agreement(llama2_dir, zh_train_file, tmp_path):
    """The public merges give every new piece score 0; sentencepiece then breaks ties by position, which a
    rank-ordered fast tokenizer cannot do. Our default scheme has no ties and agrees everywhere."""
    zh = tokenizer.train([zh_train_file], 5000, tmp_path / "zh")
    texts = [doc["text"] for doc in builtin.documents("heldout", ["reviews"])][:1500]
    disagreements = {}
    for scheme in ("zero", "zh-rank"):
        out = tokenizer.merge(llama2_dir, zh, tmp_path / scheme, scheme=scheme)
        sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
        fast = AutoTokenizer.from_pretrained(str(out))
        got = fast(texts, add_special_tokens=False)["input_ids"]
        disagreements[scheme] = sum(a != b for a, b in zip(got, sp.encode(texts), strict=True))
    assert disagreements["zh-rank"] == 0
    assert disagreements["zero"] > 0


def test_merge_keeps_only_reachable_pieces(llama2_dir, zh_train_file, tmp_path):
    zh = load_proto(tokenizer.train([zh_train_file], 4500, tmp_path / "zh"))
    base = load_proto(llama2_dir)
    merged = merge_protos(base, zh)
    have = {p.piece for p in merged.pieces}
    for p in merged.pieces[32000:]:
        assert all(ch in have for ch in p.piece)
        assert len(p.piece) == 1 or any(p.piece[:c] in have and p.piece[c:] in have for c in range(1, len(p.piece)))


def test_which_pieces_count_as_chinese():
    assert is_chinese_piece("中") and is_chinese_piece("▁中国") and is_chinese_piece("，但") and is_chinese_piece("𠀀")
    # Full-width symbols alone do turn up in English web text; pieces mixing scripts would touch English/code.
    assert not any(map(is_chinese_piece, ["＊", "・", "，", "▁", "a中", "中1", "中 国"]))
