"""Tokenizer stage: rebuild a vocabulary from GGUF (SentencePiece or byte-level BPE), train a Chinese model, merge,
extend, measure.

Every function writes a complete folder (or nothing) and returns its path.
"""

from __future__ import annotations

import math
from pathlib import Path

from zhllama.artifacts import atomic_output_dir, file_sha256, write_provenance
from zhllama.errors import ZhllamaError
from zhllama.tokenizer import bpe, bpe_extend
from zhllama.tokenizer.gguf_vocab import SPM_MODEL, proto_from_gguf, read_gguf_vocab
from zhllama.tokenizer.hf import write_hf_tokenizer
from zhllama.tokenizer.merge import SCORE_SCHEMES, candidate_pieces, merge_protos, pad_vocab
from zhllama.tokenizer.spm import ModelProto, load_proto, proto_sha256
from zhllama.tokenizer.stats import as_dicts as stats_as_dicts
from zhllama.tokenizer.stats import format_table, load_corpora, measure
from zhllama.tokenizer.train import VocabTooSmall, train_spm

__all__ = ["SCORE_SCHEMES", "extend", "format_table", "from_gguf", "merge", "stats", "stats_as_dicts", "train"]

# Options for a Chinese model that is to be merged into Llama: no dummy prefix (Chinese text has no spaces,
# so "▁X" pieces would waste slots) and no split between Han and punctuation ("，但", "了。" are frequent).
MERGE_TRAINING = dict(add_dummy_prefix=False, split_by_unicode_script=False)


def from_gguf(gguf_path: str | Path, out: str | Path) -> Path:
    """An HF tokenizer folder from a GGUF vocabulary: SentencePiece ("llama": tokenizer.model too) or byte-level
    BPE ("gpt2": tokenizer.json with the pre-tokenizer that tokenizer.ggml.pre names), encoding as llama.cpp."""
    vocab = read_gguf_vocab(gguf_path)
    args, inputs = {"gguf": str(gguf_path)}, {"gguf": file_sha256(gguf_path)}
    if vocab["model"] == SPM_MODEL:
        return _write_tokenizer(proto_from_gguf(gguf_path), out, "tokenizer from-gguf", args, inputs)
    pre = bpe.pre_type(vocab, gguf_path)  # an unknown pre type fails before any folder is made
    with atomic_output_dir(out) as tmp:
        bpe.write_bpe_tokenizer(vocab, gguf_path, tmp)
        # The fingerprint zhllama.model.loading.tokenizer_sha256 gives a tokenizer.json-only folder.
        write_provenance(tmp, "tokenizer from-gguf", args, inputs,
                         tokenizer_sha256=file_sha256(tmp / "tokenizer.json"), tokenizer_type="byte-level-bpe",
                         pre_tokenizer=pre, vocab_size=len(vocab["tokens"]), merges=len(vocab["merges"]),
                         eot_token=bpe.special_tokens(vocab)["eot"])  # the chat turn end, llama.cpp's EOT
    return Path(out)


def train(inputs: list[str | Path], vocab_size: int, out: str | Path, standalone: bool = False) -> Path:
    """A Chinese BPE model (tokenizer.model) to merge, or with `standalone` a complete HF tokenizer."""
    if vocab_size < 300:
        raise ZhllamaError(f"--vocab-size {vocab_size} is too small (at least 300)")
    options = dict(pad_id=3) if standalone else MERGE_TRAINING
    proto = train_spm(inputs, vocab_size, standalone=standalone, **options)
    args = {"input": [str(p) for p in inputs], "vocab_size": vocab_size, "standalone": standalone}
    if standalone:
        return _write_tokenizer(proto, out, "tokenizer train", args)
    with atomic_output_dir(out) as tmp:
        (tmp / "tokenizer.model").write_bytes(proto.SerializeToString())
        (tmp / "tokenizer.vocab").write_text(
            "".join(f"{p.piece}\t{p.score:g}\n" for p in proto.pieces), encoding="utf-8")
        write_provenance(tmp, "tokenizer train", args, pieces=len(proto.pieces))
    return Path(out)


def merge(base: str | Path, add: str | Path, out: str | Path, scheme: str = "zh-rank",
          max_new: int | None = None) -> Path:
    """Append `add`'s new Chinese pieces to `base`: both SentencePiece models, or both byte-level BPE
    tokenizer.json files (then the scheme does not apply: new merges always rank after the base's)."""
    if bpe_extend.is_bpe_base(base) or bpe_extend.is_bpe_base(add):
        _same_kind(base, add)
        _bpe_scheme(scheme)
        return bpe_extend.merge_bpe(base, add, out, max_new=max_new)
    base_proto, zh_proto = load_proto(base), load_proto(add)
    merged = merge_protos(base_proto, zh_proto, scheme=scheme, max_new=max_new)
    return _write_tokenizer(
        merged, out, "tokenizer merge", {"base": str(base), "add": str(add), "scheme": scheme},
        {"base": proto_sha256(base_proto), "add": proto_sha256(zh_proto)},
        base_vocab_size=len(base_proto.pieces))


