"""SFT readers: seed CSV, Alpaca JSON/JSONL, ShareGPT; bad rows are skipped with file and line."""

from __future__ import annotations

import csv
import json

import pytest

from zhllama.data.conversations import parse_atom_text, read_conversations, record_to_messages
from zhllama.data.readers import ReadReport
from zhllama.errors import ZhllamaError


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def write_csv(path, texts, header=("text",)):
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, quoting=csv.QUOTE_ALL, lineterminator="\n")
        w.writerow(header)
        for t in texts:
            w.writerow([t] if len(header) == 1 else ["x", t])
    return path


def write_jsonl(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------
# Seed CSV


def test_csv_single_multi_system_and_bad_row(tmp_path):
    single = "<s>Human: 用一句话描述地球。\n</s><s>Assistant: 因为地球有生命。\n</s>"
    multi = (
        "<s>Human: 你好\n</s><s>Assistant: 你好！有什么可以帮你？\n</s>"
        "<s>Human: 第一行\n第二行\n</s><s>Assistant: 答：\n\n多行回答\n</s>"
    )
    system = "<s>System: 你是助手。\n</s><s>Human: 问\n</s><s>Assistant: 答\n</s>"
    bad = "没有标记的文本"
    path = write_csv(tmp_path / "seed.csv", [single, multi, bad, system])
    # header on line 1; a quoted row spans one line more than its newlines: single 2-4, multi 5-12, bad 13
    assert 2 + (single.count("\n") + 1) + (multi.count("\n") + 1) == 13
    report = ReadReport()
    convs = read_conversations([path], report)
    assert convs == [
        [U("用一句话描述地球。"), A("因为地球有生命。")],
        [U("你好"), A("你好！有什么可以帮你？"), U("第一行\n第二行"), A("答：\n\n多行回答")],
        [S("你是助手。"), U("问"), A("答")],
    ]
    assert len(report.skipped) == 1
    assert report.skipped[0].startswith(f"{path}:13: ")


def test_csv_bad_order_junk_and_text_column_position(tmp_path):
    rows = [
        "<s>Assistant: 先答\n</s><s>Human: 后问\n</s>",  # wrong order
        "<s>Human: 问\n</s>垃圾<s>Assistant: 答\n</s>",  # text between turns
        "<s>Human: 只有问题\n</s>",  # no reply
        "<s>Human: 好的\n</s><s>Assistant: 好\n</s>",
    ]
    path = write_csv(tmp_path / "two_cols.csv", rows, header=("id", "text"))
    report = ReadReport()
    assert read_conversations([path], report) == [[U("好的"), A("好")]]
    where = [s.split(": ", 1)[0] for s in report.skipped]
    assert where == [f"{path}:2", f"{path}:5", f"{path}:8"]  # each row spans 3 lines
    assert "expected role 'user'" in report.skipped[0]
    assert "垃圾" in report.skipped[1]
    assert "no assistant reply" in report.skipped[2]


def test_csv_without_text_column(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("prompt,answer\na,b\n", encoding="utf-8")
    with pytest.raises(ZhllamaError, match="no `text` column"):
        read_conversations([path])


def test_csv_not_utf8_names_file(tmp_path):
    path = tmp_path / "gbk.csv"
    path.write_bytes('text\n"<s>Human: 你好\n</s>"\n'.encode("gbk"))
    with pytest.raises(ZhllamaError, match=r"gbk\.csv:2: not UTF-8"):
        read_conversations([path])


def test_parse_atom_text_strips_only_one_newline():
    assert parse_atom_text("<s>Human: a\n\n</s><s>Assistant: b</s>") == [U("a\n"), A("b")]
    with pytest.raises(ZhllamaError):
        parse_atom_text("plain text")


# --------------------------------------------------------------------------------------------------------------
# Alpaca


ALPACA = [
    {"instruction": "翻译成英文", "input": "你好，世界", "output": "Hello, world"},
    {"instruction": "讲个笑话", "input": "", "output": "好的……"},
    {
        "instruction": "那北京呢？",
        "output": "北京是中国的首都。",
        "history": [["上海在哪里？", "上海在中国东部。"]],
        "system": "你是地理老师。",
    },
]
ALPACA_EXPECTED = [
    [U("翻译成英文\n你好，世界"), A("Hello, world")],
    [U("讲个笑话"), A("好的……")],
    [S("你是地理老师。"), U("上海在哪里？"), A("上海在中国东部。"), U("那北京呢？"), A("北京是中国的首都。")],
]


def test_alpaca_json_array(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA, ensure_ascii=False, indent=2), encoding="utf-8")
    assert read_conversations([path]) == ALPACA_EXPECTED


def test_alpaca_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    assert read_conversations([path]) == ALPACA_EXPECTED


def test_json_suffix_holding_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.json", ALPACA)
    assert read_conversations([path]) == ALPACA_EXPECTED


def test_json_array_bad_record_reports_its_line(tmp_path):
    path = tmp_path / "arr.json"
    records = [ALPACA[0], {"instruction": "缺少输出"}, ALPACA[1]]
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    lines = path.read_text(encoding="utf-8").splitlines()
    second = [i for i, ln in enumerate(lines, 1) if ln == "  {"][1]  # the line where record 2 starts
    report = ReadReport()
    assert read_conversations([path], report) == [ALPACA_EXPECTED[0], ALPACA_EXPECTED[1]]
    assert report.skipped == [f"{path}:{second}: `output` must be a string, got NoneType"]


def test_json_array_syntax_error_is_fatal(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": \n]', encoding="utf-8")
    with pytest.raises(ZhllamaError, match=r"broken\.json:4: malformed JSON"):
        read_conversations([path])


# --------------------------------------------------------------------------------------------------------------
# ShareGPT and messages


def test_sharegpt_conversations_and_messages(tmp_path):
    records = [
        {
            "conversations": [
                {"from": "system", "value": "你是一个乐于助人的助手。"},
                {"from": "human", "value": "什么是大语言模型？"},
                {"from": "gpt", "value": "大语言模型是……"},
                {"from": "human", "value": "举个例子"},
                {"from": "gpt", "value": "例如 Llama 2。"},
            ]
        },
        {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "你好"}], "id": "x"},
        {
            "messages": [
                {"role": "system", "content": "简洁回答"},
                {"role": "user", "content": "1+1=?"},
                {"role": "assistant", "content": "2", "weight": 1},
            ]
        },
    ]
    path = write_jsonl(tmp_path / "sharegpt.jsonl", records)
    assert read_conversations([path]) == [
        [
            S("你是一个乐于助人的助手。"),
            U("什么是大语言模型？"),
            A("大语言模型是……"),
            U("举个例子"),
            A("例如 Llama 2。"),
        ],
        [U("hi"), A("你好")],
        [S("简洁回答"), U("1+1=?"), A("2")],
    ]


