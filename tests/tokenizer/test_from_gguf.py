import gguf
import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from tests.tokenizer.strings import random_strings
from zhllama import tokenizer
from zhllama.errors import ZhllamaError
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


def test_non_spm_gguf_is_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ZhllamaError, match="not a SentencePiece"):
        tokenizer.from_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
