import json

import pytest
from transformers import AutoTokenizer

from zhllama import tokenizer
from zhllama.cli import main
from zhllama.data import builtin
from zhllama.errors import ZhllamaError


def test_stats_counts_match_a_direct_count(llama2_dir, extended_dir, tmp_path):
    zh_texts = [d["text"] for d in builtin.documents("heldout", ["sanguo"])]
    zh = builtin.write_texts(tmp_path / "zh.jsonl", zh_texts)
    en = builtin.write_texts(tmp_path / "en.jsonl", builtin.english_texts()[:50])
    rows = tokenizer.stats([llama2_dir, extended_dir / "tokenizer.model"], zh=[zh], en=[en],
                           names=["base", "ext-spm"])
    base, ext = rows
    fast = AutoTokenizer.from_pretrained(str(llama2_dir))
    direct = sum(len(fast(t, add_special_tokens=False)["input_ids"]) for t in zh_texts)
    assert base.tokens["zh"] == direct
    assert base.tokens_per_char["zh"] == direct / sum(map(len, zh_texts))
    assert (base.backend, ext.backend) == ("hf-fast", "sentencepiece")
    assert ext.vocab_size == 34_000 and base.vocab_size == 32_000
    assert ext.tokens["en"] == base.tokens["en"]
    assert ext.tokens["zh"] < base.tokens["zh"]
    assert base.lossless and ext.lossless


def test_stats_cli_prints_the_table_and_writes_json(llama2_dir, extended_dir, tmp_path, capsys):
    zh = builtin.write_texts(tmp_path / "zh.jsonl", ["中文分词的效率。", "三国演义是一部小说。"])
    code = builtin.write_texts(tmp_path / "code.jsonl", builtin.code_texts()[:1])
    out = tmp_path / "stats.json"
    with pytest.raises(SystemExit) as done:
        main(["tokenizer", "stats", "--tokenizer", str(llama2_dir), str(extended_dir), "--zh", str(zh),
              "--code", str(code), "--json", str(out)])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "| tokenizer | vocab | zh tok/char | code tok/char |" in printed
    rows = json.loads(out.read_text())
    assert [r["vocab_size"] for r in rows] == [32_000, 34_000]
    assert rows[0]["tokens"]["code"] == rows[1]["tokens"]["code"]


def _corpora(tmp_path):
    zh = builtin.write_texts(tmp_path / "zh.jsonl", [d["text"] for d in builtin.documents("heldout")][:100])
    en = builtin.write_texts(tmp_path / "en.jsonl", builtin.english_texts()[:30])
    code = builtin.write_texts(tmp_path / "code.jsonl", builtin.code_texts()[:5])
    return {"zh": [zh], "en": [en], "code": [code]}


def test_stats_on_a_gguf_equal_stats_on_its_from_gguf_folder(llama3_gguf, llama3_dir, llama2_gguf, llama2_dir,
                                                            tmp_path):
    corpora = _corpora(tmp_path)
    rows = tokenizer.stats([llama3_gguf, llama3_dir, llama2_gguf, llama2_dir], **corpora)
    l3_gguf, l3_dir, l2_gguf, l2_dir = rows
    for from_file, from_dir in ((l3_gguf, l3_dir), (l2_gguf, l2_dir)):
        assert from_file.tokens == from_dir.tokens and from_file.tokens_per_char == from_dir.tokens_per_char
        assert from_file.vocab_size == from_dir.vocab_size and from_file.backend == from_dir.backend == "hf-fast"
        assert from_file.lossless and from_dir.lossless
    assert l3_dir.vocab_size == 128_256 and not (llama3_dir / "tokenizer.model").exists()
    # Llama-3's 128k byte-level vocabulary covers Chinese far better than Llama-2's 32k (700 Han pieces).
    assert l3_gguf.tokens_per_char["zh"] < l2_gguf.tokens_per_char["zh"]


def test_stats_refuses_a_file_that_is_no_tokenizer(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    zh = builtin.write_texts(tmp_path / "zh.jsonl", ["中文"])
    with pytest.raises(ZhllamaError, match="not a GGUF file nor a readable tokenizer.model") as err:
        tokenizer.stats([bad], zh=[zh])
    assert "\n" not in str(err.value)
    with pytest.raises(ZhllamaError, match="neither an HF tokenizer folder, a GGUF file nor a tokenizer.model"):
        tokenizer.stats([tmp_path / "missing"], zh=[zh])