def test_jsonl_bad_lines_are_skipped_with_file_and_line(tmp_path):
    good = {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}]}
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps(good, ensure_ascii=False),  # 1
        '{"conversations": [',  # 2 malformed JSON
        "",  # 3 blank, ignored
        json.dumps({"messages": [{"role": "assistant", "content": "先答"}, {"role": "user", "content": "后问"}]}),  # 4
        json.dumps({"conversations": [{"from": "bing", "value": "?"}, {"from": "gpt", "value": "答"}]}),  # 5
        json.dumps({"text": "no known fields"}),  # 6
        json.dumps(["not", "an", "object"]),  # 7
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8") + b"\xff\xfe bad bytes\n")  # 8 not UTF-8
    report = ReadReport()
    assert read_conversations([path], report) == [[U("问"), A("答")]]
    where = [s.split(": ", 1)[0] for s in report.skipped]
    assert where == [f"{path}:{n}" for n in (2, 4, 5, 6, 7, 8)]
    assert "malformed JSON" in report.skipped[0]
    assert "expected role 'user'" in report.skipped[1]
    assert "unknown `from` 'bing'" in report.skipped[2]
    assert "no `instruction`, `conversations` or `messages`" in report.skipped[3]
    assert "expected a JSON object" in report.skipped[4]
    assert "not UTF-8" in report.skipped[5]


