"""The server as real clients see it: the official openai package and LangChain's ChatOpenAI."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

QUESTION = "你好，请用一句话介绍长城。"


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url, api_key=live_server.api_key, max_retries=0)


def greedy_reference(engine, messages, n):
    from zhllama.infer import SamplingParams

    ids = engine.encode_chat(messages, SamplingParams(max_tokens=n))
    out = engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, do_sample=False)
    return engine.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True), len(ids)


def test_models_lists_the_served_model(client, tiny_engine):
    assert [m.id for m in client.models.list()] == [tiny_engine.name]


def test_chat_completion_equals_model_generate(client, tiny_engine):
    messages = [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": QUESTION}]
    expected, prompt_tokens = greedy_reference(tiny_engine, messages, 20)
    reply = client.chat.completions.create(model=tiny_engine.name, messages=messages, temperature=0, max_tokens=20)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        prompt_tokens, 20, prompt_tokens + 20)


def test_streamed_chat_completion_equals_model_generate(client, tiny_engine):
    messages = [{"role": "user", "content": QUESTION}]
    expected, prompt_tokens = greedy_reference(tiny_engine, messages, 20)
    chunks = list(client.chat.completions.create(model=tiny_engine.name, messages=messages, temperature=0,
                                                 max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # it really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_completions_streamed_and_not(client, tiny_engine):
    prompt = "中国的首都是"
    ids = tiny_engine.tokenizer(prompt)["input_ids"]
    out = tiny_engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=12, do_sample=False)
    expected = tiny_engine.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    reply = client.completions.create(model=tiny_engine.name, prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == expected and reply.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(model=tiny_engine.name, prompt=prompt, max_tokens=12, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_stop_and_seed_fields(client, tiny_engine):
    messages = [{"role": "user", "content": QUESTION}]
    full = client.chat.completions.create(model=tiny_engine.name, messages=messages, temperature=0, max_tokens=20)
    stop = full.choices[0].message.content.split()[2]
    cut = client.chat.completions.create(model=tiny_engine.name, messages=messages, temperature=0, max_tokens=20,
                                         stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].message.content
    a, b = (client.chat.completions.create(model=tiny_engine.name, messages=messages, temperature=1.0,
                                           max_tokens=12, seed=11).choices[0].message.content for _ in range(2))
    assert a == b


def test_openai_errors_are_raised_as_openai_exceptions(client, tiny_engine):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert "gpt-4" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=tiny_engine.name, messages=[{"role": "user", "content": "hi"}],
                                       temperature=-1)
    assert info.value.body["param"] == "temperature"


def test_auth_refuses_missing_and_wrong_keys(live_server, tiny_engine):
    for key in ("wrong-key", live_server.api_key + "x", live_server.api_key[:-1]):
        wrong = openai.OpenAI(base_url=live_server.base_url, api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    body = {"model": tiny_engine.name, "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": live_server.api_key}, {"Authorization": "Basic " + live_server.api_key}):
        response = httpx.post(live_server.base_url + "/chat/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(live_server.url + "/metrics").status_code == 401
    assert httpx.get(live_server.url + "/health").status_code == 200  # liveness probes need no key
    assert httpx.get(live_server.url + "/metrics", headers=live_server.headers()).status_code == 200


def test_server_without_keys_is_open(open_server, tiny_engine):
    client = openai.OpenAI(base_url=open_server.base_url, api_key="anything", max_retries=0)
    assert client.models.list().data[0].id == tiny_engine.name


def test_langchain_chat_openai(live_server, tiny_engine):
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    messages = [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": QUESTION}]
    expected, _ = greedy_reference(tiny_engine, messages, 16)
    llm = ChatOpenAI(base_url=live_server.base_url, api_key=live_server.api_key, model=tiny_engine.name,
                     temperature=0, max_tokens=16, max_retries=0)
    lc_messages = [SystemMessage(messages[0]["content"]), HumanMessage(QUESTION)]
    assert llm.invoke(lc_messages).content == expected
    assert "".join(chunk.content for chunk in llm.stream(lc_messages)) == expected


def test_metrics_count_requests_and_tokens(live_server, client, tiny_engine):
    client.chat.completions.create(model=tiny_engine.name, messages=[{"role": "user", "content": "hi"}],
                                   temperature=0, max_tokens=5)
    text = httpx.get(live_server.url + "/metrics", headers=live_server.headers()).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['zhllama_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert values["zhllama_completion_tokens_total"] >= 5
    assert values["zhllama_request_latency_seconds_count"] >= 1
    assert "zhllama_queue_length" in values and "zhllama_time_to_first_token_seconds_count" in values
