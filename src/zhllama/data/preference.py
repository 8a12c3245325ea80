"""Preference pairs (a prompt, a chosen and a rejected reply) for DPO/ORPO/SimPO, read and tokenized.

Files are ``.json`` (an array, one object, or JSON Lines) or ``.jsonl``, read as SFT files are
(``zhllama.data.conversations``); a record's prompt is any SFT record format that ends with a user turn instead of a
reply:

* LLaMA-Factory's ShareGPT preference format: ``conversations`` (``from``/``value`` items, an optional top-level
  ``system``), and ``chosen``/``rejected`` as ``{"from": "gpt", "value": …}``;
* Alpaca style: ``instruction``, optional ``input``, ``system`` and ``history``, with ``chosen``/``rejected``;
* OpenAI style: ``messages`` ending with a user message, with ``chosen``/``rejected``;
* TRL's layout: ``prompt`` (a user message as text, or messages), with ``chosen``/``rejected`` as text or as a
  list of one assistant message.

A reply is a string, ``{"from": "gpt"|"assistant", "value": …}`` or ``{"role": "assistant", "content": …}``.
A record that fails is recorded as ``"file:line: why"`` and skipped; ``why`` starts with one of the phrases of
:data:`SKIP_KINDS` (:func:`skip_kind` finds it), so a summary can count the skips by kind.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from zhllama.chat import IGNORE_INDEX, ChatTemplate, check_template_tokens, tokenize_conversation, validate_messages
from zhllama.data.conversations import iter_rows, SkippedRow, record_messages
from zhllama.data.readers import ReadReport, input_paths
from zhllama.errors import ZhllamaError

SKIP_KINDS = (
    "malformed JSON", "not UTF-8 text", "not a JSON object",
    "no `instruction`, `conversations`, `messages` or `prompt` field",
    "no `chosen`", "no `rejected`", "bad `chosen`", "bad `rejected`", "empty `chosen` reply",
    "empty `rejected` reply", "`chosen` equals `rejected`", "bad prompt", "prompt does not end with a user turn",
)
_REPLY_SPEAKERS = ("gpt", "assistant")


@dataclass
class PreferencePair:
    prompt: list[dict]  # validated messages: an optional system message first, ending with a user message
    chosen: str
    rejected: str


class _BadRecord(Exception):
    """A record that is not a usable pair; the message is the reason."""


def skip_kind(entry: str) -> str:
    """The stable phrase a skip reason (or a whole ``"file:line: why"`` entry) starts with."""
    found = re.match(r".*?:\d+: (.*)", entry, re.DOTALL)
    why = found.group(1) if found else entry
    return next((kind for kind in SKIP_KINDS if why.startswith(kind)), why)


def _reply(record: dict, name: str) -> str:
    if name not in record:
        raise _BadRecord(f"no `{name}`")
    value = record[name]
    if isinstance(value, list) and len(value) == 1:  # TRL's conversational layout: a list of one message
        value = value[0]
    if isinstance(value, dict):
        speaker = value.get("from", value.get("role"))
        if speaker not in _REPLY_SPEAKERS:
            raise _BadRecord(f"bad `{name}`: speaker {speaker!r} is not an assistant ({', '.join(_REPLY_SPEAKERS)})")
        value = value.get("value", value.get("content"))
        if not isinstance(value, str):
            raise _BadRecord(f"bad `{name}`: content must be a string, got {type(value).__name__}")
    elif not isinstance(value, str):
        raise _BadRecord(f"bad `{name}`: expected a string or an assistant message, got {type(value).__name__}")
    if not value.strip():
        raise _BadRecord(f"empty `{name}` reply")
    return value


def record_to_pair(record: Any) -> PreferencePair:
    """The pair of one preference record; ZhllamaError says why not, starting with a phrase of SKIP_KINDS."""
    try:
        if not isinstance(record, dict):
            raise _BadRecord(f"not a JSON object (got {type(record).__name__})")
        chosen, rejected = _reply(record, "chosen"), _reply(record, "rejected")
        # llama2 and llama3 strip replies, so a pair differing only in outer whitespace would train on nothing.
        if chosen.strip() == rejected.strip():
            raise _BadRecord("`chosen` equals `rejected`")
        if not any(key in record for key in ("instruction", "conversations", "messages", "prompt")):
            raise _BadRecord("no `instruction`, `conversations`, `messages` or `prompt` field")
        try:
            prompt = validate_messages(_prompt_messages(record))
        except ZhllamaError as exc:
            raise _BadRecord(f"bad prompt: {exc}") from None
        if prompt[-1]["role"] != "user":
            raise _BadRecord(f"prompt does not end with a user turn (its last message is the {prompt[-1]['role']}'s)")
    except _BadRecord as exc:
        raise ZhllamaError(str(exc)) from None
    return PreferencePair(prompt, chosen, rejected)


def _prompt_messages(record: dict) -> Any:
    """TRL's `prompt` (a user message as text, or messages), else the prompt of an SFT record format."""
    if "prompt" in record and not any(key in record for key in ("instruction", "conversations", "messages")):
        prompt = record["prompt"]
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return record_messages(record, alpaca_output=False)


