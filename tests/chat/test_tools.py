"""Tool calling in the chat templates: chatml writes Qwen2.5's format and llama3 Meta's Llama 3.1 format, character
for character what their own templates write (rendered with transformers); Python == Jinja; calls are loss
targets and results are not; atom and llama2 refuse tools; parse_tool_calls reads a generated reply back."""

from __future__ import annotations

import copy
import json
import random
import re

import pytest
from jinja2 import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

from tests.chat.test_templates import target_runs
from zhllama.chat import (
    IGNORE_INDEX,
    get_template,
    parse_tool_calls,
    register_chat_template,
    split_tool_calls,
    tokenize_conversation,
    validate_messages,
)
from zhllama.errors import ZhllamaError
from zhllama.model.loading import load_tokenizer
from zhllama.tokenizer import from_gguf

BOS = "<|begin_of_text|>"
QWEN_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询城市天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time",
                                         "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]
SYSTEM = {"role": "system", "content": "你是一个助手。"}


def call(name, arguments, **extra):
    return {**extra, "type": "function", "function": {"name": name, "arguments": arguments}}


def calling(*calls, content=""):
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


def user(text):
    return {"role": "user", "content": text}


def reply(text):
    return {"role": "assistant", "content": text}


def result(text):
    return {"role": "tool", "content": text}


ASK = user("北京今天天气怎么样？")
CALL = calling(call("get_weather", {"city": "北京"}))
RESULT = result('{"temp": 20, "sky": "晴"}')
ANSWER = reply("北京今天晴，20度。")
PARALLEL = [ASK, calling(call("get_weather", {"city": "北京"}), call("get_weather", {"city": "上海"})),
            result('{"temp": 20}'), result('{"temp": 25}'), reply("北京20度，上海25度。")]
# (name, messages) without a system message; each is also tried with SYSTEM first
CASES = [
    ("one call", [ASK, CALL]),
    ("call, result, answer", [ASK, CALL, RESULT, ANSWER]),
    ("awaiting the answer", [ASK, CALL, RESULT]),
    ("multi-turn", [user("你好"), reply("你好！"), ASK, CALL, RESULT, ANSWER, user("现在几点？"),
                    calling(call("get_time", {})), result("10:00"), reply("十点。"), user("谢谢")]),
    ("two calls in a row", [ASK, CALL, RESULT, calling(call("get_time", {})), result("10:00"), ANSWER]),
    ("content with the call", [ASK, calling(call("get_weather", {"city": "北京"}), content=" 我查一下。"), RESULT,
                               ANSWER]),
    ("no tool call", [user("  你好 "), reply("你好！\n")]),
]


def render(jinja, messages, add_generation_prompt=False, **kwargs):
    return render_jinja_template(conversations=[messages], chat_template=jinja,
                                 add_generation_prompt=add_generation_prompt, **kwargs)[0][0]


@pytest.fixture(scope="module")
def meta_jinja(llama3_template_jinja):
    return llama3_template_jinja.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def qwen_jinja(qwen25_template_jinja):
    return qwen25_template_jinja.read_text(encoding="utf-8")


def all_cases():
    for name, msgs in CASES:
        for system in ([], [SYSTEM]):
            for tools in (TOOLS, None):
                yield name, system + msgs, tools, msgs[-1]["role"] in ("user", "tool")


# --------------------------------------------------------------------------------------------------------------
# Text: the references, Python == Jinja, exact strings


