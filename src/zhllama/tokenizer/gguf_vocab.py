"""Read the vocabulary stored in a GGUF file: llama.cpp's "llama" (SentencePiece) or "gpt2" (byte-level BPE) type.

The SPM type is rebuilt here as a SentencePiece model; the BPE type becomes a tokenizer.json in `bpe.py`.
"""

from __future__ import annotations

from pathlib import Path

from zhllama.errors import ZhllamaError
from zhllama.tokenizer.spm import BPE, BYTE, ModelProto

_KEY = "tokenizer.ggml."


# llama.cpp's tokenizer.ggml.model values that zhllama rebuilds.
SPM_MODEL, BPE_MODEL = "llama", "gpt2"


# GGUF value types (ggml's gguf.h): scalar struct formats by type id; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | Path) -> bool:
    """Whether the file starts with GGUF's magic bytes (whatever its name)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf_metadata(path: str | Path) -> dict:
    """The key/value metadata of a GGUF file (the tensors are not read).

    Our own reader: gguf.GGUFReader makes one numpy object per string, 19 s for Llama-3's 128k tokens and
    280k merges against 0.3 s here. Only the metadata pages of a multi-gigabyte model file are touched (mmap).
    """
    import mmap
    import struct

    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != GGUF_MAGIC:
                raise ValueError("no GGUF magic number")
            version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
            if version < 2:
                raise ValueError(f"GGUF version {version} is not supported")
            pos = 24

            def string():
                nonlocal pos
                (n,) = struct.unpack_from("<Q", buf, pos)
                text = buf[pos + 8:pos + 8 + n].decode("utf-8")
                pos += 8 + n
                return text

            def value(kind):
                nonlocal pos
                if kind == _STRING:
                    return string()
                if kind == _ARRAY:
                    item, n = struct.unpack_from("<IQ", buf, pos)
                    pos += 12
                    if item in _SCALARS:  # one unpack for the whole array (token types, scores)
                        fmt = f"<{n}{_SCALARS[item]}"
                        values = list(struct.unpack_from(fmt, buf, pos))
                        pos += struct.calcsize(fmt)
                        return values
                    return [value(item) for _ in range(n)]
                fmt = "<" + _SCALARS[kind]
                (result,) = struct.unpack_from(fmt, buf, pos)
                pos += struct.calcsize(fmt)
                return result

            fields = {}
            for _ in range(n_kv):
                key = string()
                (kind,) = struct.unpack_from("<I", buf, pos)
                pos += 4
                fields[key] = value(kind)
            return fields
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise ZhllamaError(f"{path}: not a readable GGUF file ({exc})") from None


def read_gguf_vocab(path: str | Path) -> dict:
    """Tokens, types, special ids (and scores or merges) of a GGUF vocabulary of either supported type.

    add_bos/add_eos are None when the file does not say: llama.cpp then uses a default of the model type.
    """
    fields = read_gguf_metadata(path)

    def get(name, default=None):
        return fields.get(_KEY + name, default)

    model = get("model")
    if model not in (SPM_MODEL, BPE_MODEL):
        raise ZhllamaError(f"{path}: GGUF tokenizer type is {model!r}; supported: {SPM_MODEL!r} (SentencePiece), "
                           f"{BPE_MODEL!r} (byte-level BPE)")
    tokens = get("tokens")
    if not tokens:
        raise ZhllamaError(f"{path}: GGUF file has no tokenizer.ggml.tokens")
    types = get("token_type") or [1] * len(tokens)
    vocab = {
        "model": model,
        "tokens": list(tokens),
        "types": [int(t) for t in types],
        "unk_id": get("unknown_token_id", 0 if model == SPM_MODEL else None),
        "bos_id": get("bos_token_id", 1 if model == SPM_MODEL else None),
        "eos_id": get("eos_token_id", 2 if model == SPM_MODEL else None),
        "eot_id": get("eot_token_id"),
        "pad_id": get("padding_token_id", -1),
        "add_bos": get("add_bos_token"),
        "add_eos": get("add_eos_token"),
        "chat_template": fields.get("tokenizer.chat_template"),
    }
    if model == SPM_MODEL:
        scores = get("scores") or [0.0] * len(tokens)
        vocab.update(scores=[float(s) for s in scores], add_space_prefix=bool(get("add_space_prefix", True)))
    else:
        merges = get("merges")
        if not merges:
            raise ZhllamaError(f"{path}: byte-level BPE vocabulary without tokenizer.ggml.merges")
        # A missing key is not an empty name: llama.cpp then falls back to its "default" pre-tokenizer.
        vocab.update(merges=list(merges), pre=get("pre"))
    return vocab


def proto_from_gguf(path: str | Path) -> ModelProto:
    vocab = read_gguf_vocab(path)
    if vocab["model"] != SPM_MODEL:
        raise ZhllamaError(f"{path}: GGUF tokenizer type is {vocab['model']!r}, not a SentencePiece ('llama') "
                           "vocabulary")
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
