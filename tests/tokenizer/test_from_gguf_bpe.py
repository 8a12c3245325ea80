"""`tokenizer from-gguf` on byte-level BPE vocabularies: the HF tokenizer encodes exactly as llama.cpp does.

The reference is llama.cpp itself (llama-cpp-python, vocabulary-only load) on the same GGUF files.
"""

import json
import random

import pytest

from tests.conftest import bpe_vocab_gguf
from tests.tokenizer.strings import EMOJI, HAN, PUNCT, ZH_TW
from zhllama import tokenizer
from zhllama.artifacts import file_sha256
from zhllama.data import builtin
from zhllama.errors import ZhllamaError
from zhllama.tokenizer import bpe
from zhllama.tokenizer.gguf_vocab import read_gguf_vocab

# vocabulary -> its tokenizer.ggml.pre (None: no key, llama.cpp's default pre-tokenizer)
SUPPORTED = {"llama-bpe": "llama-bpe", "qwen2": "qwen2", "deepseek-llm": "deepseek-llm", "gpt-2": "gpt-2",
             "aquila": None}
N_RANDOM = 10_000

EXT_B = "𠀀𪚥𠮷𡃁𢀓𣎴𤆬𥫗𦈡𧢲𨉼𩸽"
ZWJ = ["👨‍👩‍👧", "👩🏽‍🔬", "🏳️‍🌈", "👁️‍🗨️", "🧑‍🤝‍🧑", "❤️‍🔥"]
CYRILLIC = ["Привет", "мир", "токенизатор", " Ёлка", "Щука", "объём"]
VIETNAMESE = ["Tiếng Việt", "người", "Hà Nội", "phở", "đường", " Ừ", "ÀÁÂÃ", "ú ù õ ý"]
KHMER = ["ភាសាខ្មែរ", "សួស្តី", "កម្ពុជា"]
LATIN1 = ["Grüße", "schön", "øre", "þorn", "ÿ", "÷", "Ålborg", "naïve"]  # DeepSeek's user-defined tokens
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'VE", "'S", "'Re", "'LL", "'D", "'ſ", "'x",
                " don't", "I'm", "we've", "THEY'RE"]
CODE = ["def f(x):\n    return x**2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}", "if x != None:",
        "SELECT * FROM t WHERE id=42;", "#include <stdio.h>", "  # comment", "λ x → x", "a_b.c->d",
        "console.log(`${x}`);", "x = [1, 2, 3]", "<|im_start|", "[PAD151700]", "$HOME/~user|grep ^a"]
WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\n\n\n", " \t", "\r", "\u2003", "\u202f"]


def _digits(rng):
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 20)))


def _any_char(rng):
    """Any code point but NUL (C strings) and surrogates: controls, combining marks, unassigned ones too."""
    cp = rng.choice([rng.randint(1, 0x7F), rng.randint(0x80, 0x2FFF), rng.randint(0x3000, 0xFFFF),
                     rng.randint(0x10000, 0x10FFFF)])
    return "?" if 0xD800 <= cp <= 0xDFFF else chr(cp)


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    makers = [
        lambda: "".join(rng.choice(HAN) for _ in range(rng.randint(1, 10))),
        lambda: "".join(rng.choice(ZH_TW) for _ in range(rng.randint(1, 6))),
        lambda: "".join(rng.choice(EXT_B) for _ in range(rng.randint(1, 3))),
        lambda: rng.choice(PUNCT),
        lambda: rng.choice(EMOJI + ZWJ),
        lambda: _digits(rng),
        lambda: "".join(rng.choice(WHITESPACE) for _ in range(rng.randint(1, 6))),
        lambda: rng.choice(CODE),
        lambda: rng.choice(CYRILLIC),
        lambda: rng.choice(VIETNAMESE),
        lambda: rng.choice(KHMER),
        lambda: rng.choice(LATIN1),
        lambda: rng.choice(CONTRACTIONS),
        lambda: "".join(_any_char(rng) for _ in range(rng.randint(1, 4))),
        lambda: rng.choice(["hello", " world", "The", " quick", "ABC", "x", "e.g.", "—", "…", "(", ")"]),
    ]
    return ["".join(rng.choice(makers)() for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def texts():
    corpus = [doc["text"] for doc in builtin.documents("heldout")][:300]
    return random_texts(N_RANDOM, seed=14) + corpus


def _llama_cpp(gguf_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: no reference")
    return llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)


@pytest.mark.parametrize("name", SUPPORTED)
def test_ids_equal_llama_cpp(name, texts):
    path = bpe_vocab_gguf(name)
    vocab = read_gguf_vocab(path)
    assert vocab["model"] == "gpt2" and vocab.get("pre") == SUPPORTED[name]
    fast = bpe.build_fast_tokenizer(vocab, path)
    llm = _llama_cpp(path)
    ours = fast(texts, add_special_tokens=False)["input_ids"]
    ref = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]
    mismatches = [t for t, a, b in zip(texts, ours, ref, strict=True) if a != b]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:3]!r}"
    assert fast.batch_decode(ours) == texts
    # With special tokens: BOS exactly where llama.cpp adds it; control tokens' text parses as the token.
    assert fast(texts[:50])["input_ids"] == [llm.tokenize(t.encode(), add_bos=True) for t in texts[:50]]
    # (llama.cpp's special=True: HF always matches special added tokens, as transformers' models expect.)
    kinds = bpe.token_kinds(vocab)  # Aquila's "<|endoftext|>" is NORMAL in the file, CONTROL in llama.cpp
    control = [vocab["tokens"][i] for i, kind in enumerate(kinds) if kind == bpe.CONTROL]
    marked = [t + tok + t for t in texts[:20] for tok in control[:4] + control[-2:]]
    assert fast(marked, add_special_tokens=False)["input_ids"] == [
        llm.tokenize(t.encode(), add_bos=False, special=True) for t in marked]
    # Every control and user-defined token prints as llama.cpp prints it.
    added = [i for i, kind in enumerate(kinds) if kind in (bpe.CONTROL, bpe.USER_DEFINED)]
    assert [t.encode() for t in fast.batch_decode([[i] for i in added])] == [
        llm.detokenize([i], special=True) for i in added]
    # The same special ids as llama.cpp, the turn end (EOT) included.
    import llama_cpp

    ids = llama_cpp.llama_model_get_vocab(llm.model)
    ref_ids = {"bos": llama_cpp.llama_vocab_bos(ids), "eos": llama_cpp.llama_vocab_eos(ids),
               "eot": llama_cpp.llama_vocab_eot(ids), "pad": llama_cpp.llama_vocab_pad(ids)}
    specials = bpe.special_tokens(vocab)
    assert {k: fast.convert_tokens_to_ids(specials[k]) if specials[k] else -1 for k in ref_ids} == ref_ids


