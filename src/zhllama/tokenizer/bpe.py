"""Byte-level BPE vocabularies (GGUF `tokenizer.ggml.model = gpt2`: Llama-3, Qwen2, GPT-2, ...) as tokenizer.json.

The pre-tokenizer is the part that decides exactness: llama.cpp splits text with the regexes of the pre type that
`tokenizer.ggml.pre` names (src/llama-vocab.cpp, llm_tokenizer_bpe), applied one after the other, every match and
every gap between matches becoming a piece. tokenizers' Split(..., "isolated") in a Sequence does the same, so each
pre type below is llama.cpp's list of regexes, written where needed to match what llama.cpp actually computes
(its hand-written splitters and its whitespace handling), not the model's original tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from zhllama.errors import ZhllamaError

# llama.cpp token types (llama_token_type): CONTROL pieces are special tokens, USER_DEFINED ones are matched
# whole in the raw text before any splitting (llama.cpp's tokenizer_st_partition does so even with special=False).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The contractions as llama.cpp's splitters test them: ASCII letters in either case. The models' own "(?i:'s|...)"
# would also fold e.g. the long s "ſ" to "s" in tokenizers' regex engine, which llama.cpp does not.
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


def _qwen_like(digits: str) -> str:
    return (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + digits
            + r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# Letters of the deepseek-llm split, escaped: several (Greek extended, Ohm, Kelvin) have canonical
# equivalents, and an editor that normalises them would silently empty their ranges.
_DEEPSEEK_LETTERS = (
    "\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376"
    "\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-"
    "\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-"
    "\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-"
    "\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc"
    "\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115"
    "\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e"
    "\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-"
    "\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-"
    "\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)

# The registry: pre type -> regexes, in llama.cpp's order. One place; `from_gguf` refuses any other name.
PRE_TOKENIZERS: dict[str, list[str]] = {
    "llama-bpe": [_qwen_like("{1,3}")],
    "qwen2": [_qwen_like("")],
    "gpt-2": [_GPT2],
    "deepseek-llm": [
        r"[\r\n]",
        r"\s?[A-Za-z" + _DEEPSEEK_LETTERS + "]+",
        # llama.cpp matches this one on text whose non-ASCII whitespace became \v, so the ideographic space
        # U+3000 never falls in the class "　-。" of the original: the class here starts at U+3001.
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3001-\u3002]+",
        r"\s+$",
        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
        r"\p{N}+",
    ],
    # llama.cpp's fallback for a BPE vocabulary without tokenizer.ggml.pre (Aquila): it warns and splits so.
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
}
# Other names llama.cpp gives the same pre type (llama_vocab::impl::load).
PRE_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "deepseek-r1-qwen": "qwen2"}
# llama.cpp's per-type defaults, used when the GGUF has no tokenizer.ggml.add_bos_token.
_ADD_BOS_DEFAULT = {"llama-bpe": True}
# Pre types where llama.cpp looks a whole piece up in the vocabulary before merging (ignore_merges).
_IGNORE_MERGES = {"llama-bpe"}
# Turn-end tokens llama.cpp recognises by text when the GGUF has no tokenizer.ggml.eot_token_id (its order).
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
              "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>")
# Texts llama.cpp turns into CONTROL tokens whatever their GGUF type says (end-of-generation, fill-in-the-middle:
# "control-looking token ... its type will be overridden"), e.g. Aquila's "<|endoftext|>", typed NORMAL.
_CONTROL_LOOKING = frozenset(_EOT_TEXTS + (
    "<|eom_id|>", "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
    "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>", "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
    "<\uff5cfim\u2581hole\uff5c>", "<SUF>", "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>", "<|fim_middle|>",
    "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>", "\u2581<MID>", "<|code_middle|>",
    "<|middle|>", "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>", "<|repo_name|>",
    "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "</s>", "[EOS]", "<eos>", "<turn|>", "<|tool_response>", "[e~["))


def token_kinds(vocab: dict) -> list[int]:
    """The GGUF token types as llama.cpp uses them: control-looking NORMAL tokens become CONTROL."""
    return [CONTROL if kind == NORMAL and tok in _CONTROL_LOOKING else kind
            for tok, kind in zip(vocab["tokens"], vocab["types"], strict=True)]


def pre_type(vocab: dict, path) -> str:
    name = vocab.get("pre")
    name = "default" if name is None else PRE_ALIASES.get(name, name)
    if name not in PRE_TOKENIZERS:
        raise ZhllamaError(f"{path}: unknown pre-tokenizer tokenizer.ggml.pre={vocab['pre']!r}; supported: "
                           f"{', '.join(sorted(PRE_TOKENIZERS))} (and no key: llama.cpp's default)")
    return name


def add_bos_eos(vocab: dict, pre: str) -> tuple[bool, bool]:
    """Whether llama.cpp adds BOS / EOS with add_special: the GGUF's keys, else the pre type's default."""
    add_bos = vocab.get("add_bos")
    add_bos = _ADD_BOS_DEFAULT.get(pre, False) if add_bos is None else bool(add_bos)
    specials = special_tokens(vocab)
    return add_bos and specials["bos"] is not None, bool(vocab.get("add_eos")) and specials["eos"] is not None


def _token(vocab: dict, key: str) -> str | None:
    idx = vocab.get(f"{key}_id")
    tokens = vocab["tokens"]
    return tokens[idx] if isinstance(idx, int) and 0 <= idx < len(tokens) else None


def special_tokens(vocab: dict) -> dict[str, str | None]:
    """bos/eos/eot/pad/unk token texts (None when the vocabulary has none)."""
    found = {key: _token(vocab, key) for key in ("bos", "eos", "eot", "pad", "unk")}
    if found["eot"] is None:
        present = {t for t, kind in zip(vocab["tokens"], token_kinds(vocab), strict=True) if kind == CONTROL}
        found["eot"] = next((t for t in _EOT_TEXTS if t in present), None)
    return found


def tokenizer_json(vocab: dict, path) -> dict:
    """The tokenizer.json of a byte-level BPE GGUF vocabulary (read by `gguf_vocab.read_gguf_vocab`)."""
    pre = pre_type(vocab, path)
    tokens, types = vocab["tokens"], token_kinds(vocab)
    ids = {}
    for i, tok in enumerate(tokens):
        ids.setdefault(tok, i)  # llama.cpp keeps the first of duplicate texts too
    specials = special_tokens(vocab)
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": kind == CONTROL}
        for i, (tok, kind) in enumerate(zip(tokens, types, strict=True))
        if kind in (CONTROL, USER_DEFINED) and ids[tok] == i
    ]
    add_bos, add_eos = add_bos_eos(vocab, pre)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                *({"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False}
                  for rx in PRE_TOKENIZERS[pre]),
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": _post_processor(specials, ids, add_bos, add_eos),
        "decoder": _decoder(added, tokens),
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": pre in _IGNORE_MERGES,
            "vocab": ids,
            "merges": [m.split(" ", 1) for m in vocab["merges"]],
        },
    }


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of every byte-level vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _decoder(added: list[dict], tokens: list[str]) -> dict:
    """ByteLevel, after turning the text of added tokens back into byte-level characters.

    llama.cpp prints CONTROL and USER_DEFINED tokens as their raw text; the ByteLevel decoder would read e.g.
    DeepSeek's user-defined "ø" as the byte 0xF8 and print "\ufffd". A Replace maps such a text to the
    byte-level spelling of its UTF-8 first, but only where no other token contains it (Replace works on every
    token's text); the texts it would touch elsewhere keep plain ByteLevel decoding.
    """
    chars = _byte_chars()
    steps = []
    for entry in sorted(added, key=lambda e: -len(e["content"])):
        text = entry["content"]
        spelled = "".join(chars[b] for b in text.encode("utf-8"))
        if spelled != text and sum(text in t for t in tokens) == 1:
            steps.append({"type": "Replace", "pattern": {"String": text}, "content": spelled})
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return {"type": "Sequence", "decoders": [*steps, byte_level]} if steps else byte_level


def _post_processor(specials: dict, ids: dict, add_bos: bool, add_eos: bool) -> dict | None:
    """BOS (and EOS) around each sequence exactly when llama.cpp's add_special adds them."""
    bos = specials["bos"] if add_bos else None
    eos = specials["eos"] if add_eos else None
    if bos is None and eos is None:
        return None

    def seq(name: str, type_id: int) -> list[dict]:
        out = [{"SpecialToken": {"id": bos, "type_id": type_id}}] if bos else []
        out.append({"Sequence": {"id": name, "type_id": type_id}})
        return out + ([{"SpecialToken": {"id": eos, "type_id": type_id}}] if eos else [])

    used = [t for t in (bos, eos) if t]
    return {
        "type": "TemplateProcessing",
        "single": seq("A", 0),
        "pair": seq("A", 0) + seq("B", 1),
        "special_tokens": {t: {"id": t, "ids": [ids[t]], "tokens": [t]} for t in used},
    }


def tokenizer_config(vocab: dict, path) -> dict:
    specials = special_tokens(vocab)
    add_bos, add_eos = add_bos_eos(vocab, pre_type(vocab, path))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        # Cleaning would turn " 's" into "'s" on decode: byte-level decoding is exact, keep it so.
        "clean_up_tokenization_spaces": False,
        # A vocabulary does not know its model's context (8k for Llama-3, 128k for 3.1): no limit, no warning.
        "model_max_length": 1_000_000_000,
    }
    for key in ("bos", "eos", "pad", "unk"):
        if specials[key] is not None:
            cfg[f"{key}_token"] = specials[key]
    if vocab.get("chat_template"):
        cfg["chat_template"] = vocab["chat_template"]
    return cfg


def build_fast_tokenizer(vocab: dict, path):
    """The transformers tokenizer of a byte-level BPE GGUF vocabulary, in memory (no folder written)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(json.dumps(tokenizer_json(vocab, path), ensure_ascii=False))
    cfg = tokenizer_config(vocab, path)
    kwargs = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in cfg}
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   model_max_length=cfg["model_max_length"], **kwargs)


def write_bpe_tokenizer(vocab: dict, path, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json (and chat_template.jinja) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tj = tokenizer_json(vocab, path)
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    cfg = tokenizer_config(vocab, path)
    if cfg.get("chat_template"):
        # transformers 5 reads chat_template.jinja; older readers the config field (see hf.set_chat_template).
        (out / "chat_template.jinja").write_text(cfg["chat_template"], encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n",
                                               encoding="utf-8")
    specials = {f"{k}_token": cfg[f"{k}_token"] for k in ("bos", "eos", "unk", "pad") if f"{k}_token" in cfg}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, ensure_ascii=False, indent=2) + "\n",
                                                 encoding="utf-8")
