"""Bad input on the command line: a one-line error naming the problem, a non-zero exit, no output left."""

import json
import subprocess
import sys

import pytest

from zhllama.cli import expand_multi_value_options, main


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "zhllama", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def run_in_process(capsys, *args):
    """`run` without a new interpreter: main() as the console script calls it (an uncaught exception fails the test
    with its traceback, as a user would see one)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(list(map(str, args)))
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(args, done.value.code, printed.out, printed.err)


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
    written = len(rows[0]["text"])
    assert result.stdout == (f"kept 1 of 3 documents ({written} characters) in {tmp_path / 'clean.jsonl'}; "
                             "dropped: too_short 1, exact_duplicate 1; skipped 1 malformed line\n")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["documents"]["kept"] == 1
    assert report["documents"]["dropped"]["exact_duplicate"] == 1 and report["documents"]["dropped"]["too_short"] == 1
    why = "malformed JSON (Expecting property name enclosed in double quotes)"
    assert report["malformed"]["lines"] == [f"{src}:4: {why}"]
    result = run("data", "pack", "--tokenizer", extended_dir, "--input", tmp_path / "clean.jsonl", "--seq-len", 8,
                 "--out", tmp_path / "packed")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'packed'}\n"
    meta = json.loads((tmp_path / "packed" / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] == 1 and meta["seq_len"] == 8


def test_train_with_an_unknown_recipe_field_is_a_one_line_error(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("max_stepz: 3\n")
    result = run("train", "pretrain", "--model", tmp_path, "--data", tmp_path, "--out", tmp_path / "run",
                 "--config", recipe)
    assert_one_line_error(result, "unknown config field 'max_stepz'")


def test_data_clean_of_a_binary_file_is_an_error_and_writes_nothing(tmp_path):
    blob = tmp_path / "blob.txt"
    blob.write_bytes(bytes(range(256)) * 8)  # one line of control characters, then lines that are not UTF-8
    result = run("data", "clean", "--input", blob, "--out", tmp_path / "clean.jsonl", "--report", tmp_path / "r.json",
                 "--workers", 1)
    *warnings, error = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(warnings) == 5  # the first malformed lines are named, then the error
    assert all(w.startswith(f"warning: skipped {blob}:") and w.endswith("not UTF-8 text (byte 117)") for w in warnings)
    assert error == f"error: no usable document in {blob} (1 read, all dropped: too_short 1; 8 malformed lines skipped)"
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.txt"]


def unwritable_commands(tmp_path, out, src, tiny_zh_model, extended_dir, llama2_gguf):
    return {
        "export gguf": ["export", "gguf", "--model", tiny_zh_model, "--out", out],
        "data clean": ["data", "clean", "--input", src, "--out", out, "--report", tmp_path / "r.json"],
        "data clean --report": ["data", "clean", "--input", src, "--out", tmp_path / "c.jsonl", "--report", out],
        "data pack": ["data", "pack", "--tokenizer", extended_dir, "--input", src, "--seq-len", 8, "--out", out],
        "model init": ["model", "init", "--preset", "tiny", "--tokenizer", extended_dir, "--out", out],
        "tokenizer from-gguf": ["tokenizer", "from-gguf", llama2_gguf, "--out", out],
    }


@pytest.mark.parametrize("command", ["export gguf", "data clean", "data clean --report", "data pack", "model init",
                                     "tokenizer from-gguf"])
def test_an_output_that_cannot_be_written_is_one_line_naming_it(command, tmp_path, capsys, tiny_zh_model,
                                                                extended_dir, llama2_gguf):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "今天天气很好，我们去公园散步，看到很多人在锻炼身体。"}, ensure_ascii=False)
                   + "\n", encoding="utf-8")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "sub" / "out"
    result = run_in_process(capsys, *unwritable_commands(tmp_path, out, src, tiny_zh_model, extended_dir,
                                                         llama2_gguf)[command])
    assert_one_line_error(result, f"cannot write {out}: {blocker} is a file, not a folder")
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "in.jsonl"]


def test_multi_value_expansion_follows_the_command():
    # `train sft --data` takes several files, `train pretrain --data` several folders (mixed by weight); `--model`
    # of `eval long` takes one
    for command in ("sft", "pretrain"):
        assert expand_multi_value_options(["train", command, "--data", "a", "b:0.2", "--out", "o"]) == \
            ["train", command, "--data", "a", "--data", "b:0.2", "--out", "o"]
    argv = ["eval", "long", "--model", "m", "x"]
    assert expand_multi_value_options(argv) == argv
    assert expand_multi_value_options(["serve", "--model", "m", "--api-key", "k1", "k2"])[-4:] == \
        ["--api-key", "k1", "--api-key", "k2"]


def test_a_second_value_for_a_one_value_option_is_refused(tmp_path):
    result = run("train", "pretrain", "--model", tmp_path / "m", "--out", tmp_path / "run", tmp_path / "b",
                 "--data", tmp_path / "a")
    assert result.returncode == 2
    assert "unexpected extra argument" in result.stderr and str(tmp_path / "b") in result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(("flags", "words"), [
    (["--lora", "--qlora"], ["choose one of --lora and --qlora"]),
    (["--lora", "--trainable", "all"], ["--lora means --trainable lora", "--trainable all"]),
])
def test_trainable_flags_agree_across_train_commands(tmp_path, capsys, tiny_zh_model, flags, words):
    for command in (["train", "pretrain", "--data", tmp_path], ["train", "sft", "--data", tmp_path / "x.json"]):
        result = run_in_process(capsys, *command, "--model", tiny_zh_model, "--out", tmp_path / "run", *flags)
        assert_one_line_error(result, *words)
    assert not (tmp_path / "run").exists()


def test_data_clean_takes_a_shipped_recipe_by_name(tmp_path):
    src = tmp_path / "in.jsonl"
    long = ("今天天气很好，我们去公园散步，看到很多人在锻炼身体，"
            "有的跑步，有的打太极拳，还有的在湖边下棋聊天，非常热闹。")
    rows = ["今天天气很好，我们去公园散步，看到很多人在锻炼身体。", long]  # 25 and 54 characters: the default
    assert 20 < len(rows[0]) < 50 < len(long)  # min_chars (20) keeps both, clean_web's (50) only the long one
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows), encoding="utf-8")
    result = run("data", "clean", "--input", src, "--out", tmp_path / "c.jsonl", "--report", tmp_path / "r.json",
                 "--config", "clean_web", "--workers", 1, "--no-near-dedup")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["min_chars"] == 50 and report["config"]["workers"] == 1
    assert report["config"]["near_dedup"] is False
    assert report["documents"]["kept"] == 1 and report["documents"]["dropped"]["too_short"] == 1