def test_llama3_folder(llama3_dir, llama3_gguf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama3_dir))
    assert not (llama3_dir / "tokenizer.model").exists()
    assert len(tok) == 128_256
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>", None)
    # Known Llama-3 ids (Meta's tokenizer): BOS added, "<|eot_id|>" is one special token.
    assert tok("Hello world")["input_ids"] == [128000, 9906, 1917]
    assert tok("<|eot_id|>", add_special_tokens=False)["input_ids"] == [128009]
    # Every control token is an added special token: decoding can skip it.
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    assert len(special) == 256 and {"<|eot_id|>", "<|start_header_id|>"} <= special
    assert tok.decode([128006, 9906, 128009], skip_special_tokens=True) == "Hello"
    cfg = json.loads((llama3_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["add_bos_token"] is True
    assert json.loads((llama3_dir / "special_tokens_map.json").read_text()) == {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    info = json.loads((llama3_dir / "zhllama.json").read_text())
    assert info["command"] == "tokenizer from-gguf" and info["pre_tokenizer"] == "llama-bpe"
    assert info["vocab_size"] == 128_256 and info["merges"] == 280_147 and info["eot_token"] == "<|eot_id|>"
    assert info["inputs"]["gguf"] == file_sha256(llama3_gguf)
    assert info["tokenizer_sha256"] == file_sha256(llama3_dir / "tokenizer.json")
    pipeline = json.loads((llama3_dir / "tokenizer.json").read_text())
    assert pipeline["model"]["ignore_merges"] is True
    assert [p["type"] for p in pipeline["pre_tokenizer"]["pretokenizers"]] == ["Split", "ByteLevel"]


def test_qwen2_folder_keeps_the_chat_template_and_pad(qwen2_gguf, tmp_path):
    from transformers import AutoTokenizer

    out = tokenizer.from_gguf(qwen2_gguf, tmp_path / "qwen2")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.pad_token == "<|endoftext|>" and tok("hi")["input_ids"] == [6023]  # no BOS for Qwen2
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    assert tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False).startswith(
        "<|im_start|>system")


def _write_gguf(path, **keys):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(keys.get("model", "gpt2"))
    if "pre" in keys:
        writer.add_tokenizer_pre(keys["pre"])
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_types([1, 1, 1])
    writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_unknown_pre_tokenizer_is_one_line_error_listing_the_known(tmp_path):
    path = _write_gguf(tmp_path / "x.gguf", pre="chameleon")
    with pytest.raises(ZhllamaError) as err:
        tokenizer.from_gguf(path, tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and "'chameleon'" in msg
    assert all(name in msg for name in ("llama-bpe", "qwen2", "deepseek-llm", "gpt-2", "default"))
    assert not (tmp_path / "out").exists()


def test_tiny_gpt2_vocab_without_pre_uses_the_default(tmp_path):
    out = tokenizer.from_gguf(_write_gguf(tmp_path / "x.gguf"), tmp_path / "out")
    assert json.loads((out / "zhllama.json").read_text())["pre_tokenizer"] == "default"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out))("ab", add_special_tokens=False)["input_ids"] == [2]
