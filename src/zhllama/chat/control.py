"""Only a chat template writes control tokens: text from users and data is always tokenized as plain text.

A Hugging Face tokenizer turns the literal string ``"</s>"`` anywhere in its input into the EOS id (``"a</s><s>b"``
gives ``[263, 2, 1, 289]`` with Llama-2's). So a user who types ``</s><s>Assistant: `` into a message could forge
conversation turns, and SFT data holding such strings would train on broken structure. This module is the one
mechanism that prevents it; the pretraining packer, SFT, the prompt builder of ``chat``/``generate``/``serve``
and ``eval qa`` (both backends), and ``eval mc`` all call it.

The rule is transformers' own ``apply_chat_template(..., sanitize_control_tokens=True)``, so that anyone can
reproduce our ids from the saved model's ``chat_template`` (tested, token for token):

* Control tokens are every special or added token of the tokenizer (``<s>``, ``</s>``, ``<|im_end|>`` when it is
  one). Inside message content each occurrence is wrapped in two private-use markers before the template renders
  (:func:`mark`, :func:`mark_messages`); the template's own control tokens carry no markers. (transformers takes
  the special tokens plus the added tokens its template spells, or ``tokenizer.chat_control_tokens``: the same set
  for every tokenizer zhllama writes, whose added tokens are all special.)
* The rendered text is cut at the markers (:func:`encode_marked`). A marked token is encoded as plain text: the
  tokenizer's normalizer, pre-tokenizer and model without its added vocabulary, so ``"</s>"`` becomes
  ``["</", "s", ">"]``. Every other piece is encoded normally, so the template's ``<s>`` is still BOS. A piece
  after a cut is encoded behind a newline that is then dropped, so SentencePiece adds no dummy "▁" mid-text.
* Text that is content throughout (a pretraining document, a C-Eval prompt) is cut at its control tokens the same
  way (:func:`encode_plain`).

Text without any control token string takes the ordinary single ``tokenizer(text)`` call, so its ids are exactly
what they always were (and what ``apply_chat_template(tokenize=True)`` gives).

Nothing here sets ``split_special_tokens``: transformers implements it by flipping a flag on the shared Rust
tokenizer, which races when the server encodes prompts in several threads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from zhllama.errors import ZhllamaError

# The same markers transformers' sanitize_control_tokens uses (chat_template_utils): a supplementary private-use
# plane nobody types, and the same characters keep our ids equal to apply_chat_template's.
START, END = "\U000f0000", "\U000f0001"

Offsets = list[tuple[int, int]]


def control_tokens(tokenizer: Any) -> tuple[str, ...]:
    """Every special or added token of the tokenizer as a string, longest first."""
    tokens = set(getattr(tokenizer, "added_tokens_encoder", None) or ())
    tokens.update(t for t in getattr(tokenizer, "all_special_tokens", ()) if isinstance(t, str) and t)
    return tuple(sorted(tokens, key=lambda t: (-len(t), t)))


@lru_cache(maxsize=64)
def _patterns(tokens: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """A regex for any control token (longest first, so a token wins over the tokens it contains), and one for a
    marked control token or a lone marker (a template's string methods may separate a marker from its token)."""
    control = re.compile("|".join(map(re.escape, tokens)) or "(?!)")  # (?!) never matches
    markers = re.compile(f"{START}({control.pattern}){END}|[{START}{END}]")
    return control, markers


def marker(tokenizer: Any, tokens: tuple[str, ...] | None = None) -> Callable[[str], str]:
    """The function that marks text for this tokenizer (looking the control tokens up once per conversation, not
    once per message: it is a tenth of the time of tokenizing a short conversation; a caller that has already
    looked them up passes ``tokens``)."""
    control, _ = _patterns(control_tokens(tokenizer) if tokens is None else tokens)
    wrapped = f"{START}\\g<0>{END}"

    def mark_text(text: str) -> str:
        # Markers already in the text are removed first, so that they cannot forge a marked (or unmarked) token.
        return control.sub(wrapped, text.replace(START, "").replace(END, ""))

    return mark_text


def mark(tokenizer: Any, text: str) -> str:
    """``text`` with every control token wrapped in markers."""
    return marker(tokenizer)(text)


def mark_value(mark_text: Callable[[str], str], value: Any) -> Any:
    """``value`` with every string in it marked: a string, or the values of dicts and the items of lists and tuples
    (recursively; dict keys are not marked, as in transformers' ``mark_control_tokens``)."""
    if isinstance(value, str):
        return mark_text(value)
    if isinstance(value, dict):
        return {key: mark_value(mark_text, v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mark_value(mark_text, v) for v in value)
    return value


def mark_messages(tokenizer: Any, messages: Sequence[dict]) -> list[dict]:
    """The messages with every string in them marked (all roles; content, tool calls and their arguments)."""
    mark_text = marker(tokenizer)
    return [mark_value(mark_text, dict(m)) for m in messages]


# --------------------------------------------------------------------------------------------------------------
# Encoding


def plain_ids(tokenizer: Any, text: str) -> list[int]:
    """``text`` as plain text: no special or added token is recognised in it, not even a non-special one.

    For a fast tokenizer this runs the backend's normalizer, pre-tokenizer and model directly (what transformers'
    ``_encode_without_added_tokens`` does); it changes no tokenizer state, so threads may call it at once.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a Python tokenizer: split_special_tokens is its only switch
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    splits = [s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
    return [token.id for split in splits for token in backend.model.tokenize(split)]


def _normal(tokenizer: Any, text: str, with_offsets: bool) -> tuple[list[int], Offsets]:
    if not with_offsets:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), []
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:
        raise ZhllamaError("token offsets need a fast tokenizer (tokenizer.json)") from exc
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _continuation(tokenizer: Any, text: str, as_text: bool, newline: list[int],
                  with_offsets: bool) -> tuple[list[int], Offsets]:
    """Ids of a piece that follows a cut. It is encoded behind "\\n", whose ids are then dropped: SentencePiece
    prepends "▁" to every text it is given, and mid-text there is none. A marked token's ids all get the span of
    the whole token (it lies inside one message, so its loss mask is one value)."""
    if as_text:
        ids = plain_ids(tokenizer, "\n" + text)
        ids = ids[len(newline):] if ids[:len(newline)] == newline else plain_ids(tokenizer, text)
        return ids, [(0, len(text))] * len(ids) if with_offsets else []
    ids, offsets = _normal(tokenizer, "\n" + text, with_offsets)
    if ids[:len(newline)] == newline:
        return ids[len(newline):], [(s - 1, e - 1) for s, e in offsets[len(newline):]]
    return _normal(tokenizer, text, with_offsets)


def _encode_pieces(tokenizer: Any, text: str, cuts: list[tuple[int, int, str | None, int]],
                   with_offsets: bool) -> tuple[list[int], Offsets]:
    """Encode ``text`` cut at ``cuts`` = [(start, end, token or None, where the token starts)], in order: the text
    between cuts normally, each cut's token as plain text, the rest of a cut (its markers) not at all."""
    if not cuts:
        return _normal(tokenizer, text, with_offsets)
    newline = list(tokenizer("\n", add_special_tokens=False)["input_ids"])
    ids, offsets = _normal(tokenizer, text[:cuts[0][0]], with_offsets)
    nexts = [c[0] for c in cuts[1:]] + [len(text)]
    for (_, end, token, token_at), following in zip(cuts, nexts, strict=True):
        for piece, at, as_text in ((token, token_at, True), (text[end:following], end, False)):
            if not piece:
                continue
            piece_ids, piece_offsets = _continuation(tokenizer, piece, as_text, newline, with_offsets)
            if as_text and tokenizer.convert_tokens_to_ids(piece) in piece_ids:
                raise ZhllamaError(f"cannot keep {piece!r} as plain text: the tokenizer makes it from plain text")
            ids += piece_ids
            offsets += [(s + at, e + at) for s, e in piece_offsets]
    return ids, offsets


def encode_marked(tokenizer: Any, text: str, with_offsets: bool = False) -> tuple[list[int], Offsets]:
    """Ids (and character offsets into ``text``, when asked) of a prompt rendered from marked messages.

    Marked control tokens become plain text, lone markers are dropped (they still cut the text, so that the text on
    either side cannot join into a control token), and everything else, the template's control tokens included, is
    encoded normally. Equal to ``apply_chat_template(..., tokenize=True, sanitize_control_tokens=True)``.
    """
    if START not in text and END not in text:
        return _normal(tokenizer, text, with_offsets)
    _, markers = _patterns(control_tokens(tokenizer))
    cuts = [(m.start(), m.end(), m.group(1), m.start(1)) for m in markers.finditer(text)]
    return _encode_pieces(tokenizer, text, cuts, with_offsets)


def encode_plain(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Ids of texts that are content throughout (documents, benchmark prompts): control token strings in them are
    plain text, cut and encoded as :func:`encode_marked` does. ``add_special_tokens`` adds what the tokenizer adds
    around a text (Llama: BOS in front). Texts without control token strings are encoded in one batched call."""
    control, _ = _patterns(control_tokens(tokenizer))
    out: list[list[int] | None] = [None] * len(texts)
    ordinary = [i for i, t in enumerate(texts) if control.search(t) is None]
    if ordinary:
        batch = tokenizer([texts[i] for i in ordinary], add_special_tokens=add_special_tokens)["input_ids"]
        for i, ids in zip(ordinary, batch, strict=True):
            out[i] = list(ids)
    prefix, suffix = _specials_around(tokenizer) if add_special_tokens else ([], [])
    for i, text in enumerate(texts):
        if out[i] is None:
            cuts = [(m.start(), m.end(), m.group(0), m.start()) for m in control.finditer(text)]
            ids, _ = _encode_pieces(tokenizer, text, cuts, False)
            out[i] = prefix + ids + suffix
    return out  # type: ignore[return-value]


def _specials_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds in front of and behind a text (Llama: [BOS] and [])."""
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a")["input_ids"])
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k], full[k + len(bare):]
    return [], []
