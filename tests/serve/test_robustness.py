"""The server under a seeded storm of good, cancelled and malformed requests: no 5xx, no slot left busy.

Every test runs against the session's ``live_server`` (API key required, max_concurrency 8, max_tokens_limit 256,
max_body_bytes 200_000, read timeouts 2 s) over the random tiny model, which never stops early, so every request
runs to max_tokens.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
import pytest

BODY_LIMIT = 200_000  # live_server's max_body_bytes
READ_TIMEOUT = 2.0  # live_server's header and body read timeouts
PROMPTS = ["你好，请介绍一下北京。", "写一首关于春天的短诗。", "什么是机器学习？", "今天天气怎么样？",
           "请把这句话翻译成英文：我喜欢读书。", "给我讲一个笑话。"]


def model_name(live) -> str:
    return live.app.state.engine.name


def read_metrics(live) -> dict[str, float]:
    """The plain (unlabelled) samples of /metrics, by name."""
    response = httpx.get(live.url + "/metrics", headers=live.headers(), timeout=10)
    assert response.status_code == 200, response.text
    values = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values


def wait_idle(live, timeout: float = 5.0) -> float:
    """Seconds until no request holds a slot or waits for one and the engine's batch is empty."""
    engine, start = live.app.state.engine, time.perf_counter()
    while True:
        m = read_metrics(live)
        if m["zhllama_requests_running"] == 0 and m["zhllama_queue_length"] == 0 and engine.busy_requests() == 0:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise AssertionError(f"still busy after {timeout} s: running={m['zhllama_requests_running']} "
                                 f"queued={m['zhllama_queue_length']} engine={engine.busy_requests()}")
        time.sleep(0.02)


# --- the malformed requests, each with the answer it must get -----------------------------------------------------

@dataclass
class Bad:
    name: str
    status: int
    mentions: str  # a word the error message must contain (the field, or what is wrong)
    json: dict | None = None  # merged over a good chat body ...
    raw: bytes | None = None  # ... or sent as is
    path: str = "/v1/chat/completions"
    auth: str | None = "ok"  # "ok": the right key; None: no header; anything else: that bearer token
    param: str | None = None  # the expected error.param, where the server names one
    chunked: bool = False  # send the raw body without a content-length
    headers: dict | None = None  # sent over the usual ones


def good_chat(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, **extra}