def test_llama3_equals_metas_template(meta_jinja):
    l3, n = get_template("llama3"), 0
    for name, msgs, tools, can_generate in [*all_cases(), ("parallel", PARALLEL, TOOLS, False)]:
        for add_gen in (False, True) if can_generate else (False,):
            if name == "parallel":
                with pytest.raises(TemplateError, match="only supports single tool-calls"):
                    render(meta_jinja, msgs, tools=tools, bos_token=BOS)
                with pytest.raises(ZhllamaError, match="llama3 writes one tool call per assistant message"):
                    l3.render(msgs, tools=tools)
                with pytest.raises(TemplateError, match="one tool call per assistant message"):
                    render(l3.jinja, msgs, tools=tools)
                continue
            meta = render(meta_jinja, msgs, add_gen, tools=tools, bos_token=BOS)
            assert l3.render(msgs, add_gen, tools=tools) == meta, (name, tools)
            assert render(l3.jinja, msgs, add_gen, tools=tools) == meta, (name, tools)
            n += 1
    assert n == 36


def test_chatml_equals_qwen25_with_a_system_message(qwen_jinja):
    chatml, n = get_template("chatml"), 0
    for name, msgs, tools, can_generate in [*all_cases(), ("parallel", PARALLEL, TOOLS, False),
                                            ("parallel", [SYSTEM, *PARALLEL], TOOLS, False)]:
        for add_gen in (False, True) if can_generate else (False,):
            ours, qwen = chatml.render(msgs, add_gen, tools=tools), render(qwen_jinja, msgs, add_gen, tools=tools)
            assert render(chatml.jinja, msgs, add_gen, tools=tools) == ours, (name, tools)
            if msgs[0]["role"] == "system":
                assert ours == qwen, (name, tools)
            elif tools:  # Qwen writes its default system prompt; ours has none, so the block starts at "# Tools"
                assert qwen == ours.replace("<|im_start|>system\n", f"<|im_start|>system\n{QWEN_DEFAULT}\n\n", 1)
            else:
                assert qwen == f"<|im_start|>system\n{QWEN_DEFAULT}<|im_end|>\n" + ours
            n += 1
    assert n == 38


def test_exact_chatml_text_and_targets():
    msgs = [SYSTEM, ASK, calling(call("get_weather", {"city": "北京"}), call("get_time", "{}"), content="我查一下。"),
            RESULT, result("10:00"), ANSWER]
    chatml = get_template("chatml")
    assert chatml.render(msgs, tools=[TIME]) == (
        "<|im_start|>system\n你是一个助手。\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": '
        '{"type": "object", "properties": {}}}}\n</tools>\n\nFor each function call, return a json object with '
        "function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n北京今天天气怎么样？<|im_end|>\n"
        '<|im_start|>assistant\n我查一下。\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp": 20, "sky": "晴"}\n</tool_response>\n<tool_response>\n10:00\n'
        "</tool_response><|im_end|>\n<|im_start|>assistant\n北京今天晴，20度。<|im_end|>\n")
    assert [text for text, target in chatml.render_segments(msgs, tools=[TIME]) if target] == [
        '我查一下。\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>',
        "北京今天晴，20度。<|im_end|>"]


def test_exact_llama3_text_and_targets():
    l3 = get_template("llama3")
    msgs = [ASK, calling(call("get_time", {}), content="ignored, as Meta's template does"), result("10:00"),
            reply(" 十点。 ")]
    assert l3.render(msgs, tools=[TIME]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for "
        "a function call with its proper arguments that best answers the given prompt.\n\nRespond in the format "
        '{"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n\n'
        '{\n    "type": "function",\n    "function": {\n        "name": "get_time",\n        "description": '
        '"Current time",\n        "parameters": {\n            "type": "object",\n            "properties": {}\n'
        "        }\n    }\n}\n\n北京今天天气怎么样？<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_time", "parameters": {}}<|eot_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n"10:00"<|eot_id|>'  # tojson of the string, as Meta's
        "<|start_header_id|>assistant<|end_header_id|>\n\n十点。<|eot_id|>")
    assert [text for text, target in l3.render_segments(msgs, tools=[TIME]) if target] == [
        '{"name": "get_time", "parameters": {}}<|eot_id|>', "十点。<|eot_id|>"]
    # without tools: no Environment line, no tool list, the calls and results the same
    plain = l3.render(msgs)
    assert "Environment" not in plain and "Given the following" not in plain
    assert plain.endswith('<|start_header_id|>ipython<|end_header_id|>\n\n"10:00"<|eot_id|>'
                          "<|start_header_id|>assistant<|end_header_id|>\n\n十点。<|eot_id|>")


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_argument_text_is_written_as_given_and_empty_tools_are_none(name):
    t = get_template(name)
    as_dict = [ASK, calling(call("get_weather", {"city": "北京"}))]
    as_text = [ASK, calling(call("get_weather", '{"city": "北京"}'))]
    compact = [ASK, calling(call("get_weather", '{"city":"北京"}'))]
    assert t.render(as_text) == t.render(as_dict) == render(t.jinja, as_text)
    assert t.render(compact) == render(t.jinja, compact) == t.render(as_dict).replace('{"city": "北京"}',
                                                                                    '{"city":"北京"}')
    assert t.render(as_dict, tools=[]) == t.render(as_dict) == render(t.jinja, as_dict, tools=[])


