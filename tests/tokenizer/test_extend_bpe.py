"""`tokenizer extend` / `merge` on a byte-level BPE base: Llama-3's real vocabulary (128,256 ids)."""

import json
import math

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from tests.test_cli import assert_one_line_error, run_in_process
from tests.tokenizer.strings import random_strings
from zhllama import tokenizer
from zhllama.artifacts import read_provenance
from zhllama.data import builtin
from zhllama.errors import ZhllamaError
from zhllama.tokenizer import bpe_extend
from zhllama.tokenizer.merge import is_chinese_piece

NEW = 3000
PAD_MULTIPLE = 128


@pytest.fixture(scope="module")
def l3(llama3_dir):
    return llama3_dir


@pytest.fixture(scope="module")
def base_size(l3):
    return bpe_extend.next_id(bpe_extend.load_bpe_json(l3))


@pytest.fixture(scope="module")
def zh_small(tmp_path_factory):
    """200k characters of the built-in training split: enough for a few thousand merges, trained in seconds."""
    path = tmp_path_factory.mktemp("zh") / "zh_small.jsonl"
    builtin.write_jsonl(path, "train", max_chars=200_000)
    return path


@pytest.fixture(scope="module")
def ext(l3, base_size, zh_small, tmp_path_factory):
    return tokenizer.extend(l3, [zh_small], base_size + NEW, tmp_path_factory.mktemp("ext") / "l3-zh")


@pytest.fixture(scope="module")
def padded(l3, base_size, zh_small, tmp_path_factory):
    return tokenizer.extend(l3, [zh_small], base_size + NEW + 1, tmp_path_factory.mktemp("pad") / "l3-zh",
                            pad_to_multiple=PAD_MULTIPLE)


def tok_json(folder):
    return json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))


def test_every_base_id_token_merge_and_special_token_is_unchanged(l3, ext, base_size):
    base, new = tok_json(l3), tok_json(ext)
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
        assert new[key] == base[key], key
    old_vocab, new_vocab = base["model"]["vocab"], new["model"]["vocab"]
    assert {t: new_vocab[t] for t in old_vocab} == old_vocab
    assert new["model"]["merges"][:len(base["model"]["merges"])] == base["model"]["merges"]
    added = [t for t, i in new_vocab.items() if t not in old_vocab]
    assert sorted(new_vocab[t] for t in added) == list(range(base_size, base_size + NEW))
    assert len(new["model"]["merges"]) == len(base["model"]["merges"]) + NEW
    # Llama-3's 256 special tokens keep 128000-128255; the new tokens follow them.
    assert base_size == 128_256 and sorted(t["id"] for t in new["added_tokens"]) == list(range(128_000, 128_256))


def test_new_tokens_are_chinese_and_each_is_produced_by_its_own_text(ext, base_size):
    data = tok_json(ext)
    fast = Tokenizer.from_file(str(ext / "tokenizer.json"))
    vocab = data["model"]["vocab"]
    new = sorted((i, t) for t, i in vocab.items() if i >= base_size)
    texts = [bpe_extend.token_text(t) for _, t in new]
    assert all(text is not None and is_chinese_piece(text) for text in texts)
    for left, right in data["model"]["merges"][-NEW:]:  # both parts exist before the merge is used
        assert left in vocab and right in vocab
    encoded = fast.encode_batch(texts, add_special_tokens=False)
    assert [e.ids for e in encoded] == [[i] for i, _ in new]


def test_english_and_code_encode_exactly_as_before(l3, ext):
    base, new = AutoTokenizer.from_pretrained(str(l3)), AutoTokenizer.from_pretrained(str(ext))
    texts = builtin.english_texts()[:300] + builtin.code_texts()
    assert new(texts)["input_ids"] == base(texts)["input_ids"]


def test_chinese_needs_fewer_tokens_and_everything_round_trips(l3, ext, zh_heldout_texts):
    base, new = AutoTokenizer.from_pretrained(str(l3)), AutoTokenizer.from_pretrained(str(ext))
    chars = sum(map(len, zh_heldout_texts))
    before = sum(map(len, base(zh_heldout_texts, add_special_tokens=False)["input_ids"])) / chars
    after = sum(map(len, new(zh_heldout_texts, add_special_tokens=False)["input_ids"])) / chars
    assert after < 0.85 * before, (before, after)
    texts = zh_heldout_texts[:100] + random_strings(3000, seed=1)
    ids = new(texts, add_special_tokens=False)["input_ids"]
    assert new.batch_decode(ids) == texts