BAD_CASES = [
    Bad("invalid_json", 400, "JSON", raw=b'{"model": "tiny-chat", "messages": [{"role": "user"'),
    Bad("json_not_object", 400, "object", raw=b'[1, 2, 3]'),
    Bad("max_tokens_string", 400, "max_tokens", json={"max_tokens": "ten"}, param="max_tokens"),
    Bad("messages_string", 400, "messages", json={"messages": "hi"}, param="messages"),
    Bad("stream_string", 400, "stream", json={"stream": "yes"}, param="stream"),
    Bad("model_not_string", 400, "model", json={"model": 7}, param="model"),
    Bad("negative_max_tokens", 400, "max_tokens", json={"max_tokens": -3}, param="max_tokens"),
    Bad("huge_max_tokens", 400, "max_tokens", json={"max_tokens": 10**9}, param="max_tokens"),
    Bad("negative_temperature", 400, "temperature", json={"temperature": -0.5}, param="temperature"),
    Bad("unknown_model", 404, "model", json={"model": "gpt-9000"}, param="model"),
    Bad("empty_messages", 400, "messages", json={"messages": []}, param="messages"),
    Bad("bad_role", 400, "role", json={"messages": [{"role": "robot", "content": "hi"}]}, param="messages"),
    Bad("invalid_utf8", 400, "UTF-8", raw=b'{"model": "\xff"}'),
    Bad("body_over_limit", 413, "limit", raw=b'{"pad": "' + b"x" * (BODY_LIMIT + 10) + b'"}'),
    Bad("chunked_body_over_limit", 413, "limit", raw=b'{"pad": "' + b"x" * (BODY_LIMIT + 10) + b'"}',
        chunked=True),
    Bad("missing_api_key", 401, "API key", auth=None),
    Bad("wrong_api_key", 401, "API key", auth="sk-wrong"),
    Bad("completion_negative_max_tokens", 400, "max_tokens", path="/v1/completions", param="max_tokens",
        json={"prompt": "你好", "messages": None, "max_tokens": -1}),
    Bad("completion_empty_prompt", 400, "prompt", path="/v1/completions", param="prompt",
        json={"prompt": "", "messages": None}),
    # found by a hostile-input run (issue 12): each was a 500, a reset connection or a dead engine
    Bad("top_k_beyond_int32", 400, "top_k", json={"top_k": 2**31, "temperature": 1.0}, param="top_k"),
    Bad("top_k_beyond_int64", 400, "top_k", json={"top_k": 2**64, "temperature": 1.0}, param="top_k"),
    Bad("seed_beyond_int64", 400, "seed", json={"seed": 2**64}, param="seed"),
    Bad("temperature_400_digits", 400, "temperature", json={"temperature": 10**400}, param="temperature"),
    Bad("temperature_infinite", 400, "temperature", json={"temperature": float("inf")}, param="temperature"),
    Bad("lone_surrogate", 400, "surrogate", param="messages",
        raw=b'{"model": "x", "messages": [{"role": "user", "content": "a\\ud800"}]}'),
    Bad("lone_surrogate_key", 400, "surrogate", raw=b'{"\\udfff": 1}'),
    Bad("json_100000_deep", 400, "nested", raw=b"[" * 99_990 + b"]" * 99_990),
    Bad("json_40_deep", 400, "nested", raw=b'{"messages": ' + b"[" * 40 + b"]" * 40 + b"}", param="messages"),
    Bad("integer_5000_digits", 400, "number", raw=b'{"max_tokens": ' + b"9" * 5000 + b"}"),
    Bad("tools_without_function", 400, "tools[0] must be", json={"tools": [{"type": "function"}]}, param="tools"),
    Bad("tools_not_a_list", 400, "tools must be a list", json={"tools": {"type": "function"}}, param="tools"),
    Bad("tool_bad_name", 400, "tools[0].function.name", param="tools",
        json={"tools": [{"type": "function", "function": {"name": "a b"}}]}),
    Bad("tool_twice", 400, "given twice", param="tools",
        json={"tools": [{"type": "function", "function": {"name": "f"}}] * 2}),
    Bad("tool_parameters_not_schema", 400, "JSON Schema", param="tools",
        json={"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}),
    Bad("tool_choice_without_tools", 400, "needs tools", json={"tool_choice": "required"}, param="tool_choice"),
    Bad("tool_choice_unknown_function", 400, "not among the tools", param="tool_choice",
        json={"tools": [{"type": "function", "function": {"name": "f"}}],
              "tool_choice": {"type": "function", "function": {"name": "g"}}}),
    Bad("tool_choice_bad", 400, "tool_choice must be", json={"tool_choice": "always"}, param="tool_choice"),
    Bad("parallel_tool_calls_bad", 400, "parallel_tool_calls", json={"parallel_tool_calls": "yes"},
        param="parallel_tool_calls"),
    Bad("tool_message_without_id", 400, "tool_call_id is required", param="messages",
        json={"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "r"}]}),
    Bad("tool_message_unknown_id", 400, "answers no tool call", param="messages",
        json={"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r", "tool_call_id": "x"}]}),
    Bad("tool_call_arguments_not_json", 400, "not valid JSON", param="messages",
        json={"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
            {"role": "tool", "content": "r", "tool_call_id": "c1"}]}),
    Bad("response_format", 400, "not supported", json={"response_format": {"type": "json_schema"}},
        param="response_format"),
    Bad("text_plain", 415, "Content-Type", headers={"Content-Type": "text/plain"}),
    Bad("form_post", 415, "Content-Type", headers={"Content-Type": "application/x-www-form-urlencoded"}),
    Bad("foreign_origin", 403, "Origin", headers={"Origin": "http://evil.example"}),
    Bad("foreign_host", 403, "Host", headers={"Host": "evil.example"}),
    Bad("user_content_null", 400, "content", json={"messages": [{"role": "user"}]}, param="messages"),
]


def request_args(live, bad: Bad) -> dict:
    headers = {"Content-Type": "application/json"}
    if bad.auth == "ok":
        headers.update(live.headers())
    elif bad.auth is not None:
        headers["Authorization"] = f"Bearer {bad.auth}"
    headers.update(bad.headers or {})
    if bad.raw is not None:
        body = bad.raw
    else:
        payload = {k: v for k, v in {**good_chat(model_name(live)), **(bad.json or {})}.items() if v is not None}
        body = json.dumps(payload, ensure_ascii=False).encode()
    return {"headers": headers, "content": body}


def check_error(bad: Bad, response: httpx.Response) -> None:
    assert response.status_code == bad.status, (bad.name, response.status_code, response.text[:300])
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"], (bad.name, error)
    assert bad.mentions.lower() in error["message"].lower(), (bad.name, error["message"])
    if bad.param is not None:
        assert error.get("param") == bad.param, (bad.name, error)


@pytest.mark.parametrize("bad", BAD_CASES, ids=[b.name for b in BAD_CASES])
def test_bad_input_answers(live_server, bad):
    args = request_args(live_server, bad)
    if bad.chunked:
        body = args.pop("content")
        args["content"] = (body[i:i + 16_384] for i in range(0, len(body), 16_384))
    response = httpx.post(live_server.url + bad.path, timeout=30, **args)
    check_error(bad, response)
    if bad.status == 401:
        assert response.headers.get("www-authenticate") == "Bearer"


# --- a client that goes away ---------------------------------------------------------------------------------------

def test_disconnect_frees_slot_at_once(live_server):
    wait_idle(live_server)
    before = read_metrics(live_server)["zhllama_client_disconnects_total"]
    body = {**good_chat(model_name(live_server)), "max_tokens": 200, "stream": True}
    with httpx.Client(timeout=30) as client, client.stream("POST", live_server.base_url + "/chat/completions",
                                                          json=body, headers=live_server.headers()) as response:
        assert response.status_code == 200
        # kept in a name: a generator dropped by `break` is closed at once, and may take the connection with it
        lines, events = response.iter_lines(), 0
        while events < 2:
            events += next(lines).startswith("data: ")
        assert live_server.app.state.metrics.running == 1
    # leaving the block closed the half-read response, and httpx dropped the connection
    took = wait_idle(live_server, timeout=10)
    assert took < 2.0, f"the slot was freed only after {took:.2f} s"
    assert live_server.app.state.engine.busy_requests() == 0
    assert read_metrics(live_server)["zhllama_client_disconnects_total"] > before


# --- the storm ------------------------------------------------------------------------------------------------------

@dataclass
class Tally:
    by_kind: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    statuses: list = field(default_factory=list)

    def ok(self, kind: str) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1

    def fail(self, kind: str, why: str) -> None:
        self.failures.append(f"{kind}: {why}")


def parse_sse(lines: list[str]) -> list:
    """The data payloads of an SSE stream, JSON decoded except the final [DONE]."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def check_stream(events: list, kind: str, max_tokens: int, include_usage: bool) -> str | None:
    """Why a finished stream is malformed, or None."""
    if not events or events[-1] != "[DONE]":
        return f"no [DONE] at the end: {events[-2:]}"
    if events.count("[DONE]") != 1:
        return "[DONE] more than once"
    chunks = events[:-1]
    if any("error" in c for c in chunks):
        return f"error event in stream: {[c for c in chunks if 'error' in c]}"
    usage = None
    if include_usage:
        usage = chunks.pop()
        if usage.get("choices") != [] or "usage" not in usage:
            return f"last chunk is not a usage chunk: {usage}"
    if not chunks:
        return "no chunks"
    choices = [c["choices"][0] for c in chunks]
    finishes = [c["finish_reason"] for c in choices if c["finish_reason"] is not None]
    if finishes not in (["length"], ["stop"]) or choices[-1]["finish_reason"] is None:
        return f"finish reasons {finishes}"
    if kind == "stream_chat":
        if choices[0]["delta"].get("role") != "assistant":
            return f"first chunk has no assistant role: {chunks[0]}"
        if not all(isinstance(c["delta"].get("content", ""), str) for c in choices):
            return "non-string content"
    else:
        if not all(isinstance(c["text"], str) for c in choices):
            return "non-string text"
    if usage is not None and not 1 <= usage["usage"]["completion_tokens"] <= max_tokens:
        return f"usage {usage['usage']}"
    return None


async def stall(live, rng: random.Random) -> int | None:
    """A client that stops sending: mid-headers (the server closes, no status) or mid-body (408)."""
    host, port = live.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    auth = "".join(f"{key}: {value}\r\n" for key, value in live.headers().items())
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{auth}"
    mid_headers = rng.random() < 0.5
    writer.write(head.encode() if mid_headers else (head + "Content-Length: 50\r\n\r\n{").encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=READ_TIMEOUT + 5)
    writer.close()
    if mid_headers:
        assert answer == b"", answer[:100]
        return None
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    return 408


async def one_request(client: httpx.AsyncClient, live, rng: random.Random, kind: str, tally: Tally) -> None:
    model, headers = model_name(live), live.headers()
    if kind == "stall":
        status = await stall(live, rng)
        if status is not None:
            tally.statuses.append(status)
        tally.ok(kind)
        return
    max_tokens = rng.randint(4, 8)
    prompt = rng.choice(PROMPTS)
    temperature = rng.choice([0, 0.7, 1.0])
    if kind == "bad":
        bad = rng.choice(BAD_CASES)
        args = request_args(live, bad)
        response = await client.post(bad.path, **args)
        tally.statuses.append(response.status_code)
        try:
            check_error(bad, response)
        except (AssertionError, ValueError, KeyError) as exc:
            tally.fail(f"bad/{bad.name}", repr(exc))
            return
        tally.ok(f"bad/{bad.name}")
        return
    if kind == "chat":
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": temperature}
        response = await client.post("/v1/chat/completions", json=body, headers=headers)
        tally.statuses.append(response.status_code)
        if response.status_code != 200:
            tally.fail(kind, f"{response.status_code} {response.text[:200]}")
            return
        data = response.json()
        choice = data["choices"][0]
        if (not isinstance(choice["message"]["content"], str) or choice["finish_reason"] not in ("length", "stop")
                or not 1 <= data["usage"]["completion_tokens"] <= max_tokens):
            tally.fail(kind, f"malformed {data}")
            return
        tally.ok(kind)
        return
    include_usage = rng.random() < 0.5
    if kind == "stream_completion":
        path, body = "/v1/completions", {"model": model, "prompt": prompt}
    else:
        path, body = "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": prompt}]}
    body.update(stream=True, max_tokens=max_tokens if kind != "disconnect" else 200, temperature=temperature)
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    stop_after = rng.randint(1, 3) if kind == "disconnect" else None
    async with client.stream("POST", path, json=body, headers=headers) as response:
        tally.statuses.append(response.status_code)
        if response.status_code != 200:
            tally.fail(kind, f"{response.status_code} {(await response.aread())[:200]!r}")
            return
        lines = []
        async for line in response.aiter_lines():
            lines.append(line)
            if stop_after is not None and sum(x.startswith("data: ") for x in lines) >= stop_after:
                break  # leaving the block closes the connection mid-stream
    if kind == "disconnect":
        tally.ok(kind)
        return
    why = check_stream(parse_sse(lines), kind, max_tokens, include_usage)
    if why:
        tally.fail(kind, why)
    else:
        tally.ok(kind)


async def storm(live, n: int, concurrency: int, seed: int) -> Tally:
    rng = random.Random(seed)
    kinds = rng.choices(["stream_chat", "chat", "stream_completion", "disconnect", "bad", "stall"],
                        weights=[20, 15, 10, 15, 40, 3], k=n)
    seeds = [rng.randrange(2**32) for _ in range(n)]
    tally, queue = Tally(), asyncio.Queue()
    for item in zip(kinds, seeds, strict=True):
        queue.put_nowait(item)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client):
        while not queue.empty():
            kind, request_seed = queue.get_nowait()
            try:
                await one_request(client, live, random.Random(request_seed), kind, tally)
            except Exception as exc:  # a transport error is a failure too, never a crash of the storm
                tally.fail(kind, f"{type(exc).__name__}: {exc}")

    async with httpx.AsyncClient(base_url=live.url, timeout=60, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return tally


def test_storm_of_mixed_requests(live_server):
    wait_idle(live_server)
    before, restarts = read_metrics(live_server), live_server.app.state.engine.restarts
    started = time.perf_counter()
    tally = asyncio.run(storm(live_server, n=500, concurrency=32, seed=20240601))
    elapsed = time.perf_counter() - started
    print(f"storm: 500 requests in {elapsed:.1f} s; {sorted(tally.by_kind.items())}")

    assert not [s for s in tally.statuses if s >= 500], "5xx answers"
    assert not tally.failures, "\n".join(tally.failures[:20])
    assert sum(tally.by_kind.values()) == 500
    for kind in ("stream_chat", "chat", "stream_completion", "disconnect", "stall"):
        assert tally.by_kind.get(kind, 0) > 0, kind
    assert sum(v for k, v in tally.by_kind.items() if k.startswith("bad/")) > 0

    assert httpx.get(live_server.url + "/health", timeout=10).status_code == 200
    wait_idle(live_server, timeout=5)
    after = read_metrics(live_server)
    assert after["zhllama_requests_running"] == 0 and after["zhllama_queue_length"] == 0
    assert live_server.app.state.engine.busy_requests() == 0
    assert live_server.app.state.engine.restarts == restarts  # no failure inside a batch step, even a recovered one
    assert after["zhllama_client_disconnects_total"] > before["zhllama_client_disconnects_total"]
    served = httpx.get(live_server.url + "/metrics", headers=live_server.headers(), timeout=10).text
    assert 'status="5' not in served, [line for line in served.splitlines() if 'status="5' in line]


def test_client_that_leaves_while_queued_gives_up_its_place(live_server):
    """All 8 slots busy with long streams; a 9th client waits in line, leaves, and the line is empty at once."""

    async def scenario():
        body = {**good_chat(model_name(live_server)), "max_tokens": 256, "stream": True}
        async with httpx.AsyncClient(base_url=live_server.base_url, headers=live_server.headers(),
                                     timeout=30) as client:
            async def hold():
                async with client.stream("POST", "/chat/completions", json=body) as response:
                    async for _ in response.aiter_lines():
                        await asyncio.sleep(0)

            holders = [asyncio.create_task(hold()) for _ in range(8)]
            while live_server.app.state.metrics.running < 8:
                await asyncio.sleep(0.01)
            queued = asyncio.create_task(hold())
            while live_server.app.state.metrics.waiting < 1:
                await asyncio.sleep(0.01)
            queued.cancel()  # the client closes its connection while still waiting for a slot
            left = time.perf_counter()
            while live_server.app.state.metrics.waiting:
                await asyncio.sleep(0.01)
            gone_after = time.perf_counter() - left
            still_running = live_server.app.state.metrics.running
            for task in holders:
                task.cancel()
            await asyncio.gather(*holders, queued, return_exceptions=True)
            return gone_after, still_running

    gone_after, still_running = asyncio.run(scenario())
    assert gone_after < 1.0 and still_running == 8  # it left the line without ever taking a slot
    assert wait_idle(live_server) < 2.0
