"""Read SFT conversations from the formats users have, with file and line in every complaint.

Formats, detected per file by its suffix and per record by its fields:

* ``.csv``: the seed's format, a ``text`` column holding ``<s>Human: question\\n</s><s>Assistant: answer\\n</s>``
  (repeated for multi-turn; an optional ``<s>System: …\\n</s>`` first). The single newline before each ``</s>`` is
  not part of the content. Complaints name the physical line where the CSV row starts.
* ``.jsonl``: one JSON record per line (blank lines are ignored).
* ``.json``: a JSON array of records (complaints name the line where the record starts), or, when the file does not
  start with ``[``, a single JSON object or JSON Lines.

A record is

* Alpaca when it has ``instruction``: the user turn is ``instruction`` plus ``"\\n" + input`` when ``input`` is
  non-empty, the reply is ``output``; an optional ``history`` list of ``[user, assistant]`` pairs comes before it and
  an optional non-empty ``system`` string first;
* ShareGPT when it has ``conversations``: items ``{"from": human|user|gpt|assistant|system, "value": …}`` (an item
  may also use ``role``/``content``); an optional top-level ``system`` string is put first. An unknown ``from``
  skips the whole record. LLaMA-Factory's tool format adds items ``function_call`` (the JSON text of a call
  ``{"name", "arguments"}``, or of a list of them for parallel calls: an assistant message with ``tool_calls``)
  and ``observation`` (a tool result: one ``tool`` message), and a top-level ``tools``, the JSON text of a list of
  tool schemas;
* OpenAI-style when it has ``messages``: ``{"role", "content"}`` items, assistant items may carry ``tool_calls``
  and ``tool`` items results (``zhllama.chat.messages``), with an optional top-level ``tools`` list.

Tools are OpenAI tool schemas ``{"type": "function", "function": {"name", "description", "parameters"}}``; a bare
``{"name", "description", "parameters"}`` (LLaMA-Factory's) is wrapped so. A conversation with tools carries them
in ``Conversation.tools`` (None without). Call arguments given as JSON text are parsed, so that training writes
them as the template writes a dict. A record whose tool JSON is malformed is skipped like any bad record.

Every conversation goes through :func:`zhllama.chat.validate_messages` and must contain at least one assistant
reply. A row or record that fails is recorded in the :class:`ReadReport` as ``"file:line: why"`` and skipped.

Encoding: files are UTF-8 (a leading BOM is allowed). A ``.jsonl`` line that is not UTF-8 is reported and skipped
like any malformed line; a ``.csv`` or JSON-array file that is not UTF-8, or whose CSV/JSON syntax is broken so that
rows can no longer be told apart, raises ZhllamaError naming the file and line, since nothing after that point could
be trusted.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zhllama.chat.messages import validate_messages, wrap_tools
from zhllama.data.readers import ReadReport, input_paths
from zhllama.errors import ZhllamaError



class Conversation(list):
    """The validated messages of one conversation (a list, as before), plus the ``tools`` it may call (the wrapped
    OpenAI schemas, or None): ``tokenize_examples`` passes them to the template."""

    def __init__(self, messages=(), tools: list[dict] | None = None):
        super().__init__(messages)
        self.tools = tools

    def __repr__(self) -> str:
        return f"Conversation({list.__repr__(self)}, tools={self.tools!r})"


_TURN = re.compile(r"<s>(Human|Assistant|System):[ ]?(.*?)\n?</s>", re.DOTALL)
_ATOM_ROLES = {"Human": "user", "Assistant": "assistant", "System": "system"}
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
_JSON_WS = re.compile(r"[ \t\n\r]*")


class SkippedRow(Exception):
    """A row or record that does not parse; the message is the reason."""


# --------------------------------------------------------------------------------------------------------------
# Row and record parsing


def parse_atom_text(text: str) -> Conversation:
    """Messages of one seed-CSV ``text`` value (``<s>Human: …\\n</s><s>Assistant: …\\n</s>…``), validated.

    Raises ZhllamaError when the text has no turns, text outside the ``<s>…</s>`` turns, or a wrong role order.
    """
    text = text.replace("\r\n", "\n")
    messages: list[dict[str, str]] = []
    pos = 0
    for m in _TURN.finditer(text):
        _check_gap(text[pos : m.start()])
        messages.append({"role": _ATOM_ROLES[m.group(1)], "content": m.group(2)})
        pos = m.end()
    _check_gap(text[pos:])
    if not messages:
        raise ZhllamaError("no <s>Human: …</s> / <s>Assistant: …</s> turns in `text`")
    return Conversation(_finish(messages))


def _check_gap(gap: str) -> None:
    if gap.strip():
        preview = gap.strip()[:30]
        raise ZhllamaError(f"text outside the <s>Role: …</s> turns: {preview!r}")


def record_to_messages(record: Any) -> Conversation:
    """Messages of one Alpaca, ShareGPT or ``messages`` record, validated, with the record's tools; ZhllamaError
    says why not."""
    if not isinstance(record, dict):
        raise ZhllamaError(f"expected a JSON object, got {type(record).__name__}")
    messages = _finish(record_messages(record))
    return Conversation(_parsed_arguments(messages), _record_tools(record))


def _record_tools(record: dict) -> list[dict] | None:
    """The record's ``tools``: a list, or its JSON text (LLaMA-Factory); empty means none."""
    tools = record.get("tools")
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise ZhllamaError(f"`tools` is not valid JSON ({exc.msg})") from None
    try:
        return wrap_tools(tools)
    except ZhllamaError as exc:
        raise ZhllamaError(f"`tools`: {exc}") from None


