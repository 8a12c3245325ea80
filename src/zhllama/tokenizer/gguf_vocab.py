"""Rebuild a SentencePiece model from the vocabulary stored in a GGUF file (llama.cpp's "llama" SPM type)."""

from __future__ import annotations

from pathlib import Path

from zhllama.errors import ZhllamaError
from zhllama.tokenizer.spm import BPE, BYTE, ModelProto

_KEY = "tokenizer.ggml."


def read_gguf_vocab(path: str | Path) -> dict:
    """pieces, scores, types and special ids of an SPM-type GGUF vocabulary."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ZhllamaError(f"{path}: not a readable GGUF file ({exc})") from None
    fields = reader.fields

    def get(name, default=None):
        field = fields.get(_KEY + name)
        return default if field is None else field.contents()

    model = get("model")
    if model != "llama":
        raise ZhllamaError(f"{path}: GGUF tokenizer type is {model!r}, not a SentencePiece ('llama') vocabulary")
    tokens = get("tokens")
    if not tokens:
        raise ZhllamaError(f"{path}: GGUF file has no tokenizer.ggml.tokens")
    scores = get("scores") or [0.0] * len(tokens)
    types = get("token_type") or [1] * len(tokens)
    return {
        "tokens": list(tokens),
        "scores": [float(s) for s in scores],
        "types": [int(t) for t in types],
        "unk_id": get("unknown_token_id", 0),
        "bos_id": get("bos_token_id", 1),
        "eos_id": get("eos_token_id", 2),
        "pad_id": get("padding_token_id", -1),
        "add_space_prefix": bool(get("add_space_prefix", True)),
    }


def proto_from_gguf(path: str | Path) -> ModelProto:
    vocab = read_gguf_vocab(path)
    proto = ModelProto()
    for piece, score, kind in zip(vocab["tokens"], vocab["scores"], vocab["types"], strict=True):
        new = proto.pieces.add()
        new.piece, new.score, new.type = piece, score, kind
    n = len(vocab["tokens"])
    spec = proto.trainer_spec
    spec.model_type = BPE
    spec.vocab_size = n
    spec.byte_fallback = any(t == BYTE for t in vocab["types"])
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    spec.max_sentencepiece_length = 16
    spec.unk_surface = " \u2047 "
    for key in ("unk", "bos", "eos", "pad"):
        idx = vocab[f"{key}_id"]
        idx = idx if idx is not None and 0 <= idx < n else -1
        setattr(spec, f"{key}_id", idx)
        if idx >= 0:
            setattr(spec, f"{key}_piece", vocab["tokens"][idx])
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = vocab["add_space_prefix"]
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto
