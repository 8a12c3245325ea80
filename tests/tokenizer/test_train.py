import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from tests.tokenizer.strings import random_strings
from zhllama import tokenizer
from zhllama.data import builtin
from zhllama.errors import ZhllamaError
from zhllama.tokenizer.spm import BYTE, load_proto


def test_chinese_model_options_fit_llama(zh_train_file, tmp_path):
    out = tokenizer.train([zh_train_file], 5000, tmp_path / "zh")
    proto = load_proto(out)
    assert proto.normalizer_spec.name == "identity"
    assert proto.trainer_spec.split_digits and proto.trainer_spec.model_type == proto.trainer_spec.BPE
    assert [p.piece for p in proto.pieces[:3]] == ["<unk>", "<s>", "</s>"]
    assert not any(ch.isdigit() and len(p.piece) > 1 for p in proto.pieces for ch in p.piece)
    assert (out / "tokenizer.vocab").exists() and (out / "zhllama.json").exists()


def test_standalone_tokenizer_is_complete_and_bilingual(zh_train_file, tmp_path):
    english = builtin.write_texts(tmp_path / "en.jsonl", builtin.english_texts()[:300])
    out = tokenizer.train([zh_train_file, english], 8000, tmp_path / "standalone", standalone=True)
    proto = load_proto(out)
    assert sum(p.type == BYTE for p in proto.pieces) == 256
    fast = AutoTokenizer.from_pretrained(str(out))
    assert (fast.bos_token, fast.eos_token, fast.unk_token, fast.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    texts = random_strings(2000, seed=5)
    ids = fast(texts, split_special_tokens=True)["input_ids"]
    assert ids == [[1] + x for x in sp.encode(texts)]
    assert fast.batch_decode(ids, skip_special_tokens=True) == texts
    zh, en = "人工智能正在改变世界。", "The quick brown fox jumps over the lazy dog."
    assert len(fast(zh, add_special_tokens=False)["input_ids"]) < len(zh)
    assert len(fast(en, add_special_tokens=False)["input_ids"]) < len(en) * 0.6


def test_empty_input_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ZhllamaError, match="no text found"):
        tokenizer.train([empty], 1000, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_utf8_input_names_file_and_line(tmp_path):
    bad = tmp_path / "gbk.txt"
    bad.write_bytes("第一行\n".encode() + "第二行是GBK编码".encode("gbk") + b"\n")
    with pytest.raises(ZhllamaError, match=r"gbk\.txt:2: not UTF-8"):
        tokenizer.train([bad], 1000, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_base_that_is_not_sentencepiece_is_refused(tmp_path, zh_train_file):
    fake = tmp_path / "tokenizer.model"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    zh = tokenizer.train([zh_train_file], 5000, tmp_path / "zh")
    with pytest.raises(ZhllamaError, match="not a SentencePiece model"):
        tokenizer.merge(fake, zh, tmp_path / "out")
    assert not (tmp_path / "out").exists()