def extend(base: str | Path, inputs: list[str | Path], vocab_size: int, out: str | Path,
           pad_to_multiple: int | None = None, scheme: str = "zh-rank", max_chars: int | None = None) -> Path:
    """Train on `inputs` and merge so that the result has exactly `vocab_size` pieces (or the next multiple
    of `pad_to_multiple`, filled with control pieces that encoding never produces).

    The base decides how: a tokenizer.model (SentencePiece, Llama-2) here; a tokenizer.json-only byte-level
    BPE (Llama-3, Qwen2) in bpe_extend."""
    if bpe_extend.is_bpe_base(base):
        _bpe_scheme(scheme)
        return bpe_extend.extend_bpe(base, inputs, vocab_size, out, pad_to_multiple=pad_to_multiple,
                                     max_chars=max_chars)
    base_proto = load_proto(base)
    wanted = vocab_size - len(base_proto.pieces)
    if wanted <= 0:
        raise ZhllamaError(f"--vocab-size {vocab_size} is not larger than the base vocabulary "
                           f"({len(base_proto.pieces)} pieces)")
    zh_proto, available = None, 0
    # The Chinese model needs more pieces than we keep: some are already in the base, some are not Chinese.
    zh_size = int(wanted * 1.15) + 500
    for _ in range(4):
        try:
            zh_proto = train_spm(inputs, zh_size, max_chars=max_chars, **MERGE_TRAINING)
        except VocabTooSmall as exc:  # every character must be a piece; then come the merges
            zh_size = exc.required + zh_size
            continue
        available = len(candidate_pieces(base_proto, zh_proto))
        if available >= wanted or len(zh_proto.pieces) < zh_size:  # enough, or the corpus is exhausted
            break
        zh_size = int(zh_size * wanted / max(available, 1) * 1.05) + 500
    if zh_proto is None or available < wanted:
        raise ZhllamaError(f"the input yields only {available} new Chinese pieces but {wanted} are needed for "
                           f"--vocab-size {vocab_size}; give more text or a smaller --vocab-size")
    merged = merge_protos(base_proto, zh_proto, scheme=scheme, max_new=wanted)
    if pad_to_multiple:
        pad_vocab(merged, math.ceil(vocab_size / pad_to_multiple) * pad_to_multiple)
    args = {"base": str(base), "input": [str(p) for p in inputs], "vocab_size": vocab_size,
            "pad_to_multiple": pad_to_multiple, "scheme": scheme}
    return _write_tokenizer(merged, out, "tokenizer extend", args, {"base": proto_sha256(base_proto)},
                            base_vocab_size=len(base_proto.pieces))


def _same_kind(base: str | Path, add: str | Path) -> None:
    """A SentencePiece model cannot be appended to a byte-level BPE, nor the reverse: different alphabets."""
    kinds = {p: "a byte-level BPE tokenizer.json" if bpe_extend.is_bpe_base(p) else "a SentencePiece model"
             for p in (base, add)}
    if kinds[base] != kinds[add]:
        raise ZhllamaError(f"--add {add} is {kinds[add]} but --base {base} is {kinds[base]}; "
                           f"merge needs {kinds[base]} for both")


def _bpe_scheme(scheme: str) -> None:
    if scheme != "zh-rank":
        raise ZhllamaError(f"--scheme {scheme} applies to SentencePiece bases only; a byte-level BPE base always "
                           "ranks new merges after its own")


def stats(tokenizers: list[str | Path], zh=None, en=None, code=None, names: list[str] | None = None):
    corpora = load_corpora({"zh": zh, "en": en, "code": code})
    names = names or [str(t) for t in tokenizers]
    return [measure(t, corpora, name) for t, name in zip(tokenizers, names, strict=True)]


def _write_tokenizer(proto: ModelProto, out, command: str, args: dict, inputs: dict | None = None,
                     **extra) -> Path:
    with atomic_output_dir(out) as tmp:
        write_hf_tokenizer(proto, tmp)
        write_provenance(tmp, command, args, inputs, tokenizer_sha256=proto_sha256(proto),
                         vocab_size=len(proto.pieces), **extra)
    return Path(out)