def _parsed_arguments(messages: list[dict]) -> list[dict]:
    """The messages with every call's JSON-text arguments parsed (validation checked they are a JSON object)."""
    for msg in messages:
        for call in msg.get("tool_calls", ()):
            if isinstance(call["function"]["arguments"], str):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return messages


def record_messages(record: dict, alpaca_output: bool = True) -> Any:
    """The unvalidated messages of an Alpaca, ShareGPT or ``messages`` record. Without ``alpaca_output`` an Alpaca
    record ends with its user turn (preference records carry their replies elsewhere)."""
    if "instruction" in record:
        return _alpaca(record, alpaca_output)
    if "conversations" in record:
        return _sharegpt(record)
    if "messages" in record:
        return record["messages"]
    raise ZhllamaError("no `instruction`, `conversations` or `messages` field")


def _finish(messages: Any) -> list[dict[str, Any]]:
    out = validate_messages(messages)
    if not any(m["role"] == "assistant" for m in out):
        raise ZhllamaError("no assistant reply")
    return out


def _system_message(record: dict) -> list[dict[str, Any]]:
    """The optional top-level `system` field both Alpaca and ShareGPT records may carry; empty means none."""
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ZhllamaError(f"`system` must be a string, got {type(system).__name__}")
    return [{"role": "system", "content": system}] if system else []


def _alpaca(record: dict, with_output: bool = True) -> list[dict[str, Any]]:
    instruction, inp, output = record.get("instruction"), record.get("input"), record.get("output")
    if not isinstance(instruction, str):
        raise ZhllamaError(f"`instruction` must be a string, got {type(instruction).__name__}")
    if inp is not None and not isinstance(inp, str):
        raise ZhllamaError(f"`input` must be a string, got {type(inp).__name__}")
    if with_output and not isinstance(output, str):
        raise ZhllamaError(f"`output` must be a string, got {type(output).__name__}")
    messages = _system_message(record)
    history = record.get("history")
    if history is None:
        history = []
    if not isinstance(history, list):
        raise ZhllamaError(f"`history` must be a list of [user, assistant] pairs, got {type(history).__name__}")
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ZhllamaError(f"`history` item {i}: expected a [user, assistant] pair")
        messages.append({"role": "user", "content": pair[0]})
        messages.append({"role": "assistant", "content": pair[1]})
    user = instruction + ("\n" + inp if inp else "")
    messages.append({"role": "user", "content": user})
    if with_output:
        messages.append({"role": "assistant", "content": output})
    return messages


def _sharegpt(record: dict) -> list[dict[str, Any]]:
    items = record["conversations"]
    if not isinstance(items, list):
        raise ZhllamaError(f"`conversations` must be a list, got {type(items).__name__}")
    messages = _system_message(record)
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ZhllamaError(f"conversations item {i}: expected an object, got {type(item).__name__}")
        speaker = item.get("from", item.get("role"))
        role = _SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise ZhllamaError(
                f"conversations item {i}: unknown `from` {speaker!r} (expected one of {', '.join(_SHAREGPT_ROLES)})"
            )
        value = item.get("value", item.get("content"))
        if speaker == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": _function_calls(i, value)})
        else:
            messages.append({"role": role, "content": value})
    return messages


