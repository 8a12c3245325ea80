"""GGUF export of a byte-level BPE (Llama-3) model: llama.cpp must tokenise like HF and compute the same logits.

The tokenizer is Llama-3's real 128,256-token vocabulary (the `llama3_dir` session fixture) with its pre-tokenizer
regex spelled as in Meta's tokenizer.json and the Llama-3.1 chat template, i.e. a user's Llama-3 folder. The model
is a tiny GQA Llama (hidden 64, 2 layers, 4 heads, 2 KV heads) briefly trained on the compared prompts
(tests/export/conftest.py), so its logits are peaked (mean std 0.47, untrained 0.16) and its attention matters.
Tokenisation is compared on 307 varied texts (Chinese, English, code, emoji, digits, whitespace runs, llama.cpp's own
pre-tokenizer probe and random mixtures), logits at every position of 4 prompts (211 tokens). Measured on a 2-core
AVX2 CPU (Dec 2026), run with -s to see the numbers:

    type   tokenisation  max |logit diff|  top-1            bound   min top-1
    f16    307/307       3.2e-03           211/211 100%     0.03    99%
    q8_0   307/307       8.6e-02           209/211 99.1%    0.6     90%

The bounds are about 3x the largest difference seen while writing this (1.0e-2 and 0.22 on shorter prompts).

A Chinese extension (three words appended as byte-level tokens with the merges that build them, one non-special
added token, the embedding grown to match) tokenises identically too: 307/307.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.export.conftest import train_briefly
from zhllama.errors import ZhllamaError
from zhllama.export.gguf import export_gguf, read_gguf_info

# qtype -> (max |logit diff| bound, minimum top-1 agreement)
TOLERANCE = {"f16": (0.03, 0.99), "q8_0": (0.6, 0.90)}
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's converter probes pre-tokenizers with this text (convert_hf_to_gguf.py, get_vocab_base_pre).
PROBE = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
         "✅ 🦙🦙 "
         "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
         "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
         "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
ENGLISH = ["The quick brown fox jumps over the lazy dog.", "I'VE been told he's there; we'd rather they'll go.",
           "Hello, World!  Multiple   spaces\tand tabs.", "e-mail: someone@example.com, URL https://a.b/c?d=e&f=g",
           "CamelCaseWords and snake_case_words and SCREAMING_CASE.", "  leading and trailing spaces  ",
           "Line one\nLine two\r\nLine three\n\n\nend", "He said: \"It's 5 o'clock.\" (really?)"]
CODE = ["def add(a, b):\n    return a + b  # 加法\n", 'for (int i = 0; i < n; ++i) { printf("%d\\n", i); }',
        "const f = async (x) => { await g(x ?? 0); };", '{"key": [1, 2.5, -3e10], "null": null}',
        "<div class=\"a\">\n  <span>文本</span>\n</div>", "SELECT id, name FROM users WHERE age >= 18;",
        "    if x:\n\t\tpass\n        else:\n", "x<<=2; y>>>=1; z**=3; a!==b"]
EMOJI_DIGITS_SPACE = ["🚀🚀 rockets", "😶\u200d🌫️ fog", "👨\u200d👩\u200d👧 family", "🇨🇳🇺🇸 flags", "✅❌⭐",
                      "3 33 333 3333 33333 333333", "3.14159 2,718 1e-9 0x1F 1_000_000", "１２３４ 全角数字",
                      "2024年12月1日 下午3点45分", "\n", "\n\n\n", " ", "   ", "\t\t", " \n \n", "a  b   c    d",
                      "中文 空格  中文", "\u3000全角空格\u3000", "ñandú café naïve Ωμέγα", "مرحبا بالعالم",
                      "こんにちは世界、カタカナ", "한국어 텍스트", "ʕ•ᴥ•ʔ ¯\\_(ツ)_/¯"]
# Appended to the vocabulary by the extension; all several tokens in Llama-3 (中国 is already one, 59795).
NEW_WORDS = ["人工智能", "中华人民共和国", "大语言模型"]
ADDED = "【注】"  # a non-special added token (USER_DEFINED in GGUF)


def llama_cpp_or_skip():
    return pytest.importorskip("llama_cpp")


def open_llama(path: Path, vocab_only: bool = False):
    llama_cpp = llama_cpp_or_skip()
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=not vocab_only, vocab_only=vocab_only,
                           verbose=False, n_threads=2)


def gguf_strings(fields, key: str) -> list[str]:
    field = fields[key]  # field.contents() takes seconds for 280,000 strings; the parts do not
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def meta_style(src: Path, folder: Path, template: str) -> Path:
    """`src` (the Llama-3 folder `tokenizer from-gguf` makes, tokenizer.json only) with the pre-tokenizer regex
    spelled as in Meta's own tokenizer.json, "(?i:'s|...)", and the Llama-3.1 chat template: what a user's
    Llama-3 folder holds, so the export must name it from the model's regex, not from our llama.cpp form."""
    from zhllama.tokenizer.hf import set_chat_template

    shutil.copytree(src, folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    split = spec["pre_tokenizer"]["pretokenizers"][0]
    assert split["type"] == "Split"
    split["pattern"]["Regex"] = LLAMA3_REGEX
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    set_chat_template(folder, template)
    return folder


def extend_tokenizer(src: Path, out: Path) -> Path:
    """`src`'s tokenizer.json with NEW_WORDS appended as byte-level tokens (each with the merges that build it from
    the base tokenizer's pieces, left to right) and ADDED as a non-special added token."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(src)
    shutil.copytree(src, out)
    spec = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    next_id = len(base)
    for word in NEW_WORDS:
        pieces = base.convert_ids_to_tokens(base(word, add_special_tokens=False)["input_ids"])
        assert len(pieces) > 1, f"{word} is already one token"
        left = pieces[0]
        for right in pieces[1:]:
            merges.append([left, right] if isinstance(merges[0], list) else f"{left} {right}")
            left += right
            if left not in vocab:
                vocab[left], next_id = next_id, next_id + 1
    spec["added_tokens"].append({"id": next_id, "content": ADDED, "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": False})
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return out


def texts(zh_heldout_texts) -> list[str]:
    """A few hundred varied texts: Chinese slices, the fixed lists, and seeded random mixtures of them."""
    rng = random.Random(0)
    zh = [t[s: s + n] for t in zh_heldout_texts[:60] for s, n in ((0, 40), (17, 150))]
    fixed = [PROBE] + ENGLISH + CODE + EMOJI_DIGITS_SPACE + zh
    mixed = ["".join(rng.choice(fixed)[: rng.randint(1, 30)] + rng.choice(["", " ", "  ", "\n", "\t", " \n"])
                     for _ in range(rng.randint(2, 6))) for _ in range(120)]
    words = ["".join(rng.choice(NEW_WORDS + ["是", "的", "我们", " ", "，", "在", ADDED, "AI", "2024"])
                     for _ in range(rng.randint(1, 8))) for _ in range(40)]
    return [t for t in fixed + mixed + words if t]


def tiny_llama3(folder: Path, tokenizer_dir: Path, rows: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=rows, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                         tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, folder / item.name)
    return folder


def mismatches(llm, tok, corpus: list[str]) -> list[str]:
    return [t for t in corpus if llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) != tok(t)["input_ids"]]


# --- fixtures ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-bpe")


@pytest.fixture(scope="module")
def llama3_tok(work, llama3_dir, llama3_template_jinja) -> Path:
    return meta_style(llama3_dir, work / "llama3-tok", Path(llama3_template_jinja).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def corpus(zh_heldout_texts):
    return texts(zh_heldout_texts)


@pytest.fixture(scope="module")
def prompts(llama3_tok, zh_heldout_texts):
    from zhllama.model.loading import load_tokenizer

    tok = load_tokenizer(llama3_tok)
    chosen = [zh_heldout_texts[5][:120], " ".join(ENGLISH[:4]), "\n".join(CODE[:4]), zh_heldout_texts[7][:120]]
    return [tok(t)["input_ids"][:56] for t in chosen]


@pytest.fixture(scope="module")
def trained(work, llama3_tok, prompts) -> Path:
    random_model = tiny_llama3(work / "random", llama3_tok, 128_256)
    return train_briefly(random_model, work / "trained", prompts)


@pytest.fixture(scope="module")
def hf(trained):
    from zhllama.model.loading import load_model, load_tokenizer

    return load_model(trained, dtype=torch.float32).eval(), load_tokenizer(trained)


@pytest.fixture(scope="module")
def exported(work, trained):
    made = {}

    def get(qtype: str) -> Path:
        if qtype not in made:
            made[qtype] = export_gguf(trained, work / f"llama3-{qtype}.gguf", qtype)
        return made[qtype]

    return get


# --- tests ---------------------------------------------------------------------------------------------------------

def test_metadata(exported, hf):
    """The vocabulary keys llama.cpp reads (read with gguf's reader here; read_gguf_info is checked on the extended
    export below: each parse of 400,000 strings takes about 25 s)."""
    import gguf

    _, tok = hf
    fields = gguf.GGUFReader(str(exported("f16"))).fields

    def get(key):
        return fields[key].contents()

    assert (get("tokenizer.ggml.model"), get("tokenizer.ggml.pre")) == ("gpt2", "llama-bpe")
    assert [get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot")] == [128000, 128001, 128009]
    assert get("tokenizer.ggml.add_bos_token") is True and get("tokenizer.ggml.add_eos_token") is False
    assert get("tokenizer.chat_template") == tok.chat_template
    assert "tokenizer.ggml.scores" not in fields and "tokenizer.ggml.padding_token_id" not in fields
    types = get("tokenizer.ggml.token_type")
    assert types[:128_000] == [1] * 128_000 and types[128_000:] == [3] * 256  # NORMAL, then CONTROL
    tokens = gguf_strings(fields, "tokenizer.ggml.tokens")
    assert tokens == tok.convert_ids_to_tokens(list(range(128_256)))  # byte-level strings ("Ġthe"), specials as text
    assert tokens[:3] == ["!", '"', "#"] and tokens[128_000] == "<|begin_of_text|>"
    merges = gguf_strings(fields, "tokenizer.ggml.merges")
    spec = json.loads((Path(tok.name_or_path) / "tokenizer.json").read_text(encoding="utf-8"))
    assert merges == [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    assert len(merges) == 280_147 and merges[0] == "Ġ Ġ"


def spread(model, prompts) -> float:
    """Mean over positions of the logits' std across the vocabulary."""
    with torch.no_grad():
        return float(np.mean([model(torch.tensor([ids])).logits[0].std(-1).mean().item() for ids in prompts]))


def test_trained_model_logits_are_not_flat(work, hf, prompts):
    from zhllama.model.loading import load_model

    trained, untrained = spread(hf[0], prompts), spread(load_model(work / "random", dtype=torch.float32), prompts)
    print(f"\n[llama3 model] mean logit std {trained:.2f} trained, {untrained:.2f} untrained")
    assert trained > 2 * untrained


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_round_trip_matches_hf(qtype, exported, hf, corpus, prompts):
    model, tok = hf
    llm = open_llama(exported(qtype))
    try:
        bad = mismatches(llm, tok, corpus)
        diffs, agree, total = [], 0, 0
        for ids in prompts:
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].numpy()
            llm.reset()
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)], dtype=np.float32)
            diffs.append(float(np.abs(got - ref).max()))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += len(ids)
    finally:
        llm.close()
    print(f"\n[gguf bpe {qtype}] tokenisation {len(corpus) - len(bad)}/{len(corpus)} texts identical, max |logit "
          f"diff| {max(diffs):.2e}, top-1 {agree}/{total} = {agree / total:.1%}")
    assert not bad, f"llama.cpp tokenises differently: {bad[:3]!r}"
    bound, min_top1 = TOLERANCE[qtype]
    assert max(diffs) < bound
    assert agree / total >= min_top1


