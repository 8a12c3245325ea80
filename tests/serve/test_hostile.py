"""The server holds its ground: a failing generation, slow clients, too many clients, a full line, and browsers.

Each test starts its own server (on the session's tiny engine, 127.0.0.1 only) with the setting under test made
small, so that a timeout is a second, not the default twenty. Where a test needs a generation to stay busy, it
pauses the engine's batch loop (transformers' ``manager.pause``) rather than racing a clock.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest

from tests.serve.conftest import start
from tests.serve.test_robustness import parse_sse
from zhllama.errors import ZhllamaError
from zhllama.infer import SamplingParams
from zhllama.serve import ServeConfig, create_app


@contextmanager
def server(engine, **settings):
    live, background = start(engine, **{"max_tokens_limit": 256, "default_max_tokens": 8, **settings})
    try:
        yield live
    finally:
        background.stop()


def body(engine, content="你好", **extra) -> dict:
    return {"model": engine.name, "messages": [{"role": "user", "content": content}], "max_tokens": 6,
            "temperature": 0, **extra}


def metric(live, name: str) -> float:
    for line in httpx.get(live.url + "/metrics", headers=live.headers(), timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def error_of(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# --- one request must not stop the engine --------------------------------------------------------------------------

@contextmanager
def failing_step_for(marker_ids: list[int]):
    """Make every batch step raise while the request whose prompt is ``marker_ids`` is in the batch."""
    from transformers.generation.continuous_batching.continuous_api import ContinuousBatchProcessor

    step = ContinuousBatchProcessor._generation_step

    def poisoned(processor, model):
        if any(list(state.initial_tokens) == marker_ids
               for state in list(processor.scheduler.active_requests.values())):
            raise RuntimeError("injected failure")
        return step(processor, model)

    ContinuousBatchProcessor._generation_step = poisoned
    try:
        yield
    finally:
        ContinuousBatchProcessor._generation_step = step


def test_a_failing_generation_fails_alone_and_the_engine_goes_on(tiny_engine):
    marker = [{"role": "user", "content": "这一个请求会出错。"}]
    with server(tiny_engine, max_concurrency=4) as live:
        client = openai.OpenAI(base_url=live.base_url, api_key="none", max_retries=0)
        reference = client.chat.completions.create(**body(tiny_engine, max_tokens=48)).choices[0].message.content
        marker_ids = tiny_engine.encode_chat(marker, SamplingParams(max_tokens=6))
        restarts = tiny_engine.restarts
        lines: list[str] = []

        def long_stream():
            with httpx.stream("POST", live.base_url + "/chat/completions", timeout=120,
                              json=body(tiny_engine, max_tokens=48, stream=True)) as response:
                for line in response.iter_lines():
                    lines.append(line)

        with failing_step_for(marker_ids):
            other = threading.Thread(target=long_stream)
            other.start()
            for _ in range(1000):  # until it has tokens: then it is not among the requests that joined the failure
                if sum(line.startswith("data: ") for line in lines) >= 3:
                    break
                time.sleep(0.01)
            failed = httpx.post(live.base_url + "/chat/completions", json={**body(tiny_engine), "messages": marker},
                                timeout=30)
            other.join(timeout=120)
        assert not other.is_alive()
        assert failed.status_code == 500, failed.text
        assert error_of(failed)["type"] == "server_error" and "injected failure" in error_of(failed)["message"]
        events = parse_sse(lines)
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert streamed == reference  # it went on from where it was, as if nothing happened
        assert tiny_engine.restarts == restarts + 1
        assert httpx.get(live.url + "/health").status_code == 200
        later = client.chat.completions.create(**body(tiny_engine, max_tokens=48))
        assert later.choices[0].message.content == reference
        assert metric(live, "zhllama_server_errors_total") == 1
        assert tiny_engine.busy_requests() == 0


def test_an_unexpected_error_is_a_counted_500_and_the_server_goes_on(tiny_engine, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug")

    async def broken_stream(*args, **kwargs):
        raise ValueError("a bug after the 200")
        yield

    with server(tiny_engine) as live, httpx.Client(base_url=live.base_url, timeout=30) as client:
        monkeypatch.setattr(tiny_engine, "encode_chat", broken)
        failed = client.post("/chat/completions", json=body(tiny_engine))
        assert failed.status_code == 500
        assert error_of(failed) == {"message": "internal error: ValueError", "type": "server_error", "param": None,
                                    "code": None}  # one line for the client; the traceback goes to the log
        monkeypatch.undo()
        monkeypatch.setattr(tiny_engine, "astream", broken_stream)
        with pytest.raises(httpx.RemoteProtocolError):  # the stream is cut: its 200 is already out
            client.post("/chat/completions", json=body(tiny_engine, stream=True)).read()
        monkeypatch.undo()
        assert client.post("/chat/completions", json=body(tiny_engine)).status_code == 200
        text = httpx.get(live.url + "/metrics", timeout=10).text
        assert 'zhllama_requests_total{endpoint="/v1/chat/completions",status="500"} 1' in text
        assert metric(live, "zhllama_server_errors_total") == 2


def test_top_k_beyond_int32_is_refused_and_the_engine_stays_up(live_server, tiny_engine):
    for top_k in (2**31, 2**63, 10**30):
        response = httpx.post(live_server.base_url + "/chat/completions", headers=live_server.headers(),
                              json=body(tiny_engine, top_k=top_k, temperature=1.0), timeout=30)
        assert response.status_code == 400 and error_of(response)["param"] == "top_k"
    ok = httpx.post(live_server.base_url + "/chat/completions", headers=live_server.headers(),
                    json=body(tiny_engine, top_k=2**31 - 1, temperature=1.0), timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 6
    assert httpx.get(live_server.url + "/health").status_code == 200


# --- slow and many clients -----------------------------------------------------------------------------------------

def raw_connection(live) -> socket.socket:
    host, port = live.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    for _ in range(1000):  # bounded: the socket's own timeout ends a read that hangs
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_headers_that_never_finish_are_cut_off(tiny_engine):
    with server(tiny_engine, header_timeout=1.0, body_timeout=1.0) as live:
        sock = raw_connection(live)
        began = time.perf_counter()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
        assert read_until_closed(sock) == b""
        took = time.perf_counter() - began
        sock.close()
        print(f"unfinished headers closed after {took:.2f} s")
        assert 0.9 <= took < 5.0
        assert httpx.get(live.url + "/health").status_code == 200


def test_a_body_shorter_than_its_content_length_gets_408(tiny_engine):
    with server(tiny_engine, header_timeout=1.0, body_timeout=1.0) as live:
        sock = raw_connection(live)
        began = time.perf_counter()
        port = live.url.rsplit(":", 1)[1]
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\": ".encode())
        answer = read_until_closed(sock)
        took = time.perf_counter() - began
        sock.close()
        print(f"short body answered after {took:.2f} s")
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:200]
        assert "did not arrive within 1 s" in json.loads(payload)["error"]["message"]
        assert 0.9 <= took < 5.0
        assert metric(live, "zhllama_requests_running") == 0


def test_connections_beyond_the_limit_get_503(tiny_engine):
    with server(tiny_engine, max_connections=2, header_timeout=5.0) as live:
        idle = [raw_connection(live) for _ in range(2)]
        try:
            time.sleep(0.2)  # the server has accepted both
            refused = httpx.get(live.url + "/health", timeout=10)
            assert refused.status_code == 503 and "--max-connections" in error_of(refused)["message"]
        finally:
            for sock in idle:
                sock.close()
        for _ in range(100):
            if httpx.get(live.url + "/health", timeout=10).status_code == 200:
                break
            time.sleep(0.05)
        assert httpx.get(live.url + "/health", timeout=10).status_code == 200
        assert metric(live, "zhllama_server_errors_total") >= 1  # the 503 counts


# --- a bounded line ------------------------------------------------------------------------------------------------

def fill_the_line(live, call):
    """One request holding the only slot and one waiting for it (bounded waits, so a broken server fails the test
    instead of hanging it)."""
    threads = []
    for name, gauge in (("holder", "running"), ("waiter", "waiting")):
        threads.append(threading.Thread(target=call, args=(name,)))
        threads[-1].start()
        deadline = time.monotonic() + 30
        while getattr(live.app.state.metrics, gauge) < 1:
            assert time.monotonic() < deadline, f"no request {gauge} after 30 s"
            time.sleep(0.01)
    return threads


def test_a_full_line_gets_429_and_a_long_wait_503(tiny_engine):
    with server(tiny_engine, max_concurrency=1, max_queue=1, queue_timeout=2.0) as live:
        url = live.base_url + "/chat/completions"
        results = {}

        def call(name, **extra):
            results[name] = httpx.post(url, json=body(tiny_engine, **extra), timeout=30)

        with tiny_engine.manager.pause():  # the batch makes no progress: the slot holder keeps its slot
            holder, waiter = fill_the_line(live, call)
            began = time.perf_counter()
            full = httpx.post(url, json=body(tiny_engine), timeout=30)
            refused_after = time.perf_counter() - began
            waiter.join(timeout=10)
        holder.join(timeout=120)
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        assert refused_after < 1.5  # at once, not after the 2 s a waiter may wait
        assert error_of(full)["code"] == "queue_full"
        assert results["waiter"].status_code == 503 and error_of(results["waiter"])["code"] == "queue_timeout"
        assert results["waiter"].headers["retry-after"] == "1"
        assert results["holder"].status_code == 200
        assert metric(live, "zhllama_queue_rejected_total") == 1
        assert metric(live, "zhllama_queue_timeouts_total") == 1
        assert metric(live, "zhllama_requests_running") == 0 and metric(live, "zhllama_queue_length") == 0
        # a stream is refused before its 200 goes out, so its client sees the status
        with tiny_engine.manager.pause():
            holder, waiter = fill_the_line(live, call)
            streamed = httpx.post(url, json=body(tiny_engine, stream=True), timeout=30)
            waiter.join(timeout=10)
        holder.join(timeout=120)
        assert streamed.status_code == 429 and error_of(streamed)["code"] == "queue_full"


# --- browsers ------------------------------------------------------------------------------------------------------

def test_a_foreign_page_cannot_post_text_plain_or_from_its_origin(open_server, tiny_engine):
    url = open_server.base_url + "/chat/completions"
    before = tiny_engine.restarts, open_server.app.state.metrics.completion_tokens
    plain = httpx.post(url, content=json.dumps(body(tiny_engine)), headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415 and "application/json" in error_of(plain)["message"]
    foreign = httpx.post(url, json=body(tiny_engine), headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403 and "--allow-origin" in error_of(foreign)["message"]
    null = httpx.post(url, json=body(tiny_engine), headers={"Origin": "null"})
    assert null.status_code == 403
    assert (tiny_engine.restarts, open_server.app.state.metrics.completion_tokens) == before  # nothing generated
    own = httpx.post(url, json=body(tiny_engine), headers={"Origin": open_server.url})
    assert own.status_code == 200


def test_an_allowed_origin_may_post(tiny_engine):
    with server(tiny_engine, allow_origins=("https://app.example",)) as live:
        url = live.base_url + "/chat/completions"
        assert httpx.post(url, json=body(tiny_engine), headers={"Origin": "https://app.example"}).status_code == 200
        assert httpx.post(url, json=body(tiny_engine), headers={"Origin": "https://other.example"}).status_code == 403


def test_loopback_server_refuses_foreign_host_names(open_server, tiny_engine):
    port = open_server.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}"):
        for response in (httpx.get(open_server.url + "/health", headers={"Host": host}),
                         httpx.get(open_server.url + "/", headers={"Host": host}),
                         httpx.post(open_server.base_url + "/chat/completions", json=body(tiny_engine),
                                    headers={"Host": host})):
            assert response.status_code == 403 and "loopback" in error_of(response)["message"], host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        assert httpx.get(open_server.url + "/health", headers={"Host": host}).status_code == 200, host
    page = httpx.get(open_server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


# --- real clients ---------------------------------------------------------------------------------------------------

def test_developer_role_and_assistant_null_content_are_accepted(live_server, tiny_engine):
    from tests.serve.test_openai import greedy_reference

    client = openai.OpenAI(base_url=live_server.base_url, api_key=live_server.api_key, max_retries=0)
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": None},
               {"role": "user", "content": "请介绍一下长城。"}]
    expected, _ = greedy_reference(tiny_engine, [{"role": "system", "content": "你是助手。"}] + [
        {**m, "content": m["content"] or ""} for m in history], 12)
    reply = client.chat.completions.create(model=tiny_engine.name, temperature=0, max_tokens=12,
                                           messages=[{"role": "developer", "content": "你是助手。"}] + history)
    assert reply.choices[0].message.content == expected


@pytest.mark.parametrize(("field", "value"), [
    ("response_format", {"type": "json_object"}), ("functions", [{"name": "f"}]),
])
def test_unsupported_fields_are_refused_not_ignored(live_server, tiny_engine, field, value):
    response = httpx.post(live_server.base_url + "/chat/completions", headers=live_server.headers(),
                          json=body(tiny_engine, **{field: value}), timeout=30)
    assert response.status_code == 400
    assert error_of(response)["param"] == field and "not supported" in error_of(response)["message"]


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools",
     "chat template atom has no tool format"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}, None, None),
])
def test_tools_for_a_template_without_a_tool_format(live_server, tiny_engine, extra, param, words):
    """The session's model speaks atom, which has no tool format: tools are a 400 naming the field, not a reply that
    silently ignored them; with tool_choice "none" nothing will be called, so it just answers."""
    response = httpx.post(live_server.base_url + "/chat/completions", headers=live_server.headers(),
                          json=body(tiny_engine, **extra), timeout=30)
    if param is None:
        assert response.status_code == 200 and "tool_calls" not in response.json()["choices"][0]["message"]
        return
    assert response.status_code == 400
    assert error_of(response)["param"] == param and words in error_of(response)["message"]


@pytest.mark.parametrize(("setting", "words"), [
    ({"api_keys": ("",)}, "--api-key must not be empty"), ({"api_keys": ("k1", "  ")}, "--api-key must not be empty"),
    ({"max_queue": -1}, "--max-queue"), ({"queue_timeout": 0}, "--queue-timeout"),
    ({"header_timeout": 0}, "--read-timeout"), ({"max_connections": 0}, "--max-connections"),
])
def test_settings_that_would_open_or_jam_the_server_are_refused(tiny_engine, setting, words):
    with pytest.raises(ZhllamaError, match=words):
        create_app(tiny_engine, ServeConfig(**setting))