def _function_calls(i: int, value: Any) -> list[dict]:
    """The OpenAI tool calls of a LLaMA-Factory ``function_call`` value: ``{"name", "arguments"}`` or a list."""
    where = f"conversations item {i} (function_call)"
    if not isinstance(value, str):
        raise ZhllamaError(f"{where}: expected the JSON text of a call, got {type(value).__name__}")
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ZhllamaError(f"{where}: not valid JSON ({exc.msg})") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(c, dict) and set(c) == {"name", "arguments"} for c in calls):
        raise ZhllamaError(f'{where}: expected {{"name": …, "arguments": {{…}}}} or a non-empty list of them')
    return [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


# --------------------------------------------------------------------------------------------------------------
# Files


def _decode_whole(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ZhllamaError(f"{path}:{line}: not UTF-8 text") from None


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, text or SkippedRow) per data row."""
    text = _decode_whole(path)
    # The seed's multi-turn rows are long; the csv module's default field limit (128 KiB) is too small.
    if csv.field_size_limit() < 2**31 - 1:
        csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise ZhllamaError(f"{path}:1: malformed CSV header ({exc})") from None
    if header is None:
        return
    names = [h.strip() for h in header]
    if "text" not in names:
        raise ZhllamaError(f"{path}: no `text` column (columns: {', '.join(map(repr, names)) or 'none'})")
    col = names.index("text")
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ZhllamaError(f"{path}:{start}: malformed CSV ({exc})") from None
        if not row:
            continue
        where = f"{path}:{start}"
        if col >= len(row):
            yield where, SkippedRow(f"row has {len(row)} fields, no `text` (column {col + 1})")
        else:
            yield where, row[col]


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """(where, record) per element of a top-level JSON array; `where` names the line the element starts on."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    pos = _JSON_WS.match(text, 0).end() + 1  # after "["
    pos = _JSON_WS.match(text, pos).end()
    if text.startswith("]", pos):
        pos = _JSON_WS.match(text, pos + 1).end()
        if pos != len(text):
            raise ZhllamaError(f"{path}:{line_at(pos)}: unexpected text after the JSON array")
        return
    while True:
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ZhllamaError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        yield f"{path}:{line_at(pos)}", record
        pos = _JSON_WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _JSON_WS.match(text, pos + 1).end()
            continue
        if text.startswith("]", pos):
            pos = _JSON_WS.match(text, pos + 1).end()
            if pos != len(text):
                raise ZhllamaError(f"{path}:{line_at(pos)}: unexpected text after the JSON array")
            return
        raise ZhllamaError(f"{path}:{line_at(pos)}: malformed JSON array (expected ',' or ']')")


def _iter_jsonl_bytes(path: Path, data: bytes) -> Iterator[tuple[str, Any]]:
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{lineno}"
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield where, SkippedRow("not UTF-8 text")
            continue
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            yield where, SkippedRow(f"malformed JSON ({exc.msg})")


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    data = path.read_bytes()
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"[":
        yield from _iter_json_array(path, _decode_whole(path))
        return
    if head == b"{":
        # A single (possibly pretty-printed) object; otherwise JSON Lines.
        try:
            record = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        else:
            yield f"{path}:1", record
            return
    yield from _iter_jsonl_bytes(path, data)


def iter_rows(path: Path) -> Iterator[tuple[str, Any, bool]]:
    """(where, value, is_csv_text) for every row or record of one file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        for where, value in _iter_csv(path):
            yield where, value, True
    elif suffix == ".jsonl":
        for where, value in _iter_jsonl_bytes(path, path.read_bytes()):
            yield where, value, False
    elif suffix == ".json":
        for where, value in _iter_json(path):
            yield where, value, False
    else:
        raise ZhllamaError(f"{path}: unsupported SFT file type {path.suffix or '(none)'!r} (use .csv, .json or .jsonl)")


def iter_conversations(paths: list[str | Path], report: ReadReport | None = None) -> Iterator[Conversation]:
    """Yield every conversation of the files, skipping (and reporting) rows that do not parse."""
    report = report if report is not None else ReadReport()
    for path in input_paths(paths):
        for where, value, is_csv in iter_rows(path):
            if isinstance(value, SkippedRow):
                report.skip(where, str(value))
                continue
            try:
                yield parse_atom_text(value) if is_csv else record_to_messages(value)
            except ZhllamaError as exc:
                report.skip(where, str(exc))


def read_conversations(paths: list[str | Path], report: ReadReport | None = None) -> list[Conversation]:
    """All conversations of the files as validated ``[{"role", "content"}, ...]`` lists (``Conversation``s: with
    the record's ``tools`` in ``.tools``).

    Rows that do not parse are skipped and listed in ``report.skipped`` as ``"file:line: why"``. Raises
    ZhllamaError when no conversation at all could be read.
    """
    report = report if report is not None else ReadReport()
    before = len(report.skipped)
    conversations = list(iter_conversations(paths, report))
    if not conversations:
        skipped = len(report.skipped) - before
        names = ", ".join(str(p) for p in paths)
        hint = f"; first: {report.skipped[before]}" if skipped else ""
        raise ZhllamaError(f"no conversations in {names} ({skipped} rows skipped{hint})")
    return conversations