def iter_preference_pairs(paths: list[str | Path], report: ReadReport | None = None) -> Iterator[PreferencePair]:
    """Yield every pair of the files, skipping (and reporting) records that are not usable pairs."""
    report = report if report is not None else ReadReport()
    files = input_paths(paths)
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".csv":
            raise ZhllamaError(f"{path}: preference data has no CSV format (use .json or .jsonl records with "
                               "`chosen` and `rejected`)")
        if suffix not in (".json", ".jsonl"):
            raise ZhllamaError(f"{path}: unsupported preference file type {path.suffix or '(none)'!r} "
                               "(use .json or .jsonl)")
    for path in files:
        for where, value, _ in iter_rows(path):
            if isinstance(value, SkippedRow):
                report.skip(where, str(value))
                continue
            try:
                yield record_to_pair(value)
            except ZhllamaError as exc:
                report.skip(where, str(exc))


def read_preference_pairs(paths: list[str | Path], report: ReadReport | None = None) -> list[PreferencePair]:
    """All pairs of the files; raises ZhllamaError naming the files when there is none."""
    report = report if report is not None else ReadReport()
    before = len(report.skipped)
    pairs = list(iter_preference_pairs(paths, report))
    if not pairs:
        skipped = len(report.skipped) - before
        names = ", ".join(str(p) for p in paths)
        hint = f"; first: {report.skipped[before]}" if skipped else ""
        raise ZhllamaError(f"no preference pairs in {names} ({skipped} records skipped{hint})")
    return pairs


# --------------------------------------------------------------------------------------------------------------
# Tokenization


@dataclass
class PreferenceExamples:
    """Tokenized pairs (each side at most seq_len tokens), with counts of what was shortened or left out."""

    chosen_ids: list[np.ndarray] = field(default_factory=list)
    chosen_labels: list[np.ndarray] = field(default_factory=list)
    rejected_ids: list[np.ndarray] = field(default_factory=list)
    rejected_labels: list[np.ndarray] = field(default_factory=list)
    pairs: int = 0  # pairs given
    truncated: int = 0  # pairs that lost their oldest turns (the same on both sides) to fit seq_len
    dropped_turns: int = 0  # turns lost that way, in all
    too_long: int = 0  # pairs skipped: the last user turn with the longer reply alone is longer than seq_len
    no_target: int = 0  # pairs skipped: a reply with no target token

    def __len__(self) -> int:
        return len(self.chosen_ids)

    def lengths(self) -> np.ndarray:
        return np.array([len(c) + len(r) for c, r in zip(self.chosen_ids, self.rejected_ids, strict=True)],
                        dtype=np.int64)

    def subset(self, indices) -> PreferenceExamples:
        return PreferenceExamples([self.chosen_ids[i] for i in indices], [self.chosen_labels[i] for i in indices],
                                  [self.rejected_ids[i] for i in indices], [self.rejected_labels[i] for i in indices])

    def counts(self) -> dict:
        targets = sum(int((lab != IGNORE_INDEX).sum()) for lab in self.chosen_labels + self.rejected_labels)
        return {"pairs": self.pairs, "examples": len(self), "truncated": self.truncated,
                "dropped_turns": self.dropped_turns, "skipped_too_long": self.too_long,
                "skipped_no_target": self.no_target, "tokens": int(self.lengths().sum()), "target_tokens": targets}

    def warn(self, seq_len: int) -> None:
        """One warning line per kind of loss, so that shortened data is never silent."""
        if self.truncated:
            print(f"warning: {self.truncated} preference pairs were longer than seq_len={seq_len}; dropped "
                  f"{self.dropped_turns} of their oldest turns (the same on both sides)", file=sys.stderr)
        if self.too_long:
            print(f"warning: skipped {self.too_long} preference pairs whose last user turn with the longer reply "
                  f"alone is longer than seq_len={seq_len}", file=sys.stderr)
        if self.no_target:
            print(f"warning: skipped {self.no_target} preference pairs with a reply that has no target token",
                  file=sys.stderr)


