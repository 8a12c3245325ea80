import itertools
import json

import pytest

from zhllama.data import builtin
from zhllama.data.readers import ReadReport, iter_texts
from zhllama.errors import ZhllamaError


def test_pos_tags_and_compound_brackets_are_removed():
    line = "迈向/v  充满/v  [中央/n  人民/n  广播/vn  电台/n]nt  ——/w  １９９８年/t  新年/t  讲话/n"
    assert builtin.strip_pos_tags(line) == "迈向充满中央人民广播电台——１９９８年新年讲话"


def test_sources_yield_the_expected_documents():
    first = next(builtin.documents("all", ["peoples_daily"]))
    assert first == {"text": "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）", "source": "peoples_daily",
                     "id": "peoples_daily-0"}
    reviews = list(builtin.documents("all", ["reviews"]))
    assert {r["label"] for r in reviews} == {"pos", "neg"}
    assert len(reviews) == 35_123
    chapters = list(builtin.documents("all", ["sanguo"]))
    assert len(chapters) == 120 and chapters[0]["text"].startswith("第一回 宴桃园豪杰三结义")
    assert all("/" not in d["text"][:200] for d in itertools.islice(builtin.documents("all", ["peoples_daily"]), 50))


def test_split_is_fixed_disjoint_and_about_five_percent():
    train = {d["id"] for d in builtin.documents("train", ["reviews", "sanguo"])}
    held = {d["id"] for d in builtin.documents("heldout", ["reviews", "sanguo"])}
    assert not train & held
    assert 0.04 < len(held) / (len(train) + len(held)) < 0.06
    chapters = list(builtin.documents("all", ["sanguo"]))
    assert sorted(i for i in held if i.startswith("sanguo")) == sorted(
        d["id"] for d in chapters if builtin.is_heldout("sanguo", d["text"]))
    # By content: a review repeated in the data is on one side only (half of the reviews are repeats).
    train_texts = {d["text"] for d in builtin.documents("train", ["reviews"])}
    held_texts = {d["text"] for d in builtin.documents("heldout", ["reviews"])}
    assert len(held_texts) > 800 and not train_texts & held_texts


def test_unknown_source_or_split_is_refused():
    with pytest.raises(ZhllamaError, match="unknown split"):
        next(builtin.documents("dev"))
    with pytest.raises(ZhllamaError, match="unknown built-in source"):
        next(builtin.documents("all", ["wiki"]))


def test_malformed_jsonl_rows_are_skipped_and_reported(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "一"}\n{broken\n{"title": "no text"}\n\n{"text": "二"}\n', encoding="utf-8")
    report = ReadReport()
    assert list(iter_texts([path], report)) == ["一", "二"]
    assert report.skipped == [f"{path}:2: malformed JSON (Expecting property name enclosed in double quotes)",
                              f"{path}:3: no string `text` field"]


def test_write_jsonl_respects_max_chars(tmp_path):
    n = builtin.write_jsonl(tmp_path / "a.jsonl", "train", ["sanguo"], max_chars=30_000)
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert n == sum(len(r["text"]) for r in rows) and 30_000 <= n < 60_000
