"""Preference pairs: the three record formats, bad records skipped with file and line, tokenization of both sides."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zhllama.chat import IGNORE_INDEX, get_template, tokenize_conversation
from zhllama.data.preference import (
    SKIP_KINDS,
    PreferenceExamples,
    PreferencePair,
    _drop_turns,
    read_preference_pairs,
    skip_kind,
    tokenize_pairs,
)
from zhllama.data.readers import ReadReport
from tests.data.test_conversations import A, S, U
from zhllama.errors import ZhllamaError
from zhllama.model.loading import load_tokenizer


def write_jsonl(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(llama2_dir):
    return load_tokenizer(llama2_dir)


# --------------------------------------------------------------------------------------------------------------
# Reading

SHAREGPT = [
    {  # LLaMA-Factory's dpo_zh_demo.json layout, with a system item
        "conversations": [{"from": "system", "value": "你是助手。"}, {"from": "human", "value": "天空为什么是蓝的？"}],
        "chosen": {"from": "gpt", "value": "因为瑞利散射。"},
        "rejected": {"from": "gpt", "value": "因为大海。"},
    },
    {  # top-level system, multi-turn, role/content and plain-string replies
        "system": "简洁回答",
        "conversations": [{"from": "human", "value": "1+1=?"}, {"from": "gpt", "value": "2"},
                          {"role": "user", "content": "再加一呢？"}],
        "chosen": {"role": "assistant", "content": "3"},
        "rejected": "4",
    },
]
SHAREGPT_EXPECTED = [
    PreferencePair([S("你是助手。"), U("天空为什么是蓝的？")], "因为瑞利散射。", "因为大海。"),
    PreferencePair([S("简洁回答"), U("1+1=?"), A("2"), U("再加一呢？")], "3", "4"),
]


def test_sharegpt_preference_json_array(tmp_path):
    path = tmp_path / "dpo.json"
    path.write_text(json.dumps(SHAREGPT, ensure_ascii=False, indent=2), encoding="utf-8")
    assert read_preference_pairs([path]) == SHAREGPT_EXPECTED


def test_alpaca_and_messages_jsonl(tmp_path):
    records = [
        {"instruction": "翻译成英文", "input": "你好", "chosen": "Hello", "rejected": "Goodbye"},
        {"instruction": "那北京呢？", "input": "", "system": "你是地理老师。", "history": [["上海在哪里？", "东部。"]],
         "chosen": "北京在华北。", "rejected": "不知道。"},
        {"messages": [S("s"), U("问"), A("答"), U("再问")], "chosen": A("好答"), "rejected": "坏答"},
        {"prompt": "天空是什么颜色？", "chosen": "蓝色。", "rejected": "绿色。"},  # TRL, standard
        {"prompt": [U("天空是什么颜色？")], "chosen": [A("蓝色。")], "rejected": [A("绿色。")]},  # TRL, conversational
    ]
    assert read_preference_pairs([write_jsonl(tmp_path / "p.jsonl", records)]) == [
        PreferencePair([U("翻译成英文\n你好")], "Hello", "Goodbye"),
        PreferencePair([S("你是地理老师。"), U("上海在哪里？"), A("东部。"), U("那北京呢？")],
                       "北京在华北。", "不知道。"),
        PreferencePair([S("s"), U("问"), A("答"), U("再问")], "好答", "坏答"),
        PreferencePair([U("天空是什么颜色？")], "蓝色。", "绿色。"),
        PreferencePair([U("天空是什么颜色？")], "蓝色。", "绿色。"),
    ]


def test_single_object_json(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(SHAREGPT[0], ensure_ascii=False, indent=2), encoding="utf-8")
    assert read_preference_pairs([path]) == SHAREGPT_EXPECTED[:1]


def test_bad_jsonl_records_are_skipped_with_file_line_and_kind(tmp_path):
    good = {"instruction": "问", "chosen": "好", "rejected": "坏"}
    lines = [
        good,  # 1
        '{"instruction": ',  # 2
        "",  # 3 blank, ignored
        {"instruction": "问", "rejected": "坏"},  # 4
        {"instruction": "问", "chosen": "好"},  # 5
        {"instruction": "问", "chosen": 3, "rejected": "坏"},  # 6
        {"instruction": "问", "chosen": {"from": "human", "value": "好"}, "rejected": "坏"},  # 7
        {"instruction": "问", "chosen": "好", "rejected": " \n"},  # 8
        {"instruction": "问", "chosen": "一样", "rejected": "一样 "},  # 9
        {"messages": [U("问"), A("答")], "chosen": "好", "rejected": "坏"},  # 10
        {"conversations": [{"from": "bing", "value": "?"}], "chosen": "好", "rejected": "坏"},  # 11
        {"messages": [A("先答"), U("后问")], "chosen": "好", "rejected": "坏"},  # 12
        ["not", "an", "object"],  # 13
        {"question": "问", "chosen": "好", "rejected": "坏"},  # 14
        {"instruction": 5, "chosen": "好", "rejected": "坏"},  # 15
        {"messages": [S("只有系统")], "chosen": "好", "rejected": "坏"},  # 16
        {"instruction": "问", "chosen": "好", "rejected": {"role": "assistant", "content": None}},  # 17
        {"instruction": "问", "chosen": "", "rejected": "坏"},  # 18
    ]
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, lines)
    path.write_bytes(path.read_bytes() + b"\xff\xfe bad bytes\n")  # 19
    report = ReadReport()
    assert read_preference_pairs([path], report) == [PreferencePair([U("问")], "好", "坏")]
    p = str(path)
    assert report.skipped == [
        f"{p}:2: malformed JSON (Expecting value)",
        f"{p}:4: no `chosen`",
        f"{p}:5: no `rejected`",
        f"{p}:6: bad `chosen`: expected a string or an assistant message, got int",
        f"{p}:7: bad `chosen`: speaker 'human' is not an assistant (gpt, assistant)",
        f"{p}:8: empty `rejected` reply",
        f"{p}:9: `chosen` equals `rejected`",
        f"{p}:10: prompt does not end with a user turn (its last message is the assistant's)",
        f"{p}:11: bad prompt: conversations item 0: unknown `from` 'bing' "
        "(expected one of human, user, gpt, assistant, system, function_call, observation, tool)",
        f"{p}:12: bad prompt: message 0: expected role 'user' (not 'assistant'); "
        "roles must be an optional system message, then user/assistant alternating, starting with user",
        f"{p}:13: not a JSON object (got list)",
        f"{p}:14: no `instruction`, `conversations`, `messages` or `prompt` field",
        f"{p}:15: bad prompt: `instruction` must be a string, got int",
        f"{p}:16: bad prompt: a conversation needs at least one user message",
        f"{p}:17: bad `rejected`: content must be a string, got NoneType",
        f"{p}:18: empty `chosen` reply",
        f"{p}:19: not UTF-8 text",
    ]
    kinds = [skip_kind(entry) for entry in report.skipped]
    assert set(kinds) == set(SKIP_KINDS)


def test_json_array_bad_record_reports_the_line_it_starts_on(tmp_path):
    records = [SHAREGPT[0], {**SHAREGPT[0], "rejected": {"from": "gpt", "value": ""}}, SHAREGPT[1]]
    path = tmp_path / "arr.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    second = [i for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if ln == "  {"][1]
    report = ReadReport()
    assert read_preference_pairs([path], report) == SHAREGPT_EXPECTED
    assert report.skipped == [f"{path}:{second}: empty `rejected` reply"]


def test_csv_other_types_and_empty_data_are_refused(tmp_path):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("prompt,chosen,rejected\na,b,c\n", encoding="utf-8")
    with pytest.raises(ZhllamaError, match=r"pairs\.csv: preference data has no CSV format"):
        read_preference_pairs([csv_path])
    txt = tmp_path / "pairs.txt"
    txt.write_text("x\n", encoding="utf-8")
    with pytest.raises(ZhllamaError, match=r"unsupported preference file type '\.txt'"):
        read_preference_pairs([txt])
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "问", "output": "答"}])
    with pytest.raises(ZhllamaError, match=r"no preference pairs in .*sft\.jsonl \(1 records skipped; first: "
                                           r".*sft\.jsonl:1: no `chosen`\)"):
        read_preference_pairs([sft])
    with pytest.raises(ZhllamaError, match="no input files"):
        read_preference_pairs([])


# --------------------------------------------------------------------------------------------------------------
# Tokenizing

PROMPT = [S("你是助手。"), U("你好"), A("你好！有什么可以帮你？"), U("天空为什么是蓝的？")]
PAIR = PreferencePair(PROMPT, "因为瑞利散射。", "因为大海是蓝的。")


def targets(labels):
    return [int(x) for x in labels if x != IGNORE_INDEX]


def first_target(labels):
    return int((np.asarray(labels) != IGNORE_INDEX).argmax())


@pytest.mark.parametrize("name", ["atom", "llama2", "chatml"])
def test_pair_sides_are_sft_renderings_with_only_the_final_reply_a_target(name, tok):
    ex = tokenize_pairs(tok, name, [PAIR], 512, progress=False)
    assert len(ex) == 1 and ex.counts()["truncated"] == 0
    for ids, labels, reply in [(ex.chosen_ids[0], ex.chosen_labels[0], PAIR.chosen),
                               (ex.rejected_ids[0], ex.rejected_labels[0], PAIR.rejected)]:
        assert ids.dtype == labels.dtype == np.int64
        sft = tokenize_conversation(tok, name, PROMPT + [A(reply)])
        assert ids.tolist() == sft["input_ids"]
        # SFT labels both replies; here only the final one, token for token, is a target
        start = first_target(labels)
        assert len(targets(sft["labels"])) > len(targets(labels)) == len(ids) - start - (name == "chatml")
        assert labels[0] == IGNORE_INDEX and labels[start:].tolist() == sft["labels"][start:]
        assert (labels[:start] == IGNORE_INDEX).all()
        stop = get_template(name).stop[0]
        assert tok.decode(targets(labels), skip_special_tokens=False).strip() == (reply + "\n" * (name == "atom")
                                                                                 + " " * (name == "llama2") + stop)
    # the same prompt tokens on both sides
    c, r = first_target(ex.chosen_labels[0]), first_target(ex.rejected_labels[0])
    assert c == r and ex.chosen_ids[0][:c].tolist() == ex.rejected_ids[0][:r].tolist()
    prompt_text = get_template(name).render(PROMPT, add_generation_prompt=True)
    if name == "llama2":  # its reply segment starts with the space, so the prompt is a token prefix
        assert ex.chosen_ids[0][:c].tolist() == tok(prompt_text, add_special_tokens=False)["input_ids"]


def test_truncation_drops_the_same_turns_on_both_sides(tok):
    prompt = [S("你是助手。")]
    for i in range(3):
        prompt += [U(f"第{i}个问题"), A(f"第{i}个回答")]
    prompt.append(U("最后的问题"))
    pair = PreferencePair(prompt, "短", "很长的回答" * 20)
    kept = [prompt[0], *prompt[5:]]  # the two oldest turns dropped
    seq_len = len(tokenize_conversation(tok, "atom", kept + [A(pair.rejected)])["input_ids"])
    # alone, the chosen side fits untouched: it is re-tokenized with the rejected side's two turns dropped
    assert tokenize_conversation(tok, "atom", prompt + [A(pair.chosen)], max_len=seq_len)["dropped_turns"] == 0
    assert tokenize_conversation(tok, "atom", prompt + [A(pair.rejected)], max_len=seq_len)["dropped_turns"] == 2
    ex = tokenize_pairs(tok, "atom", [pair], seq_len, progress=False)
    assert (ex.pairs, len(ex), ex.truncated, ex.dropped_turns, ex.too_long, ex.no_target) == (1, 1, 1, 2, 0, 0)
    for ids, reply in [(ex.chosen_ids[0], pair.chosen), (ex.rejected_ids[0], pair.rejected)]:
        assert ids.tolist() == tokenize_conversation(tok, "atom", kept + [A(reply)])["input_ids"]
        text = tok.decode(ids)
        assert "第0个问题" not in text and "第1个" not in text and "第2个问题" in text and "你是助手" in text
    assert len(ex.rejected_ids[0]) == seq_len


def test_too_long_pairs_are_skipped_and_counted(tok, capsys):
    pairs = [PAIR, PreferencePair([U("问")], "短", "很长的回答" * 40), PreferencePair([U("问" * 200)], "好", "坏")]
    ex = tokenize_pairs(tok, "llama2", pairs, 64, progress=False)
    assert ex.counts() == {"pairs": 3, "examples": 1, "truncated": 1, "dropped_turns": 1, "skipped_too_long": 2,
                           "skipped_no_target": 0, "tokens": int(ex.lengths()[0]),
                           "target_tokens": len(targets(ex.chosen_labels[0])) + len(targets(ex.rejected_labels[0]))}
    ex.warn(64)
    assert capsys.readouterr().err == (
        "warning: 1 preference pairs were longer than seq_len=64; dropped 1 of their oldest turns (the same on both "
        "sides)\nwarning: skipped 2 preference pairs whose last user turn with the longer reply alone is longer "
        "than seq_len=64\n")


def test_control_token_strings_in_replies_are_plain_text(tok):
    pair = PreferencePair([U("你好")], "好的</s><s>Human: 再见", "<|im_end|>不行")
    ex = tokenize_pairs(tok, "atom", [pair], 128, progress=False)
    for ids, labels, reply in [(ex.chosen_ids[0], ex.chosen_labels[0], pair.chosen),
                               (ex.rejected_ids[0], ex.rejected_labels[0], pair.rejected)]:
        # the template's two turns only: <s>Human: …\n</s><s>Assistant: …\n</s>
        assert (ids == tok.bos_token_id).sum() == 2 and (ids == tok.eos_token_id).sum() == 2
        assert targets(labels)[-1] == tok.eos_token_id and targets(labels).count(tok.eos_token_id) == 1
        assert tok.decode(targets(labels), skip_special_tokens=False).strip() == reply + "\n</s>"
    # 好 的 '</' 's' '>' '<' 's' '>' H uman : ▁ 再 见(3 bytes) \n </s>, as SFT labels the same reply
    assert targets(ex.chosen_labels[0]) == [31076, 30210, 829, 29879, 29958, 29966, 29879, 29958, 29950, 7889, 29901,
                                            29871, 31733, 235, 170, 132, 13, 2]


def test_examples_subset_lengths_and_bad_input(tok):
    pairs = [PAIR, PreferencePair([U("问")], "是", "否")]
    ex = tokenize_pairs(tok, "chatml", pairs, 256, progress=False)
    assert ex.lengths().dtype == np.int64
    assert ex.lengths().tolist() == [len(ex.chosen_ids[i]) + len(ex.rejected_ids[i]) for i in range(2)]
    sub = ex.subset([1])
    assert isinstance(sub, PreferenceExamples) and len(sub) == 1
    assert sub.rejected_ids[0] is ex.rejected_ids[1] and sub.chosen_labels[0] is ex.chosen_labels[1]
    # a hand-made pair that is not a prompt ending with a user turn is an error, not a "too long" skip
    with pytest.raises(ZhllamaError, match="preference pair 0: message 2: expected role 'user'"):
        tokenize_pairs(tok, "chatml", [PreferencePair([U("问"), A("答")], "是", "否")], 256, progress=False)
    with pytest.raises(ZhllamaError, match="chat template llama3 needs the special tokens"):
        tokenize_pairs(tok, "llama3", pairs, 256, progress=False)


def test_dropping_old_turns_keeps_tool_exchanges_whole():
    """A turn runs from one user message to the next: its tool calls and results go with it."""
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    result = {"role": "tool", "content": "42"}
    prompt = [S("sys"), U("q1"), call, result, A("a1"), U("q2"), A("a2"), U("q3")]
    assert _drop_turns(prompt, 0) == prompt
    assert _drop_turns(prompt, 1) == [S("sys"), U("q2"), A("a2"), U("q3")]
    assert _drop_turns(prompt, 2) == [S("sys"), U("q3")]
    assert _drop_turns(prompt[1:], 1) == [U("q2"), A("a2"), U("q3")]
