"""Token ids and loss masks of a conversation for SFT (and for scoring replies, ``eval.choice``)."""

from __future__ import annotations

from typing import Any

from zhllama.chat.control import control_tokens, encode_marked, mark_value, marker
from zhllama.chat.messages import split_turns, validate_tools
from zhllama.chat.templates import IGNORE_INDEX, ChatTemplate, Segments, check_template_tokens
from zhllama.errors import ZhllamaError


def _encode(tokenizer: Any, segments: Segments, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Tokenize the rendered text and label tokens from character offsets.

    The segments are rendered from marked content, so a control token string in a message is plain text
    (``zhllama.chat.control``); without one, the whole text is tokenized in one call. The tokenizer prepends the
    dummy "▁" at the start of every encode call and after every special token, so encoding segment by segment
    would not reproduce the ids of the whole text; encoding once does, and a token is a target when any character
    it covers lies in a target segment (a token like "▁hi" that spans the space of the "Assistant: " header and
    the reply's first letter is a target).
    """
    text = "".join(t for t, _ in segments)
    mask = bytearray(len(text))
    pos = 0
    for seg, target in segments:
        if target:
            mask[pos : pos + len(seg)] = b"\x01" * len(seg)
        pos += len(seg)
    ids, offsets = encode_marked(tokenizer, text, with_offsets=not train_on_prompt)
    if train_on_prompt:
        return ids, list(ids)
    labels = []
    for tok_id, (start, end) in zip(ids, offsets, strict=True):
        end = max(end, start + 1)
        labels.append(tok_id if any(mask[start:end]) else IGNORE_INDEX)
    return ids, labels


def _last_reply_only(segments: Segments) -> Segments:
    """The segments with only the last run of target segments (the last reply and its marker) still a target."""
    last = max((i for i, (_, target) in enumerate(segments) if target), default=-1)
    first = last
    while first > 0 and segments[first - 1][1]:
        first -= 1
    return [(text, target and i >= first) for i, (text, target) in enumerate(segments)]


def tokenize_conversation(
    tokenizer: Any,
    template: str | ChatTemplate,
    messages: Any,
    max_len: int | None = None,
    train_on_prompt: bool = False,
    only_last_reply: bool = False,
    tools: Any = None,
    **variables: str,
) -> dict[str, Any]:
    """Token ids and labels of a conversation for SFT.

    ``input_ids`` equal ``tokenizer.apply_chat_template(messages, sanitize_control_tokens=True)`` with the template
    registered (and without the flag, when no message holds a control token string). ``labels`` hold the ids of
    every assistant reply with its end-of-turn marker and -100 elsewhere (all ids when ``train_on_prompt``). With
    ``max_len``, the oldest whole turns (user + assistant, the system message is kept) are dropped until the
    conversation fits; ``dropped_turns`` says how many. If the last turn alone does not fit, ZhllamaError is raised,
    as it is when the tokenizer lacks the template's special tokens (``check_template_tokens``; a caller looping
    over many conversations checks once, before the loop). ``variables`` are the template's (``date_string``).
    With ``only_last_reply`` only the last assistant reply (and its marker) is a target, as preference training
    scores just the reply being compared; the ids do not change. ``tools``: the tool list the template writes
    (``chatml``, ``llama3``); tool calls are targets like replies, tool results are not. As transformers'
    sanitizing does, every string in the tool calls and the tools (not dict keys) is plain text too.
    """
    tokens = control_tokens(tokenizer)  # once: with Llama-3's 256 added tokens the lookup costs more than encoding
    tpl = check_template_tokens(tokenizer, template, tokens)
    system, turns = split_turns(messages)
    mark = marker(tokenizer, tokens)  # message content is plain text: only the template writes control tokens
    system = None if system is None else mark(system)
    turns = [(mark(user), mark_value(mark, reply)) for user, reply in turns]
    tools = mark_value(mark, validate_tools(tools))
    if max_len is not None and max_len < 1:
        raise ZhllamaError(f"max_len must be positive, got {max_len}")
    if only_last_reply and train_on_prompt:
        raise ZhllamaError("only_last_reply and train_on_prompt cannot be combined")
    dropped = 0
    while True:
        segments = tpl._segments(system, turns, False, tools, **variables)
        if only_last_reply:
            segments = _last_reply_only(segments)
        ids, labels = _encode(tokenizer, segments, train_on_prompt)
        if max_len is None or len(ids) <= max_len:
            return {"input_ids": ids, "labels": labels, "dropped_turns": dropped}
        if len(turns) == 1:
            raise ZhllamaError(
                f"the last turn of the conversation alone is {len(ids)} tokens, longer than max_len={max_len}"
            )
        turns = turns[1:]
        dropped += 1
