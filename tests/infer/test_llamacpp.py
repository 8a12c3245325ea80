"""The llama.cpp backend on an f16 GGUF of the tiny chat model: the same prompts as the HF backend, llama.cpp's
own greedy tokens, streaming, stop strings, cancellation and errors."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

try:
    import llama_cpp
except ImportError:
    pytest.skip("llama-cpp-python is not installed", allow_module_level=True)

from zhllama.errors import ZhllamaError
from zhllama.infer import SamplingParams
from zhllama.infer.llamacpp import load_llamacpp_engine, tokenizer_cache_dir

MESSAGES = [{"role": "system", "content": "你是一个乐于助人的助手。"},
            {"role": "user", "content": "你好，请用一句话介绍长城。Hello world!"}]
GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_chat_model):
    from zhllama.export.gguf import export_gguf

    return export_gguf(tiny_chat_model, tmp_path_factory.mktemp("llamacpp") / "tiny-chat-f16.gguf", "f16")


@pytest.fixture(scope="module")
def cpp_engine(tiny_gguf):
    from zhllama.assets import cache_dir

    engine = load_llamacpp_engine(tiny_gguf, name="tiny-gguf", max_tokens_limit=512, threads=2)
    yield engine
    engine.close()
    shutil.rmtree(tokenizer_cache_dir(tiny_gguf, cache_dir()), ignore_errors=True)


def collect(engine, ids, params, cancel_after=None):
    """The raw token ids a backend reports, optionally cancelling after ``cancel_after`` of them."""
    got, done = [], threading.Event()
    cancel = None

    def sink(new, finished, error):
        got.extend(new)
        if error or finished or (cancel_after is not None and len(got) >= cancel_after):
            if cancel_after is not None and not finished:
                cancel()
            done.set()

    cancel = engine._submit(ids, params, sink)
    assert done.wait(30)
    return got


def llama_cpp_greedy(gguf, ids, n, eos_ids):
    """llama.cpp's own greedy decode, on a Llama of its own."""
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=2, verbose=False)
    try:
        out = []
        for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if token in eos_ids or len(out) >= n:
                return out
    finally:
        llm.close()


def test_prompts_and_stops_match_the_hf_backend(cpp_engine, tiny_engine):
    assert cpp_engine.prompt.source == "model"  # the GGUF's chat template, not a fallback
    assert cpp_engine.prompt.stop == tiny_engine.prompt.stop and cpp_engine.eos_ids == tiny_engine.eos_ids
    assert cpp_engine.encode_chat(MESSAGES, GREEDY) == tiny_engine.encode_chat(MESSAGES, GREEDY)
    text = "中国的首都是北京。  Two spaces, 数字 12345 and an emoji 🙂"
    assert cpp_engine.encode_text(text, GREEDY) == tiny_engine.encode_text(text, GREEDY)
    assert cpp_engine.context_length == 2048 and cpp_engine.max_tokens_limit == 512


def test_greedy_equals_llama_cpp_own_decode(cpp_engine, tiny_gguf):
    ids = cpp_engine.encode_chat(MESSAGES, GREEDY)
    expected = llama_cpp_greedy(tiny_gguf, ids, GREEDY.max_tokens, cpp_engine.eos_ids)
    assert collect(cpp_engine, ids, GREEDY) == expected
    reply = cpp_engine.generate(ids, GREEDY)
    assert reply.text == cpp_engine.tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.completion_tokens == len(expected) and reply.prompt_tokens == len(ids)


def test_stream_deltas_join_to_the_full_text(cpp_engine):
    ids = cpp_engine.encode_chat(MESSAGES, GREEDY)
    full = cpp_engine.generate(ids, GREEDY)
    deltas = list(cpp_engine.stream(ids, GREEDY))
    assert "".join(d.text for d in deltas) == full.text
    assert sum(1 for d in deltas if d.text) > 1  # it really streamed
    assert deltas[-1].finish_reason == full.finish_reason and deltas[-1].completion_tokens == full.completion_tokens