def _drop_turns(prompt: list[dict], turns: int) -> list[dict]:
    """The prompt without its ``turns`` oldest turns, each from a user message to the next (tool calls and their
    results stay with their turn, as in ``chat.messages.split_turns``); a system message is kept."""
    head = 1 if prompt and prompt[0]["role"] == "system" else 0
    users = [i for i in range(head, len(prompt)) if prompt[i]["role"] == "user"]
    cut = users[turns] if turns < len(users) else len(prompt)
    return prompt[:head] + prompt[cut:]


def _encode_pair(tokenizer, template: ChatTemplate, prompt: list[dict], replies: list[dict],
                 seq_len: int) -> tuple[list[dict], int]:
    """Both sides' encodings with the same oldest turns dropped, and how many."""

    def encode(reply: dict, drop: int) -> tuple[dict, int]:
        enc = tokenize_conversation(tokenizer, template, _drop_turns(prompt, drop) + [reply], max_len=seq_len,
                                    only_last_reply=True)
        return enc, drop + enc["dropped_turns"]

    sides = [encode(reply, 0) for reply in replies]
    # Dropping turns only shortens a side, so this ends after one more round in practice.
    while sides[0][1] != sides[1][1]:
        drop = max(d for _, d in sides)
        sides = [(enc, d) if d == drop else encode(reply, drop) for (enc, d), reply in zip(sides, replies, strict=True)]
    return [enc for enc, _ in sides], sides[0][1]


def tokenize_pairs(tokenizer, template: str | ChatTemplate, pairs: list[PreferencePair], seq_len: int,
                   progress: bool = True) -> PreferenceExamples:
    """Render and tokenize both sides of every pair, the prompt exactly as SFT renders it, each side in seq_len.

    Only the final reply (with its end-of-turn marker) is a target; the first label is ignored as in
    ``tokenize_examples``. Both sides keep the same prompt: when one side must drop more of the oldest turns to
    fit, the other is tokenized again with as many dropped.
    """
    template = check_template_tokens(tokenizer, template)  # before the loop that reads errors as too-long turns
    out = PreferenceExamples(pairs=len(pairs))
    for n, pair in enumerate(tqdm(pairs, desc="tokenizing pairs", disable=not progress or None, leave=False)):
        replies = [{"role": "assistant", "content": pair.chosen}, {"role": "assistant", "content": pair.rejected}]
        for reply in replies:  # raised, not counted: only a too-long turn may fail inside the try below
            try:
                validate_messages(pair.prompt + [reply])
            except ZhllamaError as exc:
                raise ZhllamaError(f"preference pair {n}: {exc}") from None
        try:
            sides, dropped = _encode_pair(tokenizer, template, pair.prompt, replies, seq_len)
        except ZhllamaError:
            out.too_long += 1
            continue
        encoded = []
        for enc in sides:
            labels = np.asarray(enc["labels"], dtype=np.int64)
            labels[0] = IGNORE_INDEX
            encoded.append((np.asarray(enc["input_ids"], dtype=np.int64), labels))
        if not all((labels != IGNORE_INDEX).any() for _, labels in encoded):
            out.no_target += 1
            continue
        (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = encoded
        out.chosen_ids.append(chosen_ids)
        out.chosen_labels.append(chosen_labels)
        out.rejected_ids.append(rejected_ids)
        out.rejected_labels.append(rejected_labels)
        if dropped:
            out.truncated += 1
            out.dropped_turns += dropped
    return out
