"""SentencePiece model protos: load from a file or an HF folder, validate, and write."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from zhllama.errors import ZhllamaError

ModelProto = sp_pb2.ModelProto
Piece = sp_pb2.ModelProto.SentencePiece

# Piece types, numbered as in sentencepiece_model.proto (GGUF uses the same numbers).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = sp_pb2.TrainerSpec.BPE


def model_path(base: str | Path) -> Path:
    """A tokenizer.model file, given the file itself or an HF folder holding one."""
    path = Path(base)
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise ZhllamaError(f"{base}: no SentencePiece tokenizer.model found")
    return path


def load_proto(base: str | Path) -> ModelProto:
    path = model_path(base)
    proto = ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf raises DecodeError, or worse on random bytes
        raise ZhllamaError(f"{path}: not a SentencePiece model ({type(exc).__name__})") from None
    if len(proto.pieces) == 0:
        raise ZhllamaError(f"{path}: not a SentencePiece model (no pieces)")
    return proto


def proto_sha256(proto: ModelProto) -> str:
    return hashlib.sha256(proto.SerializeToString()).hexdigest()


def is_han(ch: str) -> bool:
    """Han ideographs: the unified block, extensions A to H, and compatibility ideographs."""
    cp = ord(ch)
    return 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x323AF or 0xF900 <= cp <= 0xFAFF


def is_cjk(ch: str) -> bool:
    """Han ideographs (all extension blocks), CJK punctuation and full-width forms."""
    cp = ord(ch)
    return (
        0x3400 <= cp <= 0x4DBF or 0x4E00 <= cp <= 0x9FFF or 0xF900 <= cp <= 0xFAFF
        or 0x20000 <= cp <= 0x323AF or 0x3000 <= cp <= 0x303F or 0xFF00 <= cp <= 0xFFEF
        or 0x2E80 <= cp <= 0x2FDF or 0x31C0 <= cp <= 0x31EF
    )
