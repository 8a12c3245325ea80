import json

import pytest
from transformers import AutoTokenizer

from zhllama import tokenizer
from zhllama.cli import main
from zhllama.data import builtin


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
