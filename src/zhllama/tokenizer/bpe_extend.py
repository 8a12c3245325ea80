"""Append Chinese tokens and merges to a byte-level BPE tokenizer (Llama-3, Qwen2, GPT-2 style tokenizer.json).

Every base id, token, merge and added token stays as it is; new tokens take the ids after the last existing id
(Llama-3: from 128256, after its 256 special tokens) and new merges rank after every base merge.

Why English and code encode exactly as before: every new token holds a whole Han character, and a merge can
only build bytes that occur in the text. Why the base segmentation is kept underneath: the fast BPE applies
merges lowest rank first, so every base merge fires before any new one, and a new token never takes part in a
base merge. Chinese text is therefore first segmented as the base would, then coarsened by the new merges.

That is also how candidates are checked: each candidate's text is segmented by the base, then by the new
merges accepted so far. If exactly two pieces remain, their merge is the new token's merge (whatever split the
trainer used); if more remain, the token is unreachable and dropped. A token accepted this way is produced
when its own text is encoded, and later merges (higher ranks) cannot change that.
"""

from __future__ import annotations

import json
import math
import shutil
from functools import cache
from pathlib import Path

from zhllama.artifacts import atomic_output_dir, file_sha256, write_provenance
from zhllama.errors import ZhllamaError
from zhllama.tokenizer.merge import is_chinese_piece
from zhllama.tokenizer.train import training_sentences

BASE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# A space is outside the byte-level alphabet (it is "Ġ" there), so no text can ever be segmented into these.
PAD_TOKEN = "<|pad {}|>"
# Tokens longer than 8 Han characters (3 bytes each) are mostly boilerplate of the training corpus.
MAX_TOKEN_BYTES = 24


@cache
def byte_decoder() -> dict[str, int]:
    """The byte-level alphabet back to bytes (GPT-2's bytes_to_unicode, inverted)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shift = 0
    table = {}
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + shift)] = b
            shift += 1
    return table


def token_text(token: str) -> str | None:
    """The text of a byte-level token, or None when its bytes are not whole UTF-8 characters."""
    table = byte_decoder()
    try:
        return bytes(table[ch] for ch in token).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return None


def is_bpe_base(path: str | Path) -> bool:
    """A tokenizer.json (or a folder with one and no tokenizer.model), i.e. not a SentencePiece model."""
    path = Path(path)
    if path.is_dir():
        return (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file()
    return path.is_file() and path.suffix == ".json"


def _json_path(base: str | Path) -> Path:
    path = Path(base)
    return path / "tokenizer.json" if path.is_dir() else path


def load_bpe_json(base: str | Path) -> dict:
    """A byte-level BPE tokenizer.json, or a one-line error saying what it is instead."""
    path = _json_path(base)
    if not path.is_file():
        raise ZhllamaError(f"{base}: no tokenizer.json found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ZhllamaError(f"{path}: not a tokenizer.json ({type(exc).__name__})") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ZhllamaError(f"{path}: not a BPE tokenizer.json")
    if "ByteLevel" not in json.dumps(data.get("pre_tokenizer")) or model.get("byte_fallback"):
        raise ZhllamaError(f"{path}: a BPE tokenizer but not a byte-level one (no ByteLevel pre-tokenizer); "
                           "SentencePiece-style vocabularies need their tokenizer.model")
    return data


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    # tokenizers < 0.20 wrote merges as "a b" strings; newer versions write [a, b] pairs.
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _tokenizer(data: dict, ignore_merges: bool | None = None):
    from tokenizers import Tokenizer

    if ignore_merges is not None:
        data = {**data, "model": {**data["model"], "ignore_merges": ignore_merges}}
    return Tokenizer.from_str(json.dumps(data))


def next_id(data: dict) -> int:
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1


def train_bpe(data: dict, inputs: list[str | Path], vocab_size: int, max_chars: int | None = None
              ) -> list[tuple[str, str]]:
    """A byte-level BPE trained on `inputs` with the base's normalizer and pre-tokenizer; its merges in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Same normalizer and pre-tokenizer as the base, so words split the same way when the merged one encodes.
    shell = _tokenizer({**data, "added_tokens": [], "post_processor": None,
                        "model": {"type": "BPE", "vocab": {}, "merges": []}})
    tok.normalizer, tok.pre_tokenizer = shell.normalizer, shell.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  max_token_length=MAX_TOKEN_BYTES)
    tok.train_from_iterator(training_sentences(inputs, max_chars=max_chars), trainer=trainer)
    return _merge_pairs(json.loads(tok.to_str())["model"])


def select_merges(data: dict, candidates: list[tuple[str, str]], max_new: int | None = None
                  ) -> list[tuple[str, str]]:
    """New (left, right) merges, in candidate order, for the Chinese candidates reachable on top of the base."""
    vocab = data["model"]["vocab"]
    seen, tokens, texts = set(), [], []
    for left, right in candidates:
        token = left + right
        if token in vocab or token in seen:
            continue
        text = token_text(token)
        if text is None or not is_chinese_piece(text):
            continue
        seen.add(token)
        tokens.append(token)
        texts.append(text)
    if not tokens:
        return []
    # Segment with merges only: ignore_merges would hand back a whole pre-token that happens to be in the vocab.
    base = _tokenizer(data, ignore_merges=False)
    pre = base.pre_tokenizer
    segmented = base.encode_batch(texts, add_special_tokens=False)
    ranks: dict[tuple[str, str], int] = {}
    chosen: list[tuple[str, str]] = []
    for token, text, enc in zip(tokens, texts, segmented, strict=True):
        # The trainer never crosses a pre-token boundary, but the token's text alone might split differently.
        if pre is not None and len(pre.pre_tokenize_str(text)) != 1:
            continue
        pieces = _apply(enc.tokens, ranks)
        if len(pieces) != 2 or pieces[0] + pieces[1] != token:
            continue
        ranks[(pieces[0], pieces[1])] = len(ranks)
        chosen.append((pieces[0], pieces[1]))
        if max_new is not None and len(chosen) >= max_new:
            break
    return chosen


