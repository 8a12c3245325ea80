"""Tool calling end to end: the tiny model SFT-trained (chatml, Qwen2.5's <tool_call> format) on two planted tool
conversations until greedy decoding writes the calls and the answers exactly, served, and called through the
official openai client and LangChain's ChatOpenAI, on the HF backend and on llama.cpp (an f32 GGUF of the same
weights). What the model writes is real; only the server's parsing decides what comes back."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest

from tests.serve.conftest import start
from zhllama.config import SftConfig

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]

ASK_WEATHER, WEATHER_ARGS, WEATHER_RESULT, WEATHER_ANSWER = "北京今天天气怎么样？", {"city": "北京"}, "晴，25度", \
    "北京今天晴，25度。"
ASK_TIME, TIME_ARGS, TIME_RESULT, TIME_ANSWER = "现在东京几点？", {"zone": "Asia/Tokyo"}, "14:30", "东京现在是14:30。"
# What the model writes for a call (chatml's format), as training taught it.
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'


def conversation(question, name, args, result, answer, call_id):
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}]},
            {"role": "tool", "tool_call_id": call_id, "content": result},
            {"role": "assistant", "content": answer}]


PLANTED = [conversation(ASK_WEATHER, "get_weather", WEATHER_ARGS, WEATHER_RESULT, WEATHER_ANSWER, "c1"),
           conversation(ASK_TIME, "get_time", TIME_ARGS, TIME_RESULT, TIME_ANSWER, "c2")]


@pytest.fixture(scope="module")
def tool_model(tiny_zh_model, tmp_path_factory):
    """The tiny model after full SFT on PLANTED (OpenAI `messages` records with a top-level `tools` list): both
    conversations in every step, a constant learning rate of 3e-3 after 2 warmup steps, 40 steps (measured: the
    loss falls to about 0.06, greedy decoding reproduces every call and answer exactly, and the smallest margin
    between the top two logits on a trained token is 0.42; 32 steps at 4e-3, or a cosine decay, do not get there).
    Packing would put both ~350-token conversations in one row: the same work. About 65 s of CPU time; on the
    shared 2 cores it took 90-245 s of wall time."""
    from zhllama.train import sft

    folder = tmp_path_factory.mktemp("tools-sft")
    data = folder / "tools.jsonl"
    data.write_text("".join(json.dumps({"messages": c, "tools": TOOLS}, ensure_ascii=False) + "\n" for c in PLANTED),
                    encoding="utf-8")
    cfg = SftConfig(template="chatml", seq_len=512, packing=False, max_steps=40, batch_size=len(PLANTED), lr=3e-3,
                    min_lr_ratio=1.0, warmup_steps=2, weight_decay=0.0, save_every=10_000, eval_every=10_000,
                    eval_batches=1, log_every=10, seed=0, precision="fp32", val_fraction=0.0)
    return sft(tiny_zh_model, [data], folder / "run", cfg) / "final"


@pytest.fixture(scope="module")
def tool_engine(tool_model):
    from zhllama.infer import load_engine

    engine = load_engine(tool_model, device="cpu", name="tiny-tools", max_tokens_limit=512)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(tool_engine):
    live, background = start(tool_engine, max_tokens_limit=256, default_max_tokens=64)
    yield live
    background.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def ask(client, question=ASK_WEATHER, **kw):
    kw = {"tools": TOOLS, "temperature": 0, "max_tokens": 64, **kw}
    return client.chat.completions.create(model="tiny-tools", messages=[{"role": "user", "content": question}], **kw)


def streamed(client, question=ASK_WEATHER, **kw):
    """(content, tool calls accumulated by index as OpenAI's clients do, finish reasons) of a streamed reply."""
    content, calls, finishes = "", {}, []
    for chunk in ask(client, question, stream=True, **kw):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for part in choice.delta.tool_calls or ():
            call = calls.setdefault(part.index, {"id": None, "type": None, "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            call["type"] = part.type or call["type"]
            call["name"] += part.function.name or ""
            call["arguments"] += part.function.arguments or ""
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
    return content, [calls[i] for i in sorted(calls)], finishes


def test_the_model_calls_the_tool(client):
    reply = ask(client)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == WEATHER_ARGS
    [call] = ask(client, ASK_TIME).choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == TIME_ARGS


def test_the_call_streams_as_tool_call_deltas(client):
    content, calls, finishes = streamed(client)
    assert content == ""  # the call's text is never sent as content
    assert len(calls) == 1 and calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == WEATHER_ARGS
    assert finishes == ["tool_calls"]


def test_the_tool_result_goes_back_and_the_model_answers(client):
    for question, answer, result in ((ASK_WEATHER, WEATHER_ANSWER, WEATHER_RESULT), (ASK_TIME, TIME_ANSWER,
                                                                                      TIME_RESULT)):
        messages = [{"role": "user", "content": question}]
        called = client.chat.completions.create(model="tiny-tools", messages=messages, tools=TOOLS, temperature=0,
                                                max_tokens=64).choices[0].message
        # the assistant message exactly as the client returned it, then the result
        messages += [called, {"role": "tool", "tool_call_id": called.tool_calls[0].id, "content": result}]
        reply = client.chat.completions.create(model="tiny-tools", messages=messages, tools=TOOLS, temperature=0,
                                               max_tokens=64)
        assert reply.choices[0].message.content == answer
        assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "stop"
        chunks = client.chat.completions.create(model="tiny-tools", messages=messages, tools=TOOLS, temperature=0,
                                                max_tokens=64, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer


def test_langchain_bind_tools(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.base_url, api_key="unused", model="tiny-tools", temperature=0, max_tokens=64,
                     max_retries=0).bind_tools(TOOLS)
    message = llm.invoke(ASK_WEATHER)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", WEATHER_ARGS)]
    assert message.tool_calls[0]["id"].startswith("call_") and message.content == ""
    assert message.response_metadata["finish_reason"] == "tool_calls"
    # the call and its result back (LangChain writes the arguments with json.dumps, ASCII escapes and all)
    answer = llm.invoke([HumanMessage(ASK_WEATHER), message,
                         ToolMessage(WEATHER_RESULT, tool_call_id=message.tool_calls[0]["id"])])
    assert answer.content == WEATHER_ANSWER and answer.tool_calls == []
    gathered = None
    for chunk in llm.stream(ASK_TIME):
        gathered = chunk if gathered is None else gathered + chunk
    assert [(c["name"], c["args"]) for c in gathered.tool_calls] == [("get_time", TIME_ARGS)]


def test_tool_choice_required_and_parallel_off(client):
    for kw in ({"tool_choice": "required"}, {"parallel_tool_calls": False}):
        [call] = ask(client, **kw).choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == WEATHER_ARGS


def test_tool_choice_none_answers_in_plain_content(client):
    # The tools stay in the prompt (the template can write them), so the model writes what it learnt; with
    # tool_choice "none" that text is content, never a call.
    choice = ask(client, tool_choice="none").choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert choice.message.content == WEATHER_CALL
    content, calls, finishes = streamed(client, tool_choice="none")
    assert (content, calls, finishes) == (WEATHER_CALL, [], ["stop"])


def test_a_cut_off_call_is_plain_content(client):
    """A call cut short by max_tokens is not valid JSON: its text comes back as content, 200, finish "length"."""
    choice = ask(client, max_tokens=8).choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert WEATHER_CALL.startswith(choice.message.content) and len(choice.message.content) > len("<tool_call>")
    content, calls, finishes = streamed(client, max_tokens=8)
    assert (content, calls, finishes) == (choice.message.content, [], ["length"])


def test_a_named_tool_choice_forces_the_call_syntax(client, server):
    """tool_choice naming get_time on the question trained for get_weather: the reply starts with the call's syntax
    and get_time's name (the server writes it); the model, which never learnt to go on from there, continues with
    text that is not JSON, so the reply is plain content (200, never a 5xx), streamed or not."""
    from zhllama.chat.tools import CHATML, call_opening, calls_in_format

    named = {"type": "function", "function": {"name": "get_time"}}
    body = {"model": "tiny-tools", "messages": [{"role": "user", "content": ASK_WEATHER}], "tools": TOOLS,
            "tool_choice": named, "temperature": 0, "max_tokens": 64}
    response = httpx.post(server.base_url + "/chat/completions", json=body, timeout=120)
    assert response.status_code == 200
    choice = response.json()["choices"][0]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"
    content = choice["message"]["content"]
    assert content.startswith(call_opening(CHATML, "get_time")) and len(content) > len(call_opening(CHATML, "get_time"))
    assert calls_in_format(CHATML, content) is None  # measured: '..."arguments": time", "北京"}}\n</tool_call>'
    assert streamed(client, tool_choice=named) == (content, [], ["stop"])
    # "required" with two tools forces only the syntax: the model names the function itself
    [call] = ask(client, ASK_TIME, tool_choice="required").choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == TIME_ARGS


@pytest.mark.parametrize("fmt, reply", [
    ("chatml", "好的。\n\n" + WEATHER_CALL + "\n"), ("chatml", "a < b <tool 和 <tool_c\n\n结束\n"),
    ("chatml", WEATHER_CALL + " 多余"), ("chatml", "  \n"),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "北京"}}'), ("llama3", " 北京{晴}"),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "北京"}'),
])
def test_call_watch_streams_what_the_whole_reply_holds(fmt, reply):
    """Fed in pieces of any size, the streamed content and the calls equal those of the whole reply; content
    streams as it comes (all but a tail that may start a call)."""
    from zhllama.chat.templates import get_template
    from zhllama.serve.tools import CallWatch, ToolRequest, split_reply

    request, tool_format = ToolRequest(TOOLS), get_template(fmt).tool_format
    content, calls = split_reply(reply, request, tool_format)
    for size in (1, 2, 5, len(reply)):
        watch = CallWatch(request, tool_format)
        sent = "".join(watch.feed(reply[i:i + size]) for i in range(0, len(reply), size))
        rest, got = watch.finish()
        assert sent + rest == content
        assert [c["function"] for c in got or ()] == [c["function"] for c in calls or ()]
        if "<tool_call>" not in reply and fmt == "chatml" and size == 1:
            assert len(sent) >= len(reply.rstrip()) - len("<tool_c")


@pytest.fixture()
def scripted(tool_engine, monkeypatch):
    """Make the served engine write a given reply (in pieces of 3 characters) whatever it is asked."""
    from zhllama.infer.params import Delta

    def script(reply: str):
        async def astream(ids, params):
            pieces = [reply[i:i + 3] for i in range(0, len(reply), 3)]
            for i, piece in enumerate(pieces):
                yield Delta(piece, i + 1, "stop" if i == len(pieces) - 1 else None)

        monkeypatch.setattr(tool_engine, "astream", astream)

    return script


UNKNOWN_FUNCTION = '<tool_call>\n{"name": "get_stock", "arguments": {"code": "600519"}}\n</tool_call>'
NOT_JSON = '<tool_call>\n{"name": "get_weather", "arguments": {city: 北京}}\n</tool_call>'
EXTRA_KEY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}, "id": 1}\n</tool_call>'
TEXT_AFTER = WEATHER_CALL + "\n好的"