def test_output_is_tokenizer_json_with_base_configs_and_provenance(l3, ext, base_size):
    names = {p.name for p in ext.iterdir()}
    assert "tokenizer.json" in names and "tokenizer.model" not in names
    assert {p.name for p in l3.iterdir() if p.name in bpe_extend.BASE_FILES} <= names
    record = read_provenance(ext)
    assert record["command"] == "tokenizer extend"
    assert (record["base_vocab_size"], record["vocab_size"]) == (base_size, base_size + NEW)
    assert len(AutoTokenizer.from_pretrained(str(ext))) == base_size + NEW


def test_pad_to_multiple_adds_tokens_that_encoding_never_produces(padded, base_size):
    data = tok_json(padded)
    vocab = data["model"]["vocab"]
    wanted = base_size + NEW + 1
    total = math.ceil(wanted / PAD_MULTIPLE) * PAD_MULTIPLE
    ids = [*vocab.values(), *(t["id"] for t in data["added_tokens"] if t["content"] not in vocab)]
    assert sorted(ids) == list(range(total)) and total > wanted
    pads = {i: t for t, i in vocab.items() if i >= wanted}
    assert all(t == bpe_extend.PAD_TOKEN.format(i) for i, t in pads.items())
    fast = AutoTokenizer.from_pretrained(str(padded))
    assert len(fast) == total
    texts = random_strings(2000, seed=3) + list(pads.values()) + [f"{pads[wanted]} 中文"]
    produced = {i for ids in fast(texts)["input_ids"] for i in ids}
    assert not produced & set(pads)


def test_merge_takes_the_chinese_tokens_of_another_byte_level_bpe(l3, ext, base_size, tmp_path):
    # `ext` holds all of Llama-3 plus new tokens: merging it into Llama-3 must take exactly the new ones, in order.
    out = tokenizer.merge(l3, ext / "tokenizer.json", tmp_path / "merged", max_new=500)
    merged, extended = tok_json(out)["model"], tok_json(ext)["model"]
    assert merged["merges"] == extended["merges"][:len(merged["merges"])]
    assert max(merged["vocab"].values()) == base_size + 499 and read_provenance(out)["new_tokens"] == 500


def test_mismatched_kinds_and_bad_sizes_are_one_line_errors_that_write_nothing(l3, base_size, llama2_dir, zh_small,
                                                                               tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(ZhllamaError, match="SentencePiece model but --base .* byte-level BPE"):
        tokenizer.merge(l3, llama2_dir / "tokenizer.model", out)
    with pytest.raises(ZhllamaError, match="byte-level BPE tokenizer.json but --base .* SentencePiece"):
        tokenizer.merge(llama2_dir, l3, out)
    with pytest.raises(ZhllamaError, match="not larger than the base vocabulary"):
        tokenizer.extend(l3, [zh_small], base_size, out)
    with pytest.raises(ZhllamaError, match="applies to SentencePiece bases only"):
        tokenizer.extend(l3, [zh_small], base_size + 10, out, scheme="zero")
    small = tmp_path / "small.txt"
    small.write_text("中文分词器。\n" * 50, encoding="utf-8")
    with pytest.raises(ZhllamaError, match="yields only .* new Chinese tokens"):
        tokenizer.extend(l3, [small], base_size + 1000, out)
    result = run_in_process(capsys, "tokenizer", "merge", "--base", l3, "--add", llama2_dir, "--out", out)
    assert_one_line_error(result, "SentencePiece model", "byte-level BPE")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["small.txt"]


def test_a_tokenizer_json_that_is_not_byte_level_is_refused(llama2_dir, zh_small, tmp_path):
    base = tmp_path / "spm-json"
    base.mkdir()
    (base / "tokenizer.json").write_text((llama2_dir / "tokenizer.json").read_text())
    with pytest.raises(ZhllamaError, match="not a byte-level one"):
        tokenizer.extend(base, [zh_small], 40_000, tmp_path / "out")
    assert not (tmp_path / "out").exists()