def random_tool_conversation(rng):
    texts = ["你好", " 北京 ", "x\ny", "", "😀", "tab\t", '{"a": [1, 2]}']
    msgs = [{"role": "system", "content": rng.choice(texts)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        msgs.append(user(rng.choice(texts)))
        for _ in range(rng.randint(0, 2)):
            calls = [call(rng.choice(["f", "查询"]), {"k": rng.choice(texts)}) for _ in range(rng.randint(1, 2))]
            msgs.append(calling(*calls, content=rng.choice(texts)))
            msgs += [result(rng.choice(texts)) for _ in range(rng.randint(1, 2))]
        msgs.append(reply(rng.choice(texts)))
    return msgs[:max(len(msgs) - rng.randint(0, 2), 2)]


def test_python_equals_jinja_on_random_tool_conversations():
    rng, n = random.Random(5), 0
    for _ in range(60):
        msgs = random_tool_conversation(rng)
        tools = [WEATHER] if rng.random() < 0.5 else None
        add_gen = msgs[-1]["role"] in ("user", "tool") and rng.random() < 0.7
        for name in ("chatml", "llama3"):
            t = get_template(name)
            if name == "llama3" and any(len(m.get("tool_calls", ())) > 1 for m in msgs):
                with pytest.raises(TemplateError):
                    render(t.jinja, msgs, add_gen, tools=tools)
                continue
            assert t.render(msgs, add_gen, tools=tools) == render(t.jinja, msgs, add_gen, tools=tools), msgs
            n += 1
    assert n > 70


# --------------------------------------------------------------------------------------------------------------
# Refusals and validation


@pytest.mark.parametrize("name", ["atom", "llama2"])
def test_templates_without_a_tool_format_refuse(name):
    t = get_template(name)
    message = f"chat template {name} has no tool format; use llama3 or chatml"
    for msgs, tools in (([ASK], TOOLS), ([ASK, CALL], None), ([ASK, CALL, RESULT, ANSWER], None)):
        with pytest.raises(ZhllamaError, match=message):
            t.render(msgs, tools=tools)
        with pytest.raises(TemplateError):
            render(t.jinja, msgs, tools=tools)
    with pytest.raises(TemplateError, match=message):
        render(t.jinja, [ASK], tools=TOOLS)
    assert t.render([ASK], tools=[]) == t.render([ASK])  # no tools


def test_validation_of_tool_messages():
    msgs = [ASK, {"role": "assistant", "content": None, "tool_calls": [call("f", '{"a": 1}', id="c1")]},
            {"role": "tool", "content": "ok", "tool_call_id": "c1", "name": "f"}, ANSWER,
            {"role": "user", "content": "再见", "tool_calls": [call("f", {})]},
            {"role": "assistant", "content": "再见", "tool_calls": []}]
    assert validate_messages(msgs) == [
        ASK, {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "content": "ok", "tool_call_id": "c1"}, ANSWER, user("再见"), reply("再见")]
    bad = {
        "message 1: expected role 'assistant' (not 'tool'); a tool message follows an assistant message with "
        "tool_calls, or another tool message": [ASK, RESULT],
        "message 4: expected role 'user' (not 'tool')": [ASK, CALL, RESULT, ANSWER, RESULT],
        "message 2: expected role 'tool' (not 'user'); an assistant message with tool_calls is followed by tool "
        "messages with the results": [ASK, CALL, ASK],
        "message 3: expected role 'tool' or 'assistant' (not 'user'); after tool results the assistant speaks "
        "again": [ASK, CALL, RESULT, ASK],
        "message 1 (assistant): tool call 0 (f): arguments are not valid JSON": [ASK, calling(call("f", "{x"))],
        "arguments must be a JSON object, got list": [ASK, calling(call("f", "[1]"))],
        "arguments must be an object or its JSON text, got int": [ASK, calling(call("f", 3))],
        "function name must be a non-empty string": [ASK, calling(call("", {}))],
        "tool_calls must be a list": [ASK, {"role": "assistant", "content": "", "tool_calls": {"a": 1}}],
        "type must be 'function'": [ASK, calling({"type": "code", "function": {"name": "f", "arguments": {}}})],
        "message 2 (tool): content must be a string, got NoneType": [ASK, CALL, {"role": "tool", "content": None}],
    }
    for message, msgs in bad.items():
        with pytest.raises(ZhllamaError, match=re.escape(message)):
            validate_messages(msgs)
    for tools, message in (({"a": 1}, "tools must be a list"), ([WEATHER["function"]], "tool 0: expected"),
                           ([{"type": "function", "function": {"name": 1}}], "tool 0: function name")):
        with pytest.raises(ZhllamaError, match=message):
            get_template("chatml").render([ASK], tools=tools)


def test_generation_prompt_after_results_not_after_a_call():
    for name in ("chatml", "llama3"):
        t = get_template(name)
        assert t.render([ASK, CALL, RESULT], True).endswith("assistant" + ("\n" if name == "chatml" else
                                                                           "<|end_header_id|>\n\n"))
        with pytest.raises(ZhllamaError, match="add_generation_prompt needs"):
            t.render([ASK, CALL], True)
        with pytest.raises(TemplateError, match="add_generation_prompt needs"):
            render(t.jinja, [ASK, CALL], True)


# --------------------------------------------------------------------------------------------------------------
# Ids and loss targets on the real vocabularies


@pytest.fixture(scope="module")
def qwen2_tok(workdir, qwen2_gguf):
    return load_tokenizer(from_gguf(qwen2_gguf, workdir / "qwen2-tools"))


@pytest.fixture(scope="module")
def l3tok(workdir, llama3_gguf):
    return load_tokenizer(from_gguf(llama3_gguf, workdir / "llama3-tools"))


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_calls_are_targets_results_are_not(name, qwen2_tok, l3tok, tmp_path):
    tok = qwen2_tok if name == "chatml" else l3tok
    msgs = [SYSTEM, ASK, CALL, RESULT, ANSWER]
    enc = tokenize_conversation(tok, name, msgs, tools=TOOLS)
    runs = [tok.decode(r) for r in target_runs(enc["labels"])]
    if name == "chatml":
        assert runs == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>',
                        "北京今天晴，20度。<|im_end|>"]
    else:
        assert runs == ['{"name": "get_weather", "parameters": {"city": "北京"}}<|eot_id|>',
                        "北京今天晴，20度。<|eot_id|>"]
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(enc["labels"], enc["input_ids"], strict=True))
    # the ids are apply_chat_template's with the template registered, tools included
    register_chat_template(tok, name)
    try:
        text = tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False)
        assert text == get_template(name).render(msgs, tools=TOOLS)
        assert enc["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        # control token strings in arguments, results and tools are plain text, as transformers sanitizes them
        eot = get_template(name).stop[0]
        hostile = [SYSTEM, ASK, calling(call("get_weather", {"city": f"北京{eot}"})), result(f"晴{eot}"), ANSWER]
        tools = copy.deepcopy(TOOLS)
        tools[0]["function"]["description"] += eot
        out = tok.apply_chat_template(hostile, tools=tools, tokenize=True, sanitize_control_tokens=True)
        ids = tokenize_conversation(tok, name, hostile, tools=tools)["input_ids"]
        assert ids == list(out["input_ids"] if hasattr(out, "keys") else out)
        assert ids.count(tok.convert_tokens_to_ids(eot)) == enc["input_ids"].count(tok.convert_tokens_to_ids(eot))
    finally:
        tok.chat_template = None


def test_turn_dropping_keeps_tools_with_the_first_kept_turn(l3tok):
    msgs = [user("很长的问题" * 50), reply("好的"), ASK, CALL, RESULT, ANSWER]
    full = tokenize_conversation(l3tok, "llama3", msgs, tools=[TIME])
    short = tokenize_conversation(l3tok, "llama3", msgs, max_len=len(full["input_ids"]) - 1, tools=[TIME])
    assert short["dropped_turns"] == 1
    assert short == {**tokenize_conversation(l3tok, "llama3", msgs[2:], tools=[TIME]), "dropped_turns": 1}


# --------------------------------------------------------------------------------------------------------------
# Parsing generated replies


def test_parse_llama3_calls():
    assert parse_tool_calls("llama3", ' {"name": "get_weather", "parameters": {"city": "北京"}}\n') == [
        {"name": "get_weather", "arguments": '{"city": "北京"}'}]
    assert parse_tool_calls("llama3", '{"name": "f", "arguments": {}}') == [{"name": "f", "arguments": "{}"}]
    for text in ('{"name": "f", "parameters": {"a": 1}', '{"name": "f"}', '{"name": "f", "parameters": [1]}',
                 '{"name": "f", "parameters": {}, "x": 1}', '{"name": 3, "parameters": {}}', "北京晴", "",
                 'Sure: {"name": "f", "parameters": {}}', '[{"name": "f", "parameters": {}}]'):
        assert parse_tool_calls("llama3", text) is None, text
    # what the template writes is read back
    text = get_template("llama3").render_segments([ASK, CALL])[-1][0].removesuffix("<|eot_id|>")
    assert parse_tool_calls("llama3", text) == [{"name": "get_weather", "arguments": '{"city": "北京"}'}]


def test_parse_chatml_calls():
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    two = one + '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
    assert parse_tool_calls("chatml", one) == [{"name": "get_weather", "arguments": '{"city": "北京"}'}]
    assert parse_tool_calls("chatml", two) == [{"name": "get_weather", "arguments": '{"city": "北京"}'},
                                               {"name": "get_time", "arguments": "{}"}]
    assert split_tool_calls("chatml", "我查一下。\n" + one) == (
        "我查一下。", [{"name": "get_weather", "arguments": '{"city": "北京"}'}])
    for text in ("北京晴", one.replace("}}", "}"), one + "\n然后", one.replace("\n{", "{"),
                 '<tool_call>\n{"name": "f", "parameters": {}}\n</tool_call>', one[:-1]):
        assert parse_tool_calls("chatml", text) is None, text
    segs = get_template("chatml").render_segments([ASK, calling(call("get_weather", {"city": "北京"}),
                                                                call("get_time", {}), content="我查一下。")])
    text = segs[-2][0].removesuffix("<|im_end|>")
    assert split_tool_calls("chatml", text) == ("我查一下。", json.loads(json.dumps(parse_tool_calls("chatml", two))))
    assert parse_tool_calls("atom", one) is None and parse_tool_calls("llama2", one) is None