def _apply(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE with the new merges only: lowest rank first, leftmost on ties (as the tokenizers library does)."""
    pieces = list(pieces)
    while len(pieces) > 1:
        best = min(((ranks[pair], i) for i, pair in enumerate(zip(pieces, pieces[1:], strict=False))
                    if pair in ranks), default=None)
        if best is None:
            break
        i = best[1]
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def append_merges(data: dict, merges: list[tuple[str, str]], total: int | None = None) -> dict:
    """The base tokenizer.json with `merges` (and their tokens) after it, padded with unreachable tokens to
    `total`."""
    out = json.loads(json.dumps(data))  # deep copy; the base dict stays as it was
    model = out["model"]
    vocab, start = model["vocab"], next_id(data)
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    for i, (left, right) in enumerate(merges):
        vocab[left + right] = start + i
        model["merges"].append(f"{left} {right}" if as_strings else [left, right])
    size = start + len(merges)
    for i in range(size, total or size):
        vocab[PAD_TOKEN.format(i)] = i
    return out


def extend_bpe(base: str | Path, inputs: list[str | Path], vocab_size: int, out: str | Path,
               pad_to_multiple: int | None = None, max_chars: int | None = None) -> Path:
    """Train on `inputs` and append so that the result has exactly `vocab_size` ids (or the next multiple of
    `pad_to_multiple`)."""
    data = load_bpe_json(base)
    have = next_id(data)
    wanted = vocab_size - have
    if wanted <= 0:
        raise ZhllamaError(f"--vocab-size {vocab_size} is not larger than the base vocabulary ({have} ids)")
    # The trainer starts from bytes: it relearns characters and words the base already has, and makes
    # partial-character tokens on the way, so it needs more merges than we keep (Llama-3 on pretrain_zh keeps
    # 88% of 100k; a 600k-character corpus about 70%). Retrain larger only if that was not enough.
    size, merges, exhausted = 256 + int(wanted * 1.3) + 5000, [], False
    for _ in range(4):
        candidates = train_bpe(data, inputs, size, max_chars=max_chars)
        exhausted = len(candidates) + 256 < size  # the trainer ran out of pairs seen at least twice
        merges = select_merges(data, candidates, max_new=wanted)
        if len(merges) >= wanted or exhausted:
            break
        size = int(size * wanted / max(len(merges), 1) * 1.1) + 2000
    if len(merges) < wanted:
        raise ZhllamaError(f"the input yields only {len(merges)} new Chinese tokens but {wanted} are needed for "
                           f"--vocab-size {vocab_size}; give more text or a smaller --vocab-size")
    total = math.ceil(vocab_size / pad_to_multiple) * pad_to_multiple if pad_to_multiple else vocab_size
    args = {"base": str(base), "input": [str(p) for p in inputs], "vocab_size": vocab_size,
            "pad_to_multiple": pad_to_multiple, "max_chars": max_chars}
    return write_bpe(base, append_merges(data, merges, total), out, "tokenizer extend", args,
                     base_vocab_size=have, new_tokens=len(merges))


def merge_bpe(base: str | Path, add: str | Path, out: str | Path, max_new: int | None = None) -> Path:
    """Append the Chinese tokens of another byte-level BPE tokenizer (in its merge order) to `base`."""
    data, extra = load_bpe_json(base), load_bpe_json(add)
    merges = select_merges(data, _merge_pairs(extra["model"]), max_new=max_new)
    args = {"base": str(base), "add": str(add), "max_new": max_new}
    return write_bpe(base, append_merges(data, merges), out, "tokenizer merge", args, base_vocab_size=next_id(data),
                     new_tokens=len(merges), inputs={"add": file_sha256(_json_path(add))})


def write_bpe(base: str | Path, data: dict, out: str | Path, command: str, args: dict,
              inputs: dict | None = None, **extra) -> Path:
    """tokenizer.json, the base's config files, and zhllama.json; written whole or not at all."""
    base_json = _json_path(base)
    # Written by the tokenizers library itself: exactly what it loads, and far faster than json's indented
    # (pure-Python) encoder on a 20 MB file.
    tok = _tokenizer(data)
    with atomic_output_dir(out) as tmp:
        tok.save(str(tmp / "tokenizer.json"), pretty=True)
        for name in BASE_FILES:
            if (base_json.parent / name).is_file():
                shutil.copy2(base_json.parent / name, tmp / name)
        write_provenance(tmp, command, args, {"base": file_sha256(base_json), **(inputs or {})},
                         tokenizer_sha256=file_sha256(tmp / "tokenizer.json"), vocab_size=next_id(data), **extra)
    return Path(out)
