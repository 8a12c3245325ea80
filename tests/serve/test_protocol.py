"""Wire details of the OpenAI protocol that real clients depend on."""

import json

from zhllama.serve.protocol import sse


def test_sse_event_is_one_line_whatever_the_model_wrote():
    text = "第一行\n第二行\r\u2028\u2029\x85\x0b\x0c末尾"
    event = sse({"choices": [{"delta": {"content": text}}]}).decode()
    assert event.endswith("\n\n")
    lines = event.splitlines()  # httpx's aiter_lines splits like this
    assert len(lines) == 2 and lines[1] == ""
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["delta"]["content"] == text
    assert "第一行" in lines[0]  # Chinese stays readable, three bytes a character
