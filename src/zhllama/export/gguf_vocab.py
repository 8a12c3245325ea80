"""The vocabulary half of a GGUF export: which kind of tokenizer a model folder has, and its GGUF keys.

Two kinds, told apart by the files (tokenizer.model wins, as it always has here):
- SentencePiece (tokenizer.model, Llama-2 and our Chinese extensions of it): llama.cpp's "llama" vocabulary, pieces,
  scores and types read from the proto itself.
- Byte-level BPE (tokenizer.json only, Llama-3, Qwen2, GPT-2): llama.cpp's "gpt2" vocabulary. Tokens are the
  byte-level strings of tokenizer.json ("Ġthe", "ä¸ŃåĽ½" for 中国), merges are "a b" strings in rank order, added
  tokens keep their text. llama.cpp does not read the pre-tokenizer regex from the file but picks a hard-coded one
  by the name in tokenizer.ggml.pre, so the name must be right or every text splits differently. llama.cpp's own
  converter names it by hashing the tokenizer's output on a probe text, which breaks as soon as a vocabulary is
  extended (the ids change, the hash is unknown); here it is named by the regex itself, which an extension keeps.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from zhllama.errors import ZhllamaError
from zhllama.model.loading import tokenizer_kind
from zhllama.tokenizer.bpe import PRE_TOKENIZERS
from zhllama.tokenizer.spm import CONTROL, NORMAL, UNUSED, USER_DEFINED, load_proto

# Models' tokenizer.json spell the contractions case-insensitively; llama.cpp's regexes (zhllama.tokenizer.bpe, the
# one registry of pre types) spell them as llama.cpp's splitters test them: ASCII letters in either case. Same
# pieces except for a contraction written with the long s "ſ", which HF's case folding matches and llama.cpp not.
MODEL_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
LLAMACPP_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
# Tokens llama.cpp treats as end of turn when it finds them; written explicitly so no guess is needed.
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


@dataclass
class Vocab:
    kind: str  # "spm" | "bpe"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None  # SentencePiece only
    merges: list[str] | None = None  # byte-level BPE only
    pre: str | None = None  # byte-level BPE only


def read_vocab(model_dir: Path, tok) -> Vocab:
    """The folder's vocabulary for GGUF: SentencePiece if it has tokenizer.model, else byte-level BPE."""
    if tokenizer_kind(model_dir) == "spm":  # a one-line error for a folder with neither file
        tokens, scores, types = _spm_vocabulary(model_dir, tok)
        return Vocab("spm", tokens, types, scores=scores)
    return _bpe_vocabulary(model_dir, tok)


def pad_vocab(vocab: Vocab, size: int) -> None:
    """Fill the vocabulary up to `size` entries (embedding rows beyond the tokenizer)."""
    # UNUSED, not USER_DEFINED: llama.cpp matches user-defined tokens literally in text, so a user typing
    # "[PAD34001]" would get a padding id. Same names and score as llama.cpp's converter.
    for i in range(len(vocab.tokens), size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)


def write_tokenizer(writer, tok, model_dir: Path, vocab: Vocab) -> None:
    if vocab.kind == "spm":
        _write_spm(writer, tok, model_dir, vocab.tokens, vocab.scores, vocab.types)
        return
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for any byte-level BPE vocabulary
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    _write_special_ids(writer, tok, len(vocab.tokens))
    eot = next((i for i, t in tok.added_tokens_decoder.items() if t.special and t.content in END_OF_TURN), None)
    if eot is not None and eot < len(vocab.tokens):
        writer.add_eot_token_id(int(eot))
    _write_add_flags(writer, tok)
    _write_template(writer, tok)


# --- SentencePiece ---------------------------------------------------------------------------------------------

