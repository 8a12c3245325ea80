import itertools
import json
import random

import pytest

from zhllama.data import builtin
from zhllama.data.clean import DROP_REASONS, CleanConfig, clean_files, filter_reason, normalize
from zhllama.errors import ZhllamaError

from .test_dedup import edit

CFG = CleanConfig()
ENGLISH = ("Large language models are trained on a great deal of text collected from the web, and the quality of "
           "that text matters a great deal. 这里只有几个中文字。")
SPAM = {
    "too_short": "今天天气很好。",
    "symbols": "★★★★★###特价促销###★★★★★@@@@@@限时抢购■■■■■■■■※※※※※※",
    "low_cjk": ENGLISH,
    "dup_lines": "\n".join(["欢迎光临本店，全场商品八折优惠。"] * 8 + ["联系电话请见首页。"]),
    "dup_ngrams": "点击这里立即购买便宜好货！" * 20,
}


@pytest.fixture(scope="module")
def daily():
    """The first 3,000 People's Daily paragraphs of the built-in training split."""
    return [d for d in itertools.islice(builtin.documents("train", ["peoples_daily"]), 3000)]


@pytest.fixture(scope="module")
def long_daily(daily):
    return [d for d in daily if len(d["text"]) >= 300][:30]


@pytest.fixture(scope="module")
def sanguo():
    return list(itertools.islice(builtin.documents("train", ["sanguo"]), 5))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- normalisation ------------------------------------------------------------------------------------------

def test_normalize_keeps_full_width_punctuation_and_real_text(daily, sanguo):
    text = "你好，世界！（测试）这是什么？“引号”《书名》１２３　全角空格。"
    assert normalize(text) == text
    for doc in daily[:500] + sanguo:
        assert normalize(doc["text"]) == doc["text"]


def test_normalize_strips_control_characters_and_html():
    assert normalize("甲\x00乙\x07丙\u200b丁\ufeff戊\x1b") == "甲乙丙丁戊"
    assert normalize("第一行<br>第二行&nbsp;结束<p>段落</p>") == "第一行\n第二行 结束\n段落"
    assert normalize('<div class="x"><span>你好</span></div><!-- 注释 --><script>var a = 1;</script>世界') \
        == "你好\n世界"
    assert normalize("&lt;公司&gt; &amp; &#20013;&#x6587; &unknown;") == "<公司> & 中文 &unknown;"
    assert normalize("List<String> 与 x < y > z") == "List<String> 与 x < y > z"


def test_normalize_collapses_blank_lines():
    assert normalize("甲\n\n\n\n乙\n \n\u3000\n\t\n丙\n\n丁\r\n戊") == "甲\n\n乙\n\n丙\n\n丁\n戊"
    assert normalize("\n\n  \n\t开头缩进保留\n\n\n") == "\t开头缩进保留"


# --- filters ------------------------------------------------------------------------------------------------

def test_filters_keep_real_chinese_prose(daily, long_daily, sanguo):
    for doc in long_daily + sanguo:
        assert filter_reason(doc["text"], CFG) is None, doc["text"][:60]
    judged = [filter_reason(d["text"], CFG) for d in daily if len(d["text"]) >= 20]
    assert judged.count(None) / len(judged) > 0.98  # what goes is stock-price tables (low_cjk)


@pytest.mark.parametrize("reason", list(SPAM))
def test_each_filter_drops_its_spam(reason):
    assert filter_reason(normalize(SPAM[reason]), CFG) == reason


def test_top_ngram_catches_a_stuffed_word(long_daily):
    text = long_daily[0]["text"]
    stuffed = "".join(text[i:i + 4] + "哈哈" for i in range(0, len(text), 4))
    assert filter_reason(stuffed, CFG) == "top_ngram"


def test_filters_are_configurable():
    assert filter_reason(SPAM["too_short"], CleanConfig(min_chars=5)) is None
    assert filter_reason(ENGLISH, CleanConfig(min_cjk_share=0.0)) is None
    lines_off = CleanConfig(max_dup_line_share=1, max_dup_line_char_share=1)
    assert filter_reason(SPAM["dup_lines"], lines_off) == "dup_ngrams"  # the next rule still catches it
    assert filter_reason(SPAM["dup_ngrams"], CleanConfig(dup_ngram_shares=(), top_ngram_shares=())) is None


# --- the whole command --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory, long_daily, sanguo):
    """Real documents, spam, an exact copy, 5%-edited and 50%-edited copies, in a known order."""
    rng = random.Random(0)
    rows, expected = [], {}

    def add(doc_id, text, reason, **extra):
        rows.append({"id": doc_id, "text": text, **extra})
        expected[doc_id] = reason

    for i, doc in enumerate(long_daily + sanguo):
        add(f"real-{i}", doc["text"], None, label="news" if i < 30 else "novel")
    for reason, text in SPAM.items():
        add(f"spam-{reason}", text, reason)
    add("copy-0", long_daily[0]["text"], "exact_duplicate")
    add("copy-markup", long_daily[1]["text"][:50] + "<br>" + long_daily[1]["text"][50:] + "\n\n\n", "near_duplicate")
    for i, doc in enumerate(long_daily):
        add(f"near-{i}", edit(doc["text"], 0.05, rng), "near_duplicate")
    add("far-0", edit(long_daily[2]["text"], 0.5, rng), None)
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "in.jsonl", rows), expected


