"""zhllama.model.loading, the one place that loads and fingerprints tokenizers and models: SentencePiece folders as
before, and byte-level BPE folders with tokenizer.json only (Llama-3) through every stage that takes a tokenizer."""

import json
import shutil

import pytest

from zhllama.artifacts import file_sha256, read_provenance
from zhllama.cli import main
from zhllama.data.pack import PackedData, check_tokenizer, unpack_documents
from zhllama.errors import ZhllamaError
from zhllama.model.loading import (
    check_model_vocab,
    embedding_rows,
    load_tokenizer,
    require_hf_folder,
    tokenizer_kind,
    tokenizer_sha256,
)

TEXTS = ["中国的人工智能发展很快。", "北京大学的语言模型 and some English, 2024."]


def run_cli(capsys, *args):
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(list(map(str, args)))
    printed = capsys.readouterr()
    return done.value.code, printed.out, printed.err


def test_bpe_folder_is_fingerprinted_by_its_tokenizer_json(llama3_hf):
    assert not (llama3_hf / "tokenizer.model").exists()
    assert tokenizer_kind(llama3_hf) == "bpe"
    assert tokenizer_sha256(llama3_hf) == file_sha256(llama3_hf / "tokenizer.json")


def test_spm_fingerprint_is_unchanged(llama2_dir, extended_dir):
    # Packed data and provenance written before BPE support hold the sha256 of tokenizer.model: they must match.
    for folder in (llama2_dir, extended_dir):
        assert (folder / "tokenizer.json").is_file()
        assert tokenizer_kind(folder) == "spm"
        assert tokenizer_sha256(folder) == file_sha256(folder / "tokenizer.model")


def test_folder_without_a_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(ZhllamaError, match="no tokenizer.model or tokenizer.json") as err:
        tokenizer_sha256(tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(ZhllamaError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(ZhllamaError, match="is a GGUF file"):
        require_hf_folder(gguf, "tokenizer")


def test_llama3_tokenizer_loads(llama3_hf):
    tok = load_tokenizer(llama3_hf, strict=True)
    assert len(tok) >= 128_256
    assert tok.convert_ids_to_tokens(tok.bos_token_id) == "<|begin_of_text|>"
    assert tok.decode(tok("中国人工智能", add_special_tokens=False)["input_ids"]) == "中国人工智能"


def test_tokenizer_must_fit_the_model(tiny_llama3, tiny_base, llama3_hf, llama2_dir):
    assert embedding_rows(tiny_llama3) == len(load_tokenizer(llama3_hf))
    check_model_vocab(tiny_llama3, load_tokenizer(llama3_hf))
    check_model_vocab(tiny_llama3, load_tokenizer(llama2_dir))  # fewer pieces than rows: padded rows are fine
    with pytest.raises(ZhllamaError) as err:
        check_model_vocab(tiny_base, load_tokenizer(llama3_hf))
    message = str(err.value)
    assert "128,257 pieces but the model has 32,000 embedding rows" in message and "\n" not in message


def test_model_init_cli_takes_a_tokenizer_json_folder(capsys, tiny_llama3, llama3_hf, tmp_path):
    code, out, err = run_cli(capsys, "model", "init", "--preset", "tiny", "--tokenizer", llama3_hf,
                             "--out", tmp_path / "m")
    assert code in (0, None), err
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["vocab_size"] == len(load_tokenizer(llama3_hf))
    assert (config["bos_token_id"], config["eos_token_id"]) == (128000, 128001)
    assert (tmp_path / "m" / "tokenizer.json").is_file() and not (tmp_path / "m" / "tokenizer.model").exists()
    record = read_provenance(tmp_path / "m")
    assert record["inputs"]["tokenizer"] == file_sha256(llama3_hf / "tokenizer.json")
    # The same seed as the session's tiny Llama-3 model: bitwise the same folder contents.
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (tiny_llama3 / "model.safetensors").read_bytes()


def test_data_pack_cli_takes_a_tokenizer_json_folder(capsys, llama3_hf, tiny_llama3, tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS * 4),
                      encoding="utf-8")
    code, _, err = run_cli(capsys, "data", "pack", "--tokenizer", llama3_hf, "--input", corpus, "--seq-len", 16,
                           "--out", tmp_path / "packed")
    assert code in (0, None), err
    data = PackedData(tmp_path / "packed")
    tok = load_tokenizer(llama3_hf)
    assert data.meta["dtype"] == "uint32" and data.meta["tokenizer_vocab_size"] == len(tok)
    assert data.tokenizer_sha256 == file_sha256(llama3_hf / "tokenizer.json")
    assert (data.bos_id, data.eos_id) == (128000, 128001)
    assert [tok.decode(d) for d in unpack_documents(data)] == TEXTS * 4
    check_tokenizer(data, tiny_llama3)  # the model's copy of the tokenizer has the same fingerprint


def test_pack_refuses_a_bpe_tokenizer_without_bos(llama3_hf, tmp_path):
    from zhllama.data.pack import pack

    folder = tmp_path / "no-bos"
    folder.mkdir()
    shutil.copy(llama3_hf / "tokenizer.json", folder)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(json.dumps({"text": TEXTS[0]}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(ZhllamaError, match="no BOS or EOS"):
        pack(folder, [corpus], 4, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_damaged_tokenizer_json_is_a_one_line_error(llama3_hf, tmp_path):
    folder = tmp_path / "damaged"
    folder.mkdir()
    shutil.copy(llama3_hf / "tokenizer_config.json", folder)
    text = (llama3_hf / "tokenizer.json").read_text(encoding="utf-8")
    (folder / "tokenizer.json").write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(ZhllamaError, match="cannot load the tokenizer") as err:
        load_tokenizer(folder)
    assert "\n" not in str(err.value)