def _spm_vocabulary(model_dir: Path, tok) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and token types from tokenizer.model, plus any HF added tokens beyond it."""
    proto = load_proto(model_dir)
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    # sentencepiece numbers its piece types exactly as GGUF does (normal 1 ... byte 6).
    types = [int(p.type) for p in proto.pieces]
    # Tokens added through HF (added_tokens.json) live outside the proto but have ids and embedding rows.
    added = {i: t for i, t in tok.added_tokens_decoder.items() if i >= len(tokens)}
    for i in sorted(added):
        if i != len(tokens):
            raise ZhllamaError(f"{model_dir}: added token ids jump from {len(tokens)} to {i}; "
                               f"cannot build the vocabulary")
        tokens.append(added[i].content)
        scores.append(0.0)
        types.append(CONTROL if added[i].special else USER_DEFINED)
    return tokens, scores, types


def _write_spm(writer, tok, proto_path: Path, tokens, scores, types) -> None:
    writer.add_tokenizer_model("llama")  # llama.cpp's name for a SentencePiece vocabulary
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    _write_special_ids(writer, tok, len(tokens))
    _write_add_flags(writer, tok)
    writer.add_add_space_prefix(bool(load_proto(proto_path).normalizer_spec.add_dummy_prefix))
    _write_template(writer, tok)


# --- shared ------------------------------------------------------------------------------------------------------

def _write_special_ids(writer, tok, n_tokens: int) -> None:
    for name, idx in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id),
                      ("unk", tok.unk_token_id), ("pad", tok.pad_token_id)):
        if idx is not None and 0 <= idx < n_tokens:
            getattr(writer, f"add_{name}_token_id")(int(idx))


def _write_add_flags(writer, tok) -> None:
    # Ask the tokenizer what it does rather than trusting config flags that differ across transformers versions.
    ids = tok("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and ids[0] == tok.bos_token_id)
    writer.add_add_eos_token(bool(ids) and ids[-1] == tok.eos_token_id)


def _write_template(writer, tok) -> None:
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        writer.add_chat_template(template)


# --- byte-level BPE ----------------------------------------------------------------------------------------------

def _bpe_vocabulary(model_dir: Path, tok) -> Vocab:
    path = model_dir / "tokenizer.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ZhllamaError(f"{path}: not a readable tokenizer.json ({exc})") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ZhllamaError(f"{path}: a {model.get('type')!r} tokenizer; export gguf takes SentencePiece "
                           "(tokenizer.model) or byte-level BPE (tokenizer.json) vocabularies")
    if model.get("byte_fallback"):
        raise ZhllamaError(f"{path}: a byte-fallback BPE (SentencePiece-style) tokenizer.json without tokenizer.model; "
                           "export gguf needs its tokenizer.model")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"), path)
    if spec.get("normalizer") not in (None, {"type": "NFC"}):
        # llama.cpp applies no normalizer to a gpt2 vocabulary (NFC included: Qwen2's converts the same way).
        print(f"warning: {path}: llama.cpp ignores the normalizer {spec['normalizer'].get('type')}; texts it "
              "changes may tokenise differently", file=sys.stderr)
    if bool(model.get("ignore_merges")) != (pre == "llama-bpe"):
        # llama.cpp decides by the pre type (of those known here, only llama-bpe looks a whole piece up before
        # merging); a piece that is in the vocabulary but not reachable by merges then tokenises differently.
        print(f"warning: {path}: ignore_merges={bool(model.get('ignore_merges'))} but llama.cpp's {pre} uses "
              f"{pre == 'llama-bpe'}; pieces that merges cannot build may tokenise differently", file=sys.stderr)

    by_id: dict[int, str] = {}
    for text, i in model.get("vocab", {}).items():
        by_id[int(i)] = text
    types = {i: NORMAL for i in by_id}
    # Added tokens (specials, and tokens added whole with add_tokens) keep their text: llama.cpp matches them in
    # the raw text before pre-tokenising, as HF does. HF's own view decides which are special.
    for i, added in tok.added_tokens_decoder.items():
        by_id[int(i)] = added.content
        types[int(i)] = CONTROL if added.special else USER_DEFINED
    n = max(by_id) + 1 if by_id else 0
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]  # ids nobody holds: as llama.cpp's converter does
    kinds = [types.get(i, UNUSED) for i in range(n)]
    return Vocab("bpe", tokens, kinds, merges=_merges(model.get("merges") or [], path), pre=pre)


def _merges(raw: list, path: Path) -> list[str]:
    """Merges as GGUF stores them, "left right" in rank order; tokenizer.json has that form or [left, right]."""
    merges = []
    for merge in raw:
        if isinstance(merge, str):
            merges.append(merge)
            continue
        if not (isinstance(merge, list) and len(merge) == 2 and all(isinstance(m, str) for m in merge)):
            raise ZhllamaError(f"{path}: merge {merge!r} is neither 'a b' nor [a, b]")
        if " " in merge[0] or " " in merge[1]:  # byte-level pieces spell a space "Ġ"; a real one would be ambiguous
            raise ZhllamaError(f"{path}: merge {merge!r} contains a space; not a byte-level vocabulary")
        merges.append(f"{merge[0]} {merge[1]}")
    return merges


def pre_tokenizer_name(pre: dict | None, path: Path | str = "tokenizer.json") -> str:
    """llama.cpp's tokenizer.ggml.pre name for a tokenizer.json pre_tokenizer; a one-line error if unknown.

    Accepted: the model's own regexes (Llama-3's and Qwen2's tokenizer.json) and the llama.cpp forms that
    `zhllama tokenizer from-gguf` writes; GPT-2's is implied by a ByteLevel step with use_regex and no Split."""
    known = ", ".join(name for name in PRE_TOKENIZERS if name != "default")
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    regexes, byte_level = [], None
    for step in steps:
        kind = step.get("type")
        if kind == "Split" and isinstance(step.get("pattern"), dict) and "Regex" in step["pattern"] \
                and str(step.get("behavior")).lower() == "isolated" and not step.get("invert"):
            regexes.append(step["pattern"]["Regex"])
        elif kind == "ByteLevel" and byte_level is None:
            byte_level = step
        else:
            raise ZhllamaError(f"{path}: pre-tokenizer step {kind!r} has no llama.cpp equivalent here; export gguf "
                               f"knows the pre-tokenizers {known}")
    if byte_level is None:
        raise ZhllamaError(f"{path}: BPE without a ByteLevel pre-tokenizer is not byte-level; export gguf takes "
                           "SentencePiece (tokenizer.model) or byte-level BPE vocabularies")
    if byte_level.get("add_prefix_space"):
        raise ZhllamaError(f"{path}: ByteLevel add_prefix_space=true has no llama.cpp equivalent")
    if byte_level.get("use_regex", True):
        if regexes:  # a Split and then ByteLevel's own split: two regexes that no llama.cpp type has
            raise ZhllamaError(f"{path}: a Split pre-tokenizer followed by ByteLevel(use_regex=true) has no "
                               "llama.cpp equivalent")
        return "gpt-2"
    wanted = [r.replace(MODEL_CONTRACTIONS, LLAMACPP_CONTRACTIONS) for r in regexes]
    name = next((n for n, rxs in PRE_TOKENIZERS.items() if n != "default" and rxs == wanted), None)
    if name is None:
        shown = " + ".join(regexes)[:120]
        raise ZhllamaError(f"{path}: pre-tokenizer regex {shown!r} is not one export gguf knows ({known})")
    return name
