"""Bad input on the command line: a one-line error naming the problem, a non-zero exit, no output left."""

import json
import subprocess
import sys


from zhllama.cli import expand_multi_value_options


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "zhllama", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]


def test_multi_value_options_are_expanded():
    argv = ["tokenizer", "stats", "--tokenizer", "a", "b", "--zh", "z1", "z2", "--json", "o.json"]
    assert expand_multi_value_options(argv) == ["tokenizer", "stats", "--tokenizer", "a", "--tokenizer", "b",
                                                "--zh", "z1", "--zh", "z2", "--json", "o.json"]


def test_empty_input(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    result = run("tokenizer", "train", "--input", tmp_path / "empty.jsonl", "--vocab-size", 1000,
                 "--out", tmp_path / "out")
    assert_one_line_error(result, "no text found")
    assert not (tmp_path / "out").exists()


def test_non_utf8_input(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    result = run("tokenizer", "train", "--input", tmp_path / "latin1.txt", "--vocab-size", 1000,
                 "--out", tmp_path / "out")
    assert_one_line_error(result, "latin1.txt:1", "not UTF-8")
    assert not (tmp_path / "out").exists()


def test_base_not_sentencepiece(tmp_path, zh_train_file):
    (tmp_path / "junk.model").write_bytes(b"not a model at all")
    result = run("tokenizer", "extend", "--base", tmp_path / "junk.model", "--input", zh_train_file,
                 "--vocab-size", 40000, "--out", tmp_path / "out")
    assert_one_line_error(result, "junk.model", "not a SentencePiece model")
    assert not (tmp_path / "out").exists()


def test_vocab_size_smaller_than_base(tmp_path, llama2_dir, zh_train_file):
    result = run("tokenizer", "extend", "--base", llama2_dir, "--input", zh_train_file, "--vocab-size", 30000,
                 "--out", tmp_path / "out")
    assert_one_line_error(result, "30000", "32000")
    assert not (tmp_path / "out").exists()


def test_out_folder_of_someone_else_is_not_overwritten(tmp_path, llama2_gguf):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = run("tokenizer", "from-gguf", llama2_gguf, "--out", mine)
    assert_one_line_error(result, "not written by zhllama")
    assert (mine / "notes.txt").read_text() == "keep me"


def test_data_clean_and_pack_from_the_command_line(tmp_path, extended_dir):
    rows = [{"text": "今天天气很好，我们去公园散步，看到很多人在锻炼身体。"}] * 2 + [{"text": "short"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "{broken\n", encoding="utf-8")
    result = run("data", "clean", "--input", src, "--out", tmp_path / "clean.jsonl", "--report", tmp_path / "r.json",
                 "--workers", 1)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["documents"]["kept"] == 1
    assert report["documents"]["dropped"]["exact_duplicate"] == 1 and report["documents"]["dropped"]["too_short"] == 1
    why = "malformed JSON (Expecting property name enclosed in double quotes)"
    assert report["malformed"]["lines"] == [f"{src}:4: {why}"]
    result = run("data", "pack", "--tokenizer", extended_dir, "--input", tmp_path / "clean.jsonl", "--seq-len", 8,
                 "--out", tmp_path / "packed")
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "packed" / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] == 1 and meta["seq_len"] == 8


def test_train_with_an_unknown_recipe_field_is_a_one_line_error(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("max_stepz: 3\n")
    result = run("train", "pretrain", "--model", tmp_path, "--data", tmp_path, "--out", tmp_path / "run",
                 "--config", recipe)
    assert_one_line_error(result, "unknown config field 'max_stepz'")