def test_special_tokens_in_chat_text(exported, hf):
    _, tok = hf
    text = tok.apply_chat_template([{"role": "user", "content": "你好，世界"}], tokenize=False,
                                   add_generation_prompt=True)
    llm = open_llama(exported("f16"), vocab_only=True)
    try:
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    finally:
        llm.close()
    assert got == tok(text, add_special_tokens=False)["input_ids"]
    assert got[0] == 128000 and 128006 in got and 128009 in got  # begin_of_text, start_header_id, eot_id


def test_load_engine_generates_greedily(exported, hf):
    from zhllama.infer import SamplingParams, load_engine

    model, tok = hf
    prompt = tok("The quick brown fox")["input_ids"]
    engine = load_engine(exported("f16"))  # what `zhllama serve --backend llamacpp` runs
    try:
        first = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0))
        again = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0))
    finally:
        engine.close()
    with torch.no_grad():
        ids = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    print(f"\n[gguf bpe engine] llama.cpp {first.text!r}, HF {tok.decode(ids)!r}")
    assert first.completion_tokens == 8 and first.text == again.text
    assert first.text == tok.decode(ids)  # greedy: the same 8 tokens as HF (f16 agrees at every position above)


def test_extended_vocabulary_tokenises_like_hf(work, trained, corpus):
    from transformers import AutoTokenizer

    from zhllama.model.loading import load_model

    tok_dir = extend_tokenizer(work / "llama3-tok", work / "llama3-zh-tok")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    new_ids = [tok(w, add_special_tokens=False)["input_ids"] for w in NEW_WORDS]
    assert all(len(ids) == 1 and ids[0] >= 128_256 for ids in new_ids)  # each new word is one new token
    folder = Path(shutil.copytree(trained, work / "extended"))
    model = load_model(trained, dtype=torch.float32)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(folder)
    for item in tok_dir.iterdir():
        shutil.copy2(item, folder / item.name)
    path = export_gguf(folder, work / "llama3-zh.gguf", "q8_0")
    info = read_gguf_info(path)
    assert info["vocab_size"] == len(tok) and info["merges"] > 280_147
    assert info["token_types"] == {1: len(tok) - 257, 3: 256, 4: 1}  # the added 【注】 is USER_DEFINED
    llm = open_llama(path)
    try:
        bad = mismatches(llm, tok, corpus)
        assert [llm.tokenize(w.encode(), add_bos=False) for w in NEW_WORDS] == new_ids
    finally:
        llm.close()
    print(f"\n[gguf bpe extended] tokenisation {len(corpus) - len(bad)}/{len(corpus)} texts identical")
    assert not bad, f"llama.cpp tokenises the extension differently: {bad[:3]!r}"


QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def split(regex: str, use_regex: bool = False, prefix: bool = False) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": True, "use_regex": use_regex}]}


def test_pre_tokenizer_is_named_by_its_regex(llama3_dir):
    from zhllama.export.gguf_vocab import pre_tokenizer_name

    ours = json.loads((Path(llama3_dir) / "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"]
    assert pre_tokenizer_name(ours) == "llama-bpe"  # llama.cpp's spelling, as `tokenizer from-gguf` writes it
    assert pre_tokenizer_name(split(LLAMA3_REGEX)) == "llama-bpe"  # Meta's spelling
    assert pre_tokenizer_name(split(QWEN2_REGEX)) == "qwen2"
    assert pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    for bad, message in [
        (split(LLAMA3_REGEX.replace("{1,3}", "{1,2}")), r"regex .* is not one export gguf knows \(llama-bpe, qwen2"),
        (split(LLAMA3_REGEX, use_regex=True), "followed by ByteLevel"),
        (split(LLAMA3_REGEX, prefix=True), "add_prefix_space"),
        ({"type": "Whitespace"}, "'Whitespace' has no llama.cpp equivalent"),
        (None, "not byte-level"),
    ]:
        with pytest.raises(ZhllamaError, match=message) as caught:
            pre_tokenizer_name(bad)
        assert "\n" not in str(caught.value)


def test_unsupported_tokenizer_fails_before_the_weights_load(tmp_path, llama3_dir):
    folder = Path(shutil.copytree(llama3_dir, tmp_path / "odd"))  # no weights at all: the vocabulary fails first
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = split(r"\p{L}+|\p{N}+|\s+")
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "odd.gguf"
    with pytest.raises(ZhllamaError, match=r"tokenizer.json: pre-tokenizer regex .* is not one export gguf knows"):
        export_gguf(folder, out, "f16")
    assert not out.exists() and not list(tmp_path.glob(".odd.gguf*"))