def test_clean_keeps_drops_and_counts(corpus, tmp_path):
    path, expected = corpus
    report = clean_files([path], tmp_path / "out.jsonl", tmp_path / "report.json", CleanConfig(workers=1))
    kept = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in kept] == [k for k, reason in expected.items() if reason is None]
    assert kept[0]["label"] == "news" and list(kept[0]) == ["id", "text", "label"]  # other fields ride along
    docs, chars = report["documents"], report["characters"]
    wanted = {reason: list(expected.values()).count(reason) for reason in DROP_REASONS}
    assert docs["dropped"] == wanted
    assert docs["in"] == len(expected) and docs["kept"] == len(kept)
    assert docs["kept"] + sum(docs["dropped"].values()) == docs["in"]
    assert chars["kept"] + sum(chars["dropped"].values()) == chars["in"]
    assert chars["written"] == sum(len(r["text"]) for r in kept)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["malformed"] == {"count": 0, "lines": []}
    assert report["seconds"] > 0 and report["docs_per_s"] > 0 and report["mb_per_s"] > 0


def test_one_worker_and_two_give_identical_results(corpus, tmp_path):
    path, _ = corpus
    one = clean_files([path], tmp_path / "one.jsonl", None, CleanConfig(workers=1, chunk_lines=7))
    two = clean_files([path], tmp_path / "two.jsonl", None, CleanConfig(workers=2, chunk_lines=7))
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    assert one["documents"] == two["documents"] and one["characters"] == two["characters"]


def test_dedup_can_be_switched_off(corpus, tmp_path):
    path, expected = corpus
    report = clean_files([path], tmp_path / "out.jsonl", None, CleanConfig(workers=1, dedup=False, near_dedup=False))
    assert report["documents"]["dropped"]["exact_duplicate"] == report["documents"]["dropped"]["near_duplicate"] == 0
    assert report["documents"]["kept"] == sum(reason in (None, "exact_duplicate", "near_duplicate")
                                              for reason in expected.values())


def test_malformed_lines_are_skipped_counted_and_named(tmp_path, long_daily):
    good = json.dumps({"id": 1, "text": long_daily[0]["text"]}, ensure_ascii=False).encode()
    lines = [good, b"", b'{"text": "unterminated', b"[1, 2]", b'{"title": "no text"}',
             '{"text": "坏'.encode() + b"\xff\xfe" + b'"}', b"   ",
             json.dumps({"id": 2, "text": long_daily[1]["text"]}, ensure_ascii=False).encode()]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    txt = tmp_path / "notes.txt"
    txt.write_bytes(long_daily[2]["text"].encode() + b"\n\xc3\x28 broken\n")
    report = clean_files([path, txt], tmp_path / "out.jsonl", None, CleanConfig(workers=1))
    assert report["documents"]["in"] == 3 and report["documents"]["kept"] == 3
    assert report["malformed"]["count"] == 5
    assert report["malformed"]["lines"] == [
        f"{path}:3: malformed JSON (Unterminated string starting at)",
        f"{path}:4: no string `text` field",
        f"{path}:5: no string `text` field",
        f"{path}:6: not UTF-8 text (byte 13)",
        f"{txt}:2: not UTF-8 text (byte 0)",
    ]
    assert read_jsonl(tmp_path / "out.jsonl")[2] == {"text": long_daily[2]["text"]}


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"{oops\n"])
def test_empty_input_stops_with_one_line_and_leaves_no_output(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(ZhllamaError, match=r"^no documents in .*empty\.jsonl") as err:
        clean_files([path], tmp_path / "out.jsonl", tmp_path / "report.json", CleanConfig(workers=1))
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_input_without_a_usable_document_is_an_error_and_leaves_no_output(tmp_path):
    blob = tmp_path / "blob.bin.txt"
    blob.write_bytes(bytes(range(256)) * 8)  # binary: control characters, then bytes that are not UTF-8
    with pytest.raises(ZhllamaError, match=r"^no usable document in .*blob\.bin\.txt \(1 read, all dropped: "
                                           r"too_short 1; 8 malformed lines skipped\)$"):
        clean_files([blob], tmp_path / "out.jsonl", tmp_path / "report.json", CleanConfig(workers=1))
    spam = tmp_path / "spam.txt"
    spam.write_text("short\nhello world, this is English text only\n", encoding="utf-8")
    with pytest.raises(ZhllamaError, match=r"spam\.txt \(2 read, all dropped: too_short 1, low_cjk 1\)$"):
        clean_files([spam], tmp_path / "out.jsonl", tmp_path / "report.json", CleanConfig(workers=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin.txt", "spam.txt"]


def test_missing_input_is_named(tmp_path):
    with pytest.raises(ZhllamaError, match="nope.jsonl: no such file"):
        clean_files([tmp_path / "nope.jsonl"], tmp_path / "out.jsonl")
    with pytest.raises(ZhllamaError, match="no input files"):
        clean_files([], tmp_path / "out.jsonl")


def test_bad_settings_and_folder_output_are_refused(corpus, tmp_path):
    path, _ = corpus
    with pytest.raises(ZhllamaError, match="between 0 and 1"):
        clean_files([path], tmp_path / "out.jsonl", None, CleanConfig(min_cjk_share=30))
    with pytest.raises(ZhllamaError, match="is a folder"):
        clean_files([path], tmp_path, None, CleanConfig(workers=1))
