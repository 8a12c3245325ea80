import gguf
import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from tests.conftest import bpe_vocab_gguf
from tests.tokenizer.strings import random_strings
from zhllama import tokenizer
from zhllama.errors import ZhllamaError
from zhllama.tokenizer.gguf_vocab import proto_from_gguf, read_gguf_metadata
from zhllama.tokenizer.spm import load_proto


def test_pieces_scores_and_types_equal_the_gguf(llama2_gguf, llama2_dir):
    fields = gguf.GGUFReader(str(llama2_gguf)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    proto = load_proto(llama2_dir)
    assert len(proto.pieces) == len(tokens) == 32000
    assert [p.piece for p in proto.pieces] == tokens
    assert [p.score for p in proto.pieces] == pytest.approx(scores, abs=0)
    assert [p.type for p in proto.pieces] == types
    assert proto.normalizer_spec.name == "identity" and proto.normalizer_spec.add_dummy_prefix
    assert proto.trainer_spec.byte_fallback


def test_known_llama2_ids(llama2_dir):
    sp = spm.SentencePieceProcessor(model_file=str(llama2_dir / "tokenizer.model"))
    fast = AutoTokenizer.from_pretrained(str(llama2_dir))
    # Ids of Meta's Llama-2 tokenizer for these strings.
    assert sp.encode("Hello world", add_bos=True) == [1, 15043, 3186]
    assert fast("Hello world")["input_ids"] == [1, 15043, 3186]
    assert fast("中文")["input_ids"] == [1, 29871, 30275, 30333]
    # Whitespace runs: transformers' own conversion gives [1, 259, 25369] and [.., 268, 2457] here.
    assert fast("  leading")["input_ids"] == sp.encode("  leading", add_bos=True) == [1, 259, 8236]
    assert fast(":\n    return")["input_ids"][-3:] == [13, 1678, 736]


def test_fast_tokenizer_encodes_exactly_like_sentencepiece(llama2_dir):
    sp = spm.SentencePieceProcessor(model_file=str(llama2_dir / "tokenizer.model"))
    fast = AutoTokenizer.from_pretrained(str(llama2_dir))
    texts = random_strings(3000, seed=1)
    assert fast(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] == sp.encode(texts)
    assert fast.batch_decode(fast(texts, split_special_tokens=True)["input_ids"], skip_special_tokens=True) == texts


def _tiny_gguf(path, model):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_unsupported_gguf_tokenizer_type_is_refused(tmp_path):
    path = _tiny_gguf(tmp_path / "bert.gguf", "bert")
    with pytest.raises(ZhllamaError, match="GGUF tokenizer type is 'bert'; supported: 'llama'.*'gpt2'"):
        tokenizer.from_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bpe_gguf_is_not_rebuilt_as_sentencepiece():
    # gpt2-type vocabularies go through tokenizer/bpe.py (test_from_gguf_bpe.py), never through a ModelProto.
    with pytest.raises(ZhllamaError, match="not a SentencePiece"):
        proto_from_gguf(bpe_vocab_gguf("gpt-2"))


def test_not_a_gguf_file_is_one_line_error(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not gguf at all")
    with pytest.raises(ZhllamaError, match="not a readable GGUF file") as err:
        tokenizer.from_gguf(path, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_our_metadata_reader_equals_gguf_reader(llama2_gguf):
    fields = gguf.GGUFReader(str(llama2_gguf)).fields
    ours = read_gguf_metadata(llama2_gguf)
    assert set(ours) == {k for k in fields if not k.startswith("GGUF.")}
    for key in ours:
        assert ours[key] == pytest.approx(fields[key].contents()), key


def test_asset_cache_extracts_several_members_in_one_pass(tmp_path, monkeypatch):
    import io
    import tarfile

    from zhllama import assets

    sdist = tmp_path / "llama_cpp_python-0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in (("ggml-vocab-qwen2.gguf", b"qwen"), ("templates/x.jinja", b"{{ x }}")):
            info = tarfile.TarInfo(f"llama_cpp_python-0.0/vendor/llama.cpp/models/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("ZHLLAMA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ZhllamaError, match="not cached; run `make setup`"):
        assets.vocab_gguf("qwen2", download=False)
    with pytest.raises(ZhllamaError, match="unknown vocabulary 'llama4'; known: llama-spm, llama-bpe"):
        assets.vocab_gguf("llama4")
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(assets, "_download_sdist", lambda dest: sdist)
    monkeypatch.setattr(assets.tarfile, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    vocab, template = assets.sdist_files(["ggml-vocab-qwen2.gguf", "templates/x.jinja"])
    assert (vocab.read_bytes(), template.read_bytes(), len(opened)) == (b"qwen", b"{{ x }}", 1)
    assert assets.sdist_file("templates/x.jinja", download=False) == template  # cached now
    with pytest.raises(ZhllamaError, match="does not contain vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf"):
        assets.vocab_gguf("gpt-2")
    assert not list((tmp_path / "cache").glob("*gpt-2*")) and not list((tmp_path / "cache").glob(".*partial*"))


def test_cached_llama3_assets(llama3_gguf, llama3_template_jinja):
    assert read_gguf_metadata(llama3_gguf)["tokenizer.ggml.pre"] == "llama-bpe"
    assert "<|start_header_id|>" in llama3_template_jinja.read_text()
