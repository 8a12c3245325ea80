import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from tests.tokenizer.strings import random_strings
from zhllama import tokenizer
from zhllama.errors import ZhllamaError
from zhllama.tokenizer.spm import CONTROL, load_proto


def test_pad_to_multiple_gives_control_pieces_that_encoding_never_produces(llama2_dir, zh_train_file, tmp_path):
    out = tokenizer.extend(llama2_dir, [zh_train_file], 33_000, tmp_path / "padded", pad_to_multiple=64)
    proto = load_proto(out)
    assert len(proto.pieces) == 33_024  # 33,000 rounded up to a multiple of 64
    pads = range(33_000, 33_024)
    assert all(proto.pieces[i].type == CONTROL for i in pads)
    fast = AutoTokenizer.from_pretrained(str(out))
    assert len(fast) == 33_024
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    texts = random_strings(2000, seed=3) + [proto.pieces[i].piece for i in pads] + ["<pad_33001> 中文"]
    fast_ids = fast(texts, split_special_tokens=True)["input_ids"]
    produced = {i for ids in fast_ids for i in ids} | {i for ids in sp.encode(texts) for i in ids}
    assert not produced & set(pads)


def test_vocab_size_not_above_base_is_refused(llama2_dir, zh_train_file, tmp_path):
    with pytest.raises(ZhllamaError, match="not larger than the base vocabulary"):
        tokenizer.extend(llama2_dir, [zh_train_file], 32_000, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_corpus_too_small_for_the_size_is_a_clear_error(llama2_dir, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("中文分词器。\n" * 50, encoding="utf-8")
    with pytest.raises(ZhllamaError, match="yields only .* new Chinese pieces"):
        tokenizer.extend(llama2_dir, [small], 40_000, tmp_path / "out")
    assert not (tmp_path / "out").exists()
