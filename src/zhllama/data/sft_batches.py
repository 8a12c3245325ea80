"""SFT conversations as token examples, and examples as batches: packed (several per row) or padded (one per row).

A packed row holds several conversations back to back, each with its own positions 0, 1, 2, ...; the unused tail
is filled with pad tokens that form one more, ignored, "conversation". The model never sees an attention mask:
transformers derives the per-conversation (block-diagonal causal) mask from where the positions restart, for SDPA
and eager attention on CPU and for flash-attention's varlen kernel on GPU. So a packed row computes exactly what
the same conversations would compute one per row, and the loss over the targets is the same (tested).
"""

from __future__ import annotations

import bisect
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from zhllama.chat import IGNORE_INDEX, ChatTemplate, check_template_tokens, tokenize_conversation
from zhllama.errors import ZhllamaError


@dataclass
class SftExamples:
    """Tokenized conversations, with counts of everything that was shortened or left out."""

    input_ids: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    conversations: int = 0  # conversations given
    truncated: int = 0  # conversations that lost their oldest turns to fit seq_len
    dropped_turns: int = 0  # turns lost that way, in all
    too_long: int = 0  # conversations skipped: their last turn alone is longer than seq_len
    no_target: int = 0  # conversations skipped: no assistant reply to learn from
    tool_format: int = 0  # conversations skipped: tool calls or tools the chat template cannot write
    tool_format_reason: str = ""  # why, for the first of them

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.input_ids], dtype=np.int64)

    def subset(self, indices) -> SftExamples:
        return SftExamples([self.input_ids[i] for i in indices], [self.labels[i] for i in indices])

    def counts(self) -> dict:
        return {"conversations": self.conversations, "examples": len(self), "truncated": self.truncated,
                "dropped_turns": self.dropped_turns, "skipped_too_long": self.too_long,
                "skipped_no_target": self.no_target, "skipped_tool_format": self.tool_format,
                "tokens": int(self.lengths().sum()),
                "target_tokens": int(sum(int((lab != IGNORE_INDEX).sum()) for lab in self.labels))}

    def warn(self, seq_len: int) -> None:
        """One warning line per kind of loss, so that shortened data is never silent."""
        if self.truncated:
            print(f"warning: {self.truncated} conversations were longer than seq_len={seq_len}; dropped "
                  f"{self.dropped_turns} of their oldest turns", file=sys.stderr)
        if self.too_long:
            print(f"warning: skipped {self.too_long} conversations whose last turn alone is longer than "
                  f"seq_len={seq_len}", file=sys.stderr)
        if self.no_target:
            print(f"warning: skipped {self.no_target} conversations without an assistant reply", file=sys.stderr)
        if self.tool_format:
            print(f"warning: skipped {self.tool_format} conversations with tool calls the chat template cannot "
                  f"write ({self.tool_format_reason})", file=sys.stderr)


def tokenize_examples(tokenizer, template: str | ChatTemplate, conversations: list[list[dict]], seq_len: int,
                      train_on_prompt: bool = False, progress: bool = True) -> SftExamples:
    """Render and tokenize every conversation with its loss mask, fitting each into seq_len tokens.

    A trailing user message (nothing answers it) is left out: it has no target and would only take room; so are
    trailing tool results. The first label of every example is ignored: no token before it belongs to the same
    conversation, and in a packed row the previous conversation must not learn to predict it. A conversation's
    tools are its ``tools`` attribute (``zhllama.data.conversations.Conversation``; a plain list has none); one
    whose tool calls or tools the template cannot write (``ChatTemplate.tool_problem``) is skipped and counted.
    """
    template = check_template_tokens(tokenizer, template)  # before the loop that reads errors as too-long turns
    out = SftExamples(conversations=len(conversations))
    for messages in tqdm(conversations, desc="tokenizing", disable=not progress or None, leave=False):
        tools = getattr(messages, "tools", None)
        while messages and messages[-1]["role"] in ("user", "tool"):
            messages = messages[:-1]
        if not any(m["role"] == "assistant" for m in messages):
            out.no_target += 1
            continue
        if problem := template.tool_problem(messages, tools):
            out.tool_format += 1
            out.tool_format_reason = out.tool_format_reason or problem
            continue
        try:
            enc = tokenize_conversation(tokenizer, template, messages, max_len=seq_len,
                                        train_on_prompt=train_on_prompt, tools=tools)
        except ZhllamaError:  # the messages are valid, so the only failure is a last turn longer than seq_len
            out.too_long += 1
            continue
        labels = np.asarray(enc["labels"], dtype=np.int64)
        labels[0] = IGNORE_INDEX
        if not (labels != IGNORE_INDEX).any():
            out.no_target += 1
            continue
        out.input_ids.append(np.asarray(enc["input_ids"], dtype=np.int64))
        out.labels.append(labels)
        if enc["dropped_turns"]:
            out.truncated += 1
            out.dropped_turns += enc["dropped_turns"]
    return out


def pack_examples(lengths, seq_len: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: groups of example indices whose lengths sum to at most seq_len.

    Longest first, each into the fullest row that still has room; ties go to the lower index, so the result
    depends only on the lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (space left, row), sorted
    for i in order:
        n = int(lengths[i])
        if n > seq_len:
            raise ZhllamaError(f"example {i} has {n} tokens, more than seq_len={seq_len}")
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            left, row = room.pop(at)
        else:
            left, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if left - n > 0:
            bisect.insort(room, (left - n, row))
    return [sorted(row) for row in rows]


def collate(examples: SftExamples, groups: list[list[int]], pad_id: int,
            pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """A batch of rows, each the concatenation of a group of examples with positions restarting per example.

    Rows are padded to the longest row (or to pad_to); the padding continues as a separate run of positions so
    that it is its own attention block, and its labels are ignored.
    """
    totals = [sum(len(examples.input_ids[i]) for i in group) for group in groups]
    width = max(totals) if pad_to is None else pad_to
    if width < max(totals):
        raise ZhllamaError(f"a row of {max(totals)} tokens does not fit pad_to={pad_to}")
    ids = np.full((len(groups), width), pad_id, dtype=np.int64)
    labels = np.full((len(groups), width), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((len(groups), width), dtype=np.int64)
    for r, group in enumerate(groups):
        at = 0
        for i in group:
            n = len(examples.input_ids[i])
            ids[r, at:at + n] = examples.input_ids[i]
            labels[r, at:at + n] = examples.labels[i]
            positions[r, at:at + n] = np.arange(n)
            at += n
        positions[r, at:] = np.arange(width - at)
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(positions)}


def padded_batch(examples: SftExamples, indices: list[int], pad_id: int,
                 pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """The seeds' way, kept as the benchmark's baseline: one example per row, right-padded, with attention_mask."""
    from zhllama.scoring import right_pad

    return right_pad([examples.input_ids[i] for i in indices], pad_id, [examples.labels[i] for i in indices],
                     width=pad_to)