def test_record_to_messages_direct():
    assert record_to_messages({"instruction": "问", "output": "答"}) == [U("问"), A("答")]
    with pytest.raises(ZhllamaError, match="history"):
        record_to_messages({"instruction": "问", "output": "答", "history": [["only one"]]})


# --------------------------------------------------------------------------------------------------------------
# Several files, empty dataset, errors


def test_several_files_in_order(tmp_path):
    a = write_csv(tmp_path / "a.csv", ["<s>Human: 甲\n</s><s>Assistant: 乙\n</s>"])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "丙", "output": "丁"}])
    assert read_conversations([a, str(b)]) == [[U("甲"), A("乙")], [U("丙"), A("丁")]]


def test_empty_dataset_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    bad = write_csv(tmp_path / "bad.csv", ["no markers", "<s>Human: 只有问题\n</s>"])
    report = ReadReport()
    with pytest.raises(ZhllamaError, match=r"no conversations in .*empty\.jsonl, .*bad\.csv \(2 rows skipped"):
        read_conversations([empty, bad], report)
    assert len(report.skipped) == 2
    header_only = write_csv(tmp_path / "header.csv", [])
    with pytest.raises(ZhllamaError, match=r"\(0 rows skipped\)"):
        read_conversations([header_only])
    empty_array = tmp_path / "arr.json"
    empty_array.write_text("[ ]\n", encoding="utf-8")
    with pytest.raises(ZhllamaError, match="no conversations"):
        read_conversations([empty_array])


def test_file_errors(tmp_path):
    with pytest.raises(ZhllamaError, match="no input files"):
        read_conversations([])
    with pytest.raises(ZhllamaError, match="no such file"):
        read_conversations([tmp_path / "missing.jsonl"])
    other = tmp_path / "data.txt"
    other.write_text("x\n", encoding="utf-8")
    with pytest.raises(ZhllamaError, match="unsupported SFT file type"):
        read_conversations([other])


def test_chinese_and_bom_survive_exactly(tmp_path):
    text = "「中文」标点，全角　空格、emoji 🐉 与繁體字\t制表符"
    path = tmp_path / "bom.jsonl"
    line = json.dumps({"instruction": text, "output": text}, ensure_ascii=False)
    path.write_bytes(b"\xef\xbb\xbf" + line.encode("utf-8") + b"\r\n")
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(
        b"\xef\xbb\xbf" + f'"text"\r\n"<s>Human: {text}\r\n</s><s>Assistant: {text}\r\n</s>"\r\n'.encode()
    )
    assert read_conversations([path, csv_path]) == [[U(text), A(text)], [U(text), A(text)]]


# --------------------------------------------------------------------------------------------------------------
# Tool calls: LLaMA-Factory's format and OpenAI-style messages