def test_stop_strings_cut(cpp_engine):
    ids = cpp_engine.encode_chat(MESSAGES, GREEDY)
    full = cpp_engine.generate(ids, GREEDY).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    reply = cpp_engine.generate(ids, SamplingParams(max_tokens=24, temperature=0, stop=(stop,)))
    assert reply.finish_reason == "stop" and reply.text == full[:full.index(stop)]


def test_cancel_stops_at_once_and_frees_the_worker(cpp_engine):
    ids = cpp_engine.encode_chat(MESSAGES, GREEDY)
    long = SamplingParams(max_tokens=500, temperature=0)
    assert len(collect(cpp_engine, ids, long, cancel_after=3)) == 3  # the flag is checked before every token
    stream = cpp_engine.stream(ids, long)
    next(stream)
    stream.close()  # a client that went away
    start = time.perf_counter()
    assert cpp_engine.generate(ids, GREEDY).text == cpp_engine.generate(ids, GREEDY).text
    assert time.perf_counter() - start < 10
    assert cpp_engine.healthy()


def test_seeded_sampling_is_reproducible(cpp_engine):
    ids = cpp_engine.encode_chat(MESSAGES, GREEDY)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_k=50, top_p=0.95, seed=11)
    assert collect(cpp_engine, ids, seeded) == collect(cpp_engine, ids, seeded)
    penalised = SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.3)
    assert len(collect(cpp_engine, ids, penalised)) > 0


def test_a_failed_request_leaves_the_worker_running(cpp_engine):
    deltas = list(cpp_engine.stream([1, 10**7], GREEDY))
    assert deltas[-1].finish_reason == "error" and "vocabulary" in deltas[-1].error
    assert cpp_engine.healthy()
    assert cpp_engine.generate(cpp_engine.encode_chat(MESSAGES, GREEDY), GREEDY).completion_tokens > 0


def test_close_stops_the_worker(tiny_gguf, cpp_engine):
    engine = load_llamacpp_engine(tiny_gguf, n_ctx=256, threads=1)  # the tokenizer comes from the cache now
    assert engine.healthy() and engine.context_length == 256 and engine.name == "tiny-chat-f16"
    running = engine.stream(engine.encode_chat(MESSAGES, GREEDY), SamplingParams(max_tokens=200, temperature=0))
    next(running)
    engine.close()  # a running request ends with an error, not silence
    assert not engine.healthy()
    last = list(running)[-1]
    assert last.finish_reason == "error" and "closed" in last.error and last.completion_tokens < 200
    assert list(engine.stream([1, 2], GREEDY))[-1].finish_reason == "error"


def test_wrong_inputs_are_one_line_errors(tiny_chat_model, tiny_gguf, tmp_path, monkeypatch):
    with pytest.raises(ZhllamaError, match=r"is an HF folder; --backend llamacpp takes a \.gguf file.*export gguf"):
        load_llamacpp_engine(tiny_chat_model)
    (tmp_path / "x.gguf").write_text("not a model")
    with pytest.raises(ZhllamaError, match="is not a GGUF file"):
        load_llamacpp_engine(tmp_path / "x.gguf")
    with pytest.raises(ZhllamaError, match="does not exist"):
        load_llamacpp_engine(tmp_path / "missing.gguf")
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as if it were not installed
    with pytest.raises(ZhllamaError, match=r"needs llama-cpp-python.*pip install"):
        load_llamacpp_engine(tiny_gguf)


def test_f16_logits_match_transformers(tiny_gguf, tiny_engine):
    """The GGUF computes the HF model's function: logits along HF's greedy reply agree to f16 precision, and so
    does the argmax wherever it is not a near tie (a random tiny model has many)."""
    import numpy as np
    import torch

    ids = tiny_engine.encode_chat(MESSAGES, GREEDY)
    model = tiny_engine.model
    with torch.no_grad():
        seq = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=32, do_sample=False)[0].tolist()
        hf = model(torch.tensor([seq])).logits[0].float().numpy()
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    try:
        llm.eval(seq)
        cpp = np.array(llm.scores[:len(seq)])
    finally:
        llm.close()
    assert np.abs(cpp - hf).max() < 5e-3  # measured 1.4e-3 on the chat prompt
    top2 = np.sort(hf, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-2
    assert (cpp.argmax(-1) == hf.argmax(-1))[clear].all()
