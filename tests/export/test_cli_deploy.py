"""Deployment commands from the command line: a clear one-line error for each bad input of issue 7."""

from __future__ import annotations

from tests.test_cli import assert_one_line_error, run


def test_unknown_quant_type_names_the_valid_ones(tiny_zh_model, tmp_path):
    result = run("export", "gguf", "--model", tiny_zh_model, "--out", tmp_path / "m.gguf", "--type", "q5_k")
    assert_one_line_error(result, "q5_k", "q8_0", "q4_0")
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_where_a_folder_is_expected_and_the_other_way_round(tiny_chat_model, tmp_path):
    gguf = tmp_path / "m.gguf"
    assert run("export", "gguf", "--model", tiny_chat_model, "--out", gguf, "--type", "f16").returncode == 0
    text = tmp_path / "d.txt"
    text.write_text("你好", encoding="utf-8")
    assert_one_line_error(run("eval", "ppl", "--model", gguf, "--data", text), "is a GGUF file")
    assert_one_line_error(run("serve", "--backend", "llamacpp", "--model", tiny_chat_model), "HF folder")


def test_rope_factor_of_one_or_less_is_refused(tiny_chat_model):
    result = run("generate", "--model", tiny_chat_model, "--prompt", "你好", "--rope", "linear", "--rope-factor", "1")
    assert_one_line_error(result, "factor")