@pytest.mark.parametrize("reply", [UNKNOWN_FUNCTION, NOT_JSON, EXTRA_KEY, TEXT_AFTER])
def test_a_reply_that_is_no_valid_call_is_plain_content(client, server, scripted, reply):
    scripted(reply)
    body = {"model": "tiny-tools", "messages": [{"role": "user", "content": ASK_WEATHER}], "tools": TOOLS}
    response = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"] == {"role": "assistant", "content": reply}
    assert response.json()["choices"][0]["finish_reason"] == "stop"
    assert streamed(client) == (reply, [], ["stop"])


def test_text_before_calls_and_parallel_calls(client, scripted):
    time_call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}\n</tool_call>'
    scripted("好的，我查一下。\n" + WEATHER_CALL + "\n" + time_call + "\n")
    message = ask(client).choices[0].message
    assert message.content == "好的，我查一下。"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)]
    assert len({c.id for c in message.tool_calls}) == 2
    content, calls, finishes = streamed(client)
    assert content == "好的，我查一下。" and finishes == ["tool_calls"]  # the newline before the call is not content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", WEATHER_ARGS),
                                                                         ("get_time", TIME_ARGS)]
    [call] = ask(client, parallel_tool_calls=False).choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    content, calls, finishes = streamed(client, parallel_tool_calls=False)
    assert [c["name"] for c in calls] == ["get_weather"] and finishes == ["tool_calls"]


