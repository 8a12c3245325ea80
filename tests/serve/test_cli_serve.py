"""`zhllama serve` and `zhllama generate` as separate processes, the way users start them."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.test_cli import assert_one_line_error, run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_starts_answers_and_stops_on_ctrl_c(tiny_chat_model):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "zhllama", "serve", "--model", str(tiny_chat_model), "--port",
                             str(port), "--api-key", "k1", "--api-key", "k2", "--device", "cpu", "--name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                health = httpx.get(url + "/health", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert health["model"] == "tiny" and health["auth_required"] is True
        body = {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
        assert httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k2"},
                          timeout=30).json()["usage"]["completion_tokens"] == 4
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"serving tiny at http://127.0.0.1:{port}/" in out


def test_generate_prints_the_greedy_reply(tiny_chat_model, tiny_engine):
    from zhllama.infer import SamplingParams

    result = run("generate", "--model", tiny_chat_model, "--prompt", "你好，介绍一下长城。", "--max-tokens", 10,
                 "--device", "cpu")
    assert result.returncode == 0, result.stderr
    params = SamplingParams(max_tokens=10, temperature=0)
    ids = tiny_engine.encode_chat([{"role": "user", "content": "你好，介绍一下长城。"}], params)
    assert result.stdout == tiny_engine.generate(ids, params).text + "\n"


def test_bad_sampling_flag_is_a_one_line_error(tiny_chat_model):
    result = run("generate", "--model", tiny_chat_model, "--prompt", "你好", "--temperature", "-1")
    assert_one_line_error(result, "temperature")


def test_wrong_tokenizer_for_the_model_is_refused(tmp_path, tiny_chat_model, llama2_dir, extended_dir):
    from zhllama import model

    small = model.init_model("tiny", llama2_dir, tmp_path / "llama2-tiny", seed=0)  # 32,000 embedding rows
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (extended_dir / name).exists():
            shutil.copy(extended_dir / name, small / name)
    result = run("serve", "--model", small, "--port", free_port())
    assert_one_line_error(result, "not this model's tokenizer")


def test_missing_model_folder(tmp_path):
    # chat, serve and generate all load through load_engine
    assert_one_line_error(run("chat", "--model", tmp_path / "nope"), "does not exist")


def test_an_empty_api_key_is_refused_at_start(tiny_chat_model):
    # it would accept "Authorization: Bearer " from anyone; refused before the model loads
    result = run("serve", "--model", tiny_chat_model, "--port", free_port(), "--api-key", "k1", "--api-key", "")
    assert_one_line_error(result, "--api-key must not be empty")
