"""``zhllama.infer.load_engine`` chooses the engine: a folder is HF, a GGUF file (by its magic bytes) llama.cpp, and
anything else a one-line error; ``chat``, ``generate``, ``serve`` and ``eval qa`` run a GGUF file through it. And the
HF engine over an already loaded model, as ``eval track`` builds it."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest

from zhllama.errors import ZhllamaError
from zhllama.infer import HFEngine, SamplingParams, detect_backend, load_engine

GREEDY = SamplingParams(max_tokens=10, temperature=0)
QUESTION = "你好，介绍一下长城。"


def one_line_error(call, *words) -> str:
    with pytest.raises(ZhllamaError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


# --- choosing, without llama.cpp ---------------------------------------------------------------------------


def test_auto_picks_hf_for_a_folder(tiny_chat_model, tiny_engine):
    assert detect_backend(tiny_chat_model) == "hf"
    assert isinstance(tiny_engine, HFEngine)  # the session engine is loaded through load_engine, backend auto


def test_the_gguf_magic_decides_not_the_name(tmp_path):
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(b"GGUF" + bytes(60))
    assert detect_backend(renamed) == "llamacpp"
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    one_line_error(lambda: load_engine(fake), str(fake), "named .gguf but is not a GGUF", "magic",
                   "HF model folder or a GGUF file")
    one_line_error(lambda: load_engine(fake, backend="llamacpp"), str(fake), "is not a GGUF file")


def test_a_path_that_is_no_model_is_a_one_line_error(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    one_line_error(lambda: load_engine(notes), str(notes), "neither an HF model folder nor a GGUF file")
    one_line_error(lambda: load_engine(tmp_path / "missing"), str(tmp_path / "missing"), "does not exist",
                   "HF model folder or a GGUF file")


def test_unknown_backend_names_the_choices(tiny_chat_model):
    one_line_error(lambda: load_engine(tiny_chat_model, backend="vllm"), "auto, hf, llamacpp", "'vllm'")


def test_options_a_gguf_file_cannot_take_are_refused_before_loading(tmp_path, tiny_chat_model):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))  # refused before llama.cpp would read it
    for backend in ("auto", "llamacpp"):
        for options in ({"quantize": "int8"}, {"rope": "linear", "rope_factor": 2.0}, {"rope_factor": 2.0}):
            one_line_error(lambda o=options, b=backend: load_engine(gguf, backend=b, **o), "--quantize and --rope",
                           "export gguf")
        one_line_error(lambda b=backend: load_engine(gguf, backend=b, device="cuda"), "--device cuda", "CPU")
    one_line_error(lambda: load_engine(gguf, backend="hf"), "is a GGUF file; --backend hf")
    one_line_error(lambda: load_engine(tiny_chat_model, backend="llamacpp"), "is an HF folder",
                   "--backend llamacpp takes a .gguf file")


def test_importing_infer_does_not_import_llama_cpp():
    code = "import sys, zhllama.infer, zhllama.serve; assert 'llama_cpp' not in sys.modules, 'imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_serve_config_backend_defaults_to_auto():
    from zhllama.serve import ServeConfig

    assert ServeConfig().backend == "auto"


# --- a GGUF file through the commands ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def tiny_gguf(llama_cpp, tmp_path_factory, tiny_chat_model):
    from zhllama.assets import cache_dir
    from zhllama.export.gguf import export_gguf
    from zhllama.infer.llamacpp import tokenizer_cache_dir

    gguf = export_gguf(tiny_chat_model, tmp_path_factory.mktemp("load") / "tiny-chat-f16.gguf", "f16")
    yield gguf
    shutil.rmtree(tokenizer_cache_dir(gguf, cache_dir()), ignore_errors=True)


@pytest.fixture(scope="module")
def gguf_engine(tiny_gguf):
    engine = load_engine(tiny_gguf, name="tiny-gguf")
    yield engine
    engine.close()


def greedy_reply(engine, question=QUESTION, params=GREEDY) -> str:
    return engine.generate(engine.encode_chat([{"role": "user", "content": question}], params), params).text


def test_auto_picks_llama_cpp_for_a_gguf_file(tiny_gguf, gguf_engine):
    from zhllama.infer.llamacpp import LlamaCppEngine

    assert detect_backend(tiny_gguf) == "llamacpp"
    assert isinstance(gguf_engine, LlamaCppEngine) and gguf_engine.name == "tiny-gguf"
    assert greedy_reply(gguf_engine)  # it answers


def test_generate_runs_a_gguf_file_and_prints_the_engines_greedy_reply(tiny_gguf, gguf_engine, capsys):
    from tests.test_cli import run_in_process

    result = run_in_process(capsys, "generate", "--model", tiny_gguf, "--prompt", QUESTION, "--max-tokens", 10)
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy_reply(gguf_engine) + "\n"


def test_chat_runs_a_gguf_file(tiny_gguf, gguf_engine, capsys, monkeypatch):
    from tests.test_cli import run_in_process

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n/exit\n"))  # input() reads it: not a terminal
    result = run_in_process(capsys, "chat", "--model", tiny_gguf, "--max-tokens", 10, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tiny-chat-f16 chat. Commands:")
    assert greedy_reply(gguf_engine) + "\n" in result.stdout


def test_serve_loads_a_gguf_file_with_backend_auto(tiny_gguf, monkeypatch):
    import uvicorn

    from zhllama.infer.llamacpp import LlamaCppEngine
    from zhllama.serve import ServeConfig, run_server

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.setdefault("engine", app.state.engine))
    run_server(ServeConfig(model_dir=tiny_gguf, port=0, name="served"))
    engine = served["engine"]
    assert isinstance(engine, LlamaCppEngine) and engine.name == "served" and not engine.healthy()  # closed


def test_eval_qa_answers_with_a_gguf_file(tiny_gguf, gguf_engine, tmp_path):
    from zhllama.eval.qa import run_qa

    questions = tmp_path / "questions.jsonl"
    rows = [{"id": "q1", "category": "常识", "question": QUESTION},
            {"id": "q2", "category": "常识", "question": "1+1=?"}]
    questions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    run_qa([tiny_gguf], questions, tmp_path / "qa", max_tokens=10, progress=False)
    answers = [json.loads(line) for line in (tmp_path / "qa" / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["q1", "q2"] and {a["model"] for a in answers} == {"tiny-chat-f16.gguf"}
    assert [a["answer"] for a in answers] == [greedy_reply(gguf_engine, r["question"]) for r in rows]


# --- an engine over a loaded model (eval track) ------------------------------------------------------------


def test_track_answers_through_an_engine_are_greedy_and_leave_the_model_as_it_was(tiny_zh_model):
    import torch

    from zhllama.chat.control import encode_plain
    from zhllama.eval.track import greedy_answers
    from zhllama.model.loading import load_checked

    model, tokenizer = load_checked(tiny_zh_model, "cpu")
    assert not tokenizer.chat_template  # a pretraining run: the raw prompt is continued
    prompts = ["中国的首都是", "</s>人工智能是"]  # a control token string in a prompt is text
    attention = model.config._attn_implementation
    first = greedy_answers(model, tokenizer, prompts, max_new_tokens=8)
    assert greedy_answers(model, tokenizer, prompts, max_new_tokens=8) == first  # deterministic
    assert model.config._attn_implementation == attention  # the engine handed the model back for scoring
    for prompt, answer in zip(prompts, first, strict=True):
        ids = torch.tensor(encode_plain(tokenizer, [prompt], add_special_tokens=True))
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        assert answer == tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True,
                                          clean_up_tokenization_spaces=False)


def test_track_answers_of_a_chat_model_follow_the_prompt_rule(tiny_chat_model, tiny_engine):
    from zhllama.eval.track import greedy_answers
    from zhllama.model.loading import load_checked

    model, tokenizer = load_checked(tiny_chat_model, "cpu")
    assert greedy_answers(model, tokenizer, [QUESTION], max_new_tokens=10) == [greedy_reply(tiny_engine)]
