"""Append a Chinese SentencePiece model to a Llama one without touching any base id, score or type.

Which pieces go in: only pieces that hold at least one Han character and otherwise only CJK punctuation,
full-width forms or the word-start "▁". English and code without Han text then segment exactly as before;
a full-width "＊" or "・" alone, which English web text does contain, is left to byte fallback.
Every kept piece must be reachable by BPE merges of pieces
that are also kept, and every character of it must be a piece, or the fast tokenizer could not reproduce
sentencepiece.

What score they get decides how the merged BPE segments. Three schemes, compared in
benchmarks/tokenizer_efficiency.py:
  zh-rank  the Chinese model's own merge order, shifted half a step so no score ties a base score (default);
  append   below every base merge, in the Chinese model's order;
  zero     every new piece scores 0, as the public Chinese-LLaMA merges do. Ties everywhere: sentencepiece
           breaks them by position, which no rank-based fast tokenizer can reproduce.
"""

from __future__ import annotations

import copy

from zhllama.errors import ZhllamaError
from zhllama.tokenizer.spm import BYTE, CONTROL, NORMAL, USER_DEFINED, ModelProto, is_cjk, is_han

SCORE_SCHEMES = ("zh-rank", "append", "zero")
PAD_PIECE = "<pad_{}>"
# Llama-2 scores its whitespace-only pieces -1e9; the "real" merge scores sit far above that.
_SENTINEL_SCORE = -1e8


def is_chinese_piece(piece: str) -> bool:
    body = piece.replace("▁", "")
    return any(is_han(ch) for ch in body) and all(is_cjk(ch) for ch in body)


def candidate_pieces(base: ModelProto, zh: ModelProto, cjk_only: bool = True) -> list[tuple[str, float]]:
    """New pieces of `zh`, in the order they should be taken: characters first, then merges by rank.

    Characters lead because every merge needs its characters; merges follow the Chinese model's own order,
    so any prefix of the list is closed under BPE (a piece's parents come before it).
    """
    have = {p.piece for p in base.pieces if p.type in (NORMAL, USER_DEFINED)}
    fresh = [(p.piece, p.score) for p in zh.pieces
             if p.type == NORMAL and p.piece not in have and (not cjk_only or is_chinese_piece(p.piece))]
    chars = [(piece, score) for piece, score in fresh if len(piece) == 1]
    available = have | {piece for piece, _ in chars}
    merges = []
    for piece, score in fresh:
        if len(piece) == 1:
            continue
        reachable = any(piece[:cut] in available and piece[cut:] in available for cut in range(1, len(piece)))
        if reachable and all(ch in available for ch in piece):
            merges.append((piece, score))
            available.add(piece)
    return chars + merges


def _scores(base: ModelProto, chosen: list[tuple[str, float]], scheme: str) -> list[float]:
    if scheme == "zero":
        return [0.0] * len(chosen)
    if scheme == "zh-rank":
        return [score - 0.5 for _, score in chosen]
    if scheme == "append":
        floor = min((p.score for p in base.pieces if p.score > _SENTINEL_SCORE), default=0.0)
        ordered = sorted(range(len(chosen)), key=lambda i: -chosen[i][1])
        out = [0.0] * len(chosen)
        for rank, i in enumerate(ordered):
            out[i] = floor - 1.0 - rank
        return out
    raise ZhllamaError(f"unknown score scheme {scheme!r}; choose one of {', '.join(SCORE_SCHEMES)}")


def merge_protos(
    base: ModelProto,
    zh: ModelProto,
    *,
    scheme: str = "zh-rank",
    max_new: int | None = None,
    cjk_only: bool = True,
) -> ModelProto:
    """The base model with new pieces appended after its last id."""
    if base.trainer_spec.model_type != zh.trainer_spec.model_type:
        raise ZhllamaError("base and added models must both be BPE (or both unigram)")
    chosen = candidate_pieces(base, zh, cjk_only=cjk_only)
    if max_new is not None:
        chosen = chosen[:max_new]
    merged = copy.deepcopy(base)
    for (piece, _), score in zip(chosen, _scores(base, chosen, scheme), strict=True):
        new = merged.pieces.add()
        new.piece, new.score, new.type = piece, score, NORMAL
    # Text with characters outside the vocabulary must still round-trip.
    if not any(p.type == BYTE for p in merged.pieces):
        raise ZhllamaError("the base model has no byte-fallback pieces; a merged Llama tokenizer needs them")
    merged.trainer_spec.byte_fallback = True
    merged.trainer_spec.vocab_size = len(merged.pieces)
    return merged


def pad_vocab(proto: ModelProto, total: int) -> None:
    """Append control pieces up to `total`: sentencepiece never emits control pieces from text."""
    have = {p.piece for p in proto.pieces}
    while len(proto.pieces) < total:
        name = PAD_PIECE.format(len(proto.pieces))
        assert name not in have
        new = proto.pieces.add()
        new.piece, new.score, new.type = name, 0.0, CONTROL
    proto.trainer_spec.vocab_size = len(proto.pieces)