@pytest.fixture(scope="module")
def cpp_client(tool_model, tmp_path_factory):
    """The same weights as an f32 GGUF, served by the llama.cpp engine."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from zhllama.assets import cache_dir
    from zhllama.export.gguf import export_gguf
    from zhllama.infer.llamacpp import load_llamacpp_engine, tokenizer_cache_dir

    gguf = export_gguf(tool_model, tmp_path_factory.mktemp("tools-gguf") / "tiny-tools-f32.gguf", "f32")
    engine = load_llamacpp_engine(gguf, name="tiny-tools", max_tokens_limit=512, threads=2)
    live, background = start(engine, max_tokens_limit=256, default_max_tokens=64)
    yield openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0)
    background.stop()
    engine.close()
    shutil.rmtree(tokenizer_cache_dir(gguf, cache_dir()), ignore_errors=True)


def test_the_llamacpp_backend_calls_the_tool_alike(cpp_client):
    choice = ask(cpp_client).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == WEATHER_ARGS
    content, calls, finishes = streamed(cpp_client, ASK_TIME)
    assert content == "" and finishes == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_time", TIME_ARGS)]
    messages = [{"role": "user", "content": ASK_WEATHER}, choice.message,
                {"role": "tool", "tool_call_id": call.id, "content": WEATHER_RESULT}]
    reply = cpp_client.chat.completions.create(model="tiny-tools", messages=messages, tools=TOOLS, temperature=0,
                                               max_tokens=64)
    assert reply.choices[0].message.content == WEATHER_ANSWER and reply.choices[0].finish_reason == "stop"
