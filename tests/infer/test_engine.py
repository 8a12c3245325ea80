"""The HF engine: greedy equals generate(), sampling parameters, stop strings, cancellation, batching."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from zhllama.infer import BadRequest, SamplingParams

QUESTION = [{"role": "user", "content": "你好，请介绍一下北京。"}]


def reference(engine, ids, n):
    out = engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_greedy_equals_model_generate(tiny_engine):
    ids = tiny_engine.encode_chat(QUESTION, SamplingParams(max_tokens=24))
    expected = tiny_engine.tokenizer.decode(reference(tiny_engine, ids, 24), skip_special_tokens=True)
    result = tiny_engine.generate(ids, SamplingParams(max_tokens=24, temperature=0))
    assert result.text == expected
    assert (result.prompt_tokens, result.completion_tokens, result.finish_reason) == (len(ids), 24, "length")


def test_stream_joins_to_generate_and_never_splits_a_character(tiny_engine):
    ids = tiny_engine.encode_chat(QUESTION, SamplingParams(max_tokens=40))
    params = SamplingParams(max_tokens=40, temperature=0)
    deltas = list(tiny_engine.stream(ids, params))
    assert "".join(d.text for d in deltas) == tiny_engine.generate(ids, params).text
    assert all("\ufffd" not in d.text for d in deltas)
    assert [d.finish_reason for d in deltas][-1] == "length" and deltas[-1].completion_tokens == 40


def test_stop_string_cuts_the_reply(tiny_engine):
    ids = tiny_engine.encode_chat(QUESTION, SamplingParams(max_tokens=24))
    full = tiny_engine.generate(ids, SamplingParams(max_tokens=24, temperature=0)).text
    stop = full.strip().split()[1]  # a word from the middle of the greedy reply
    cut = tiny_engine.generate(ids, SamplingParams(max_tokens=24, temperature=0, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full[:full.index(stop)]
    assert cut.completion_tokens < 24


def test_seed_makes_sampling_reproducible(tiny_engine):
    ids = tiny_engine.encode_chat(QUESTION, SamplingParams(max_tokens=16))
    a, b, c = (tiny_engine.generate(ids, SamplingParams(max_tokens=16, temperature=1.0, seed=s)).text
               for s in (7, 7, 8))
    assert a == b
    assert a != c


def test_repetition_penalty_changes_greedy_output(tiny_engine):
    ids = tiny_engine.encode_chat(QUESTION, SamplingParams(max_tokens=24))
    plain = tiny_engine.generate(ids, SamplingParams(max_tokens=24, temperature=0))
    penalised = tiny_engine.generate(ids, SamplingParams(max_tokens=24, temperature=0, repetition_penalty=2.0))
    # the random tiny model repeats itself; a strong penalty must give more distinct words
    assert len(set(penalised.text.split())) > len(set(plain.text.split()))


def test_a_new_request_joins_without_waiting(tiny_engine):
    ids = tiny_engine.encode_chat(QUESTION, SamplingParams(max_tokens=200))
    finished = {}

    def run(name, n):
        tiny_engine.generate(ids, SamplingParams(max_tokens=n, temperature=0))
        finished[name] = time.perf_counter()

    long = threading.Thread(target=run, args=("long", 200))
    long.start()
    time.sleep(0.3)  # the long one is decoding
    run("short", 4)
    long.join()
    assert finished["short"] < finished["long"]


def test_closing_a_stream_cancels_its_generation(tiny_engine):
    ids = tiny_engine.encode_chat(QUESTION, SamplingParams(max_tokens=200))
    stream = tiny_engine.stream(ids, SamplingParams(max_tokens=200, temperature=0))
    next(stream)
    stream.close()
    deadline = time.time() + 5
    while tiny_engine.busy_requests() and time.time() < deadline:
        time.sleep(0.01)
    assert tiny_engine.busy_requests() == 0


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", 0), ("max_tokens", 10_000), ("max_tokens", "8"), ("temperature", -0.1), ("temperature", 2.5),
    ("top_p", 0.0), ("top_k", -1), ("repetition_penalty", 0.0), ("seed", -1), ("stop", ("",)),
    ("stop", ("a", "b", "c", "d", "e")), ("temperature", float("nan")), ("max_tokens", True),
    # what the engines cannot hold: top_k beyond int32 stopped the batch for everyone; a 400-digit temperature
    # made the error message itself raise
    ("top_k", 2**31), ("top_k", 10**30), ("seed", 2**63), ("temperature", 10**400), ("top_p", float("inf")),
    ("repetition_penalty", 1e-300),
])
def test_sampling_params_are_checked(tiny_engine, field, value):
    with pytest.raises(BadRequest) as info:
        SamplingParams(**{field: value}).check(tiny_engine.max_tokens_limit)
    assert info.value.param == field


def test_a_temperature_too_small_for_float32_is_greedy(tiny_engine):
    """1e-50 is 0 in the batch's float32 and 1e-40 divides logits into infinities: both must be greedy, not
    garbage (batch lane) or a failed request (the seeded, exclusive lane)."""
    ids = tiny_engine.encode_chat(QUESTION, SamplingParams(max_tokens=12))
    greedy = tiny_engine.generate(ids, SamplingParams(max_tokens=12, temperature=0)).text
    for temperature in (1e-50, 1e-40, 1e-6):
        for seed in (None, 3):
            params = SamplingParams(max_tokens=12, temperature=temperature, seed=seed).check()
            assert tiny_engine.generate(ids, params).text == greedy, (temperature, seed)


def test_integer_sampling_values_work_on_the_exclusive_lane(tiny_engine):
    """JSON's 2 is an int; HF's warpers refused an int penalty or temperature, and the request failed."""
    ids = tiny_engine.encode_chat(QUESTION, SamplingParams(max_tokens=8))
    for values in ({"repetition_penalty": 2, "temperature": 1}, {"temperature": 2, "top_p": 1}):
        floats = {name: float(value) for name, value in values.items()}
        a = tiny_engine.generate(ids, SamplingParams(max_tokens=8, seed=1, **values).check())
        b = tiny_engine.generate(ids, SamplingParams(max_tokens=8, seed=1, **floats).check())
        assert a.text == b.text and a.completion_tokens == 8


def test_too_long_prompt_is_refused_or_truncated_by_turns(tiny_engine):
    turn = "长城是中国古代的军事防御工程。" * 20
    history = []
    for i in range(8):
        history += [{"role": "user", "content": f"{i}:{turn}"}, {"role": "assistant", "content": turn}]
    messages = [{"role": "system", "content": "你是助手。"}] + history + [{"role": "user", "content": "最后一问"}]
    params = SamplingParams(max_tokens=tiny_engine.context_length - 1000)
    with pytest.raises(Exception, match="fit the model's context"):
        tiny_engine.encode_chat(messages, params)
    ids = tiny_engine.encode_chat(messages, params, truncate=True)
    text = tiny_engine.tokenizer.decode(ids)
    assert len(ids) <= 1000
    assert "你是助手。" in text and "最后一问" in text and "0:长城" not in text


def test_a_request_whose_tokens_cannot_be_handed_over_fails_alone(tiny_engine):
    """A sink that raises runs in the batch loop: it must fail its own request, not stop the loop."""
    ids = tiny_engine.encode_chat(QUESTION, SamplingParams(max_tokens=30))
    calls = []

    def broken_sink(new_ids, finished, error):
        calls.append((list(new_ids), finished, error))
        if len(calls) == 1:
            raise RuntimeError("this client is gone")

    params = SamplingParams(max_tokens=30, temperature=0)
    expected = tiny_engine.generate(ids, params).text
    other = {}
    thread = threading.Thread(target=lambda: other.setdefault("text", tiny_engine.generate(ids, params).text))
    thread.start()
    tiny_engine._submit(ids, params, broken_sink)
    thread.join(timeout=30)
    deadline = time.time() + 5
    while (len(calls) < 2 or tiny_engine.busy_requests()) and time.time() < deadline:
        time.sleep(0.01)
    assert calls[-1][1] is True and "this client is gone" in calls[-1][2]  # told it failed, once more
    assert len(calls) == 2 and other["text"] == expected
    assert tiny_engine.healthy() and tiny_engine.busy_requests() == 0
    assert tiny_engine.generate(ids, params).text == expected


def test_a_request_that_keeps_failing_the_batch_fails_and_the_engine_recovers(tiny_engine, monkeypatch):
    """A failure inside a batch step stops transformers' loop; the engine restarts it. A request that was in two
    failures is failed, so it cannot keep the engine down; the next request is served as before."""
    from transformers.generation.continuous_batching.continuous_api import ContinuousBatchProcessor

    ids = tiny_engine.encode_chat(QUESTION, SamplingParams(max_tokens=40))
    params = SamplingParams(max_tokens=40, temperature=0)
    expected = tiny_engine.generate(ids, params).text
    step, steps, restarts = ContinuousBatchProcessor._generation_step, [], tiny_engine.restarts

    def failing_after_two_steps(processor, model):
        steps.append(1)
        if len(steps) > 2:
            raise RuntimeError("injected failure")
        return step(processor, model)

    monkeypatch.setattr(ContinuousBatchProcessor, "_generation_step", failing_after_two_steps)
    with pytest.raises(RuntimeError, match="injected failure"):
        tiny_engine.generate(ids, params)
    monkeypatch.undo()
    deadline = time.time() + 10
    while (tiny_engine.restarts - restarts < 2 or not tiny_engine.manager.is_running()) and time.time() < deadline:
        time.sleep(0.01)
    # it had tokens at the first failure, so it went on once; the second failure ended it
    assert tiny_engine.restarts - restarts == 2
    assert tiny_engine.healthy() and tiny_engine.busy_requests() == 0
    assert tiny_engine.generate(ids, params).text == expected