WEATHER_FN = {"name": "get_weather", "description": "查询天气",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
WEATHER_TOOL = {"type": "function", "function": WEATHER_FN}


def CALL(*calls):
    return {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}


def T(text):
    return {"role": "tool", "content": text}


def test_llama_factory_tool_records(tmp_path):
    def call(name, arguments):
        return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)

    good = {"conversations": [{"from": "human", "value": "北京天气？"},
                              {"from": "function_call", "value": call("get_weather", {"city": "北京"})},
                              {"from": "observation", "value": '{"temp": 20}'},
                              {"from": "gpt", "value": "20度。"}],
            "tools": json.dumps([WEATHER_FN], ensure_ascii=False), "system": "你是助手。"}
    parallel = {"conversations": [{"from": "human", "value": "两地？"},
                                  {"from": "function_call", "value": json.dumps(
                                      [{"name": "get_weather", "arguments": {"city": "北京"}},
                                       {"name": "get_weather", "arguments": '{"city": "上海"}'}])},
                                  {"from": "observation", "value": "[20, 25]"}, {"from": "gpt", "value": "好。"}],
                "tools": [WEATHER_TOOL]}
    no_tools = {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}], "tools": ""}
    bad = [
        {**good, "tools": "[{"},
        {**good, "tools": json.dumps([{"description": "no name"}])},
        {"conversations": [good["conversations"][0], {"from": "function_call", "value": "{not json"}]},
        {"conversations": [good["conversations"][0], {"from": "function_call", "value": '{"name": "f"}'}]},
        {"conversations": [good["conversations"][0], {"from": "function_call", "value": call("f", "[1]")}]},
        {"conversations": [good["conversations"][0], {"from": "gpt", "value": "答"},
                           {"from": "observation", "value": "{}"}, {"from": "gpt", "value": "答"}]},
        {"conversations": [good["conversations"][0], good["conversations"][1], {"from": "human", "value": "?"}]},
    ]
    path = write_jsonl(tmp_path / "tools.jsonl", [good, parallel, no_tools, *bad])
    report = ReadReport()
    got = read_conversations([path], report)
    assert got == [[S("你是助手。"), U("北京天气？"), CALL(("get_weather", {"city": "北京"})), T('{"temp": 20}'),
                    A("20度。")],
                   [U("两地？"), CALL(("get_weather", {"city": "北京"}), ("get_weather", {"city": "上海"})),
                    T("[20, 25]"), A("好。")],
                   [U("你好"), A("你好！")]]
    assert [c.tools for c in got] == [[WEATHER_TOOL], [WEATHER_TOOL], None]
    assert report.skipped == [
        f"{path}:4: `tools` is not valid JSON (Expecting property name enclosed in double quotes)",
        f"{path}:5: `tools`: tool 0: function name must be a non-empty string, got None",
        f"{path}:6: conversations item 1 (function_call): not valid JSON (Expecting property name enclosed in "
        "double quotes)",
        f'{path}:7: conversations item 1 (function_call): expected {{"name": …, "arguments": {{…}}}} or a '
        "non-empty list of them",
        f"{path}:8: message 1 (assistant): tool call 0 (f): arguments must be a JSON object, got list",
        f"{path}:9: message 2: expected role 'user' (not 'tool'); a tool message follows an assistant message with "
        "tool_calls, or another tool message",
        f"{path}:10: message 2: expected role 'tool' (not 'user'); an assistant message with tool_calls is followed "
        "by tool messages with the results",
    ]


def test_openai_tool_messages(tmp_path):
    record = {"messages": [
        U("北京天气？"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"北京"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "晴"}, A("晴天。")], "tools": [WEATHER_TOOL]}
    path = write_jsonl(tmp_path / "openai.jsonl", [record, {**record, "tools": {"a": 1}},
                                                   {"messages": record["messages"][:1] + [T("晴")]}])
    report = ReadReport()
    (got,) = read_conversations([path], report)
    assert got == [U("北京天气？"), {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
        {"role": "tool", "content": "晴", "tool_call_id": "call_1"}, A("晴天。")]
    assert got.tools == [WEATHER_TOOL]
    assert report.skipped == [
        f"{path}:2: `tools`: tools must be a list of {{'type': 'function', 'function': {{...}}}} schemas, got dict",
        f"{path}:3: message 1: expected role 'assistant' (not 'tool'); a tool message follows an assistant message "
        "with tool_calls, or another tool message"]
    assert record_to_messages({"messages": [U("a"), A("b")]}).tools is None
