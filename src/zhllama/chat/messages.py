"""Conversations and tool lists as the chat templates take them: checked, normalised and split into turns.

A conversation is an optional single leading ``system`` message, then turns. A turn is a ``user`` message and what
answers it: a plain ``assistant`` reply, or a tool exchange. In an exchange the assistant first calls tools (an
``assistant`` message with ``tool_calls``, OpenAI's format), each call message is followed by one or more ``tool``
messages with the results, and after the results the assistant speaks again (another call, or its reply). The
conversation may end anywhere (after a user message, a call, a result or a reply).

Tool calls are ``{"id": str (optional), "type": "function", "function": {"name": str, "arguments": ...}}``, the
arguments a dict or the JSON text of an object (kept as given: the templates write a string verbatim and a dict as
``json.dumps`` writes it, so that a reply the model generated goes back into the prompt unchanged). Tools are
OpenAI tool schemas ``{"type": "function", "function": {"name", "description", "parameters"}}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Union

from zhllama.errors import ZhllamaError

ROLES = ("system", "user", "assistant")
TOOL = "tool"

# The assistant side of a turn: None (not answered), the reply text, or the turn's assistant and tool messages in
# order when it holds a tool call or a tool result.
Reply = Union[str, None, tuple[dict, ...]]
Turn = tuple[str, Reply]

_ORDER = "roles must be an optional system message, then user/assistant alternating, starting with user"
_AFTER_CALL = "an assistant message with tool_calls is followed by tool messages with the results"
_AFTER_RESULT = "after tool results the assistant speaks again"


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a conversation and return it as a list of plain ``{"role", "content"}`` dicts (plus ``tool_calls`` on
    an assistant message that calls tools and ``tool_call_id`` on a tool message that names one, only when present).

    An assistant message with non-empty ``tool_calls`` may have an empty or None content (returned as ""); an empty
    or None ``tool_calls`` is a plain reply. Raises ZhllamaError with a one-line message when a role is unknown, a
    content is not a string, a tool call is malformed, the system message is not the first one, or the order is
    not the one described in this module's docstring.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ZhllamaError("a conversation must be a list of {'role', 'content'} messages")
    out = [_message(i, msg) for i, msg in enumerate(messages)]
    body = out[1:] if out and out[0]["role"] == "system" else out
    if not body:
        raise ZhllamaError("a conversation needs at least one user message")
    offset = len(out) - len(body)
    prev = None
    for j, msg in enumerate(body):
        role = msg["role"]
        if prev is None or (prev["role"] == "assistant" and "tool_calls" not in prev):
            expected, why = ("user",), _ORDER
        elif prev["role"] == "user":
            expected, why = ("assistant",), _ORDER
        elif prev["role"] == "assistant":
            expected, why = (TOOL,), _AFTER_CALL
        else:
            expected, why = (TOOL, "assistant"), _AFTER_RESULT
        if role == TOOL and TOOL not in expected:
            why = "a tool message follows an assistant message with tool_calls, or another tool message"
        if role not in expected:
            where = "only as the first message" if role == "system" else f"not {role!r}"
            raise ZhllamaError(f"message {j + offset}: expected role {' or '.join(map(repr, expected))} ({where}); "
                               f"{why}")
        prev = msg
    return out


def _message(i: int, msg: Any) -> dict[str, Any]:
    if not isinstance(msg, Mapping):
        raise ZhllamaError(f"message {i}: expected a dict with 'role' and 'content', got {type(msg).__name__}")
    role, content = msg.get("role"), msg.get("content")
    if role not in ROLES and role != TOOL:
        raise ZhllamaError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)}, {TOOL})")
    calls = msg.get("tool_calls") if role == "assistant" else None
    if calls:
        content = "" if content is None else content
    if not isinstance(content, str):
        raise ZhllamaError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
    out: dict[str, Any] = {"role": role, "content": content}
    if calls:
        if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
            raise ZhllamaError(f"message {i} (assistant): tool_calls must be a list, got {type(calls).__name__}")
        out["tool_calls"] = [_tool_call(f"message {i} (assistant): tool call {k}", c) for k, c in enumerate(calls)]
    elif role == TOOL and msg.get("tool_call_id") is not None:
        if not isinstance(msg["tool_call_id"], str):
            raise ZhllamaError(f"message {i} (tool): tool_call_id must be a string")
        out["tool_call_id"] = msg["tool_call_id"]
    return out


def _tool_call(where: str, call: Any) -> dict[str, Any]:
    """One OpenAI tool call, checked: ``{"id"?, "type": "function", "function": {"name", "arguments"}}``."""
    if not isinstance(call, Mapping):
        raise ZhllamaError(f"{where}: expected an object, got {type(call).__name__}")
    if call.get("type", "function") != "function":
        raise ZhllamaError(f"{where}: type must be 'function', got {call.get('type')!r}")
    function = call.get("function")
    if not isinstance(function, Mapping):
        raise ZhllamaError(f"{where}: expected {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
    name, arguments = function.get("name"), function.get("arguments")
    if not isinstance(name, str) or not name:
        raise ZhllamaError(f"{where}: function name must be a non-empty string, got {name!r}")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ZhllamaError(f"{where} ({name}): arguments are not valid JSON ({exc.msg})") from None
        if not isinstance(parsed, dict):
            raise ZhllamaError(f"{where} ({name}): arguments must be a JSON object, got {type(parsed).__name__}")
    elif isinstance(arguments, Mapping):
        arguments = dict(arguments)
    else:
        raise ZhllamaError(f"{where} ({name}): arguments must be an object or its JSON text, "
                           f"got {type(arguments).__name__}")
    out: dict[str, Any] = {}
    if call.get("id") is not None:
        if not isinstance(call["id"], str):
            raise ZhllamaError(f"{where} ({name}): id must be a string")
        out["id"] = call["id"]
    out.update({"type": "function", "function": {"name": name, "arguments": arguments}})
    return out


def validate_tools(tools: Any) -> list[dict] | None:
    """The tool list, checked: OpenAI tool schemas ``{"type": "function", "function": {"name", ...}}`` (a
    ``description`` string and a ``parameters`` object are optional; other keys are kept). None or an empty list
    mean no tools (None)."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ZhllamaError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}} schemas, "
                           f"got {type(tools).__name__}")
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(function, Mapping):
            raise ZhllamaError(f"tool {k}: expected {{'type': 'function', 'function': {{'name', 'description', "
                               "'parameters'}}")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ZhllamaError(f"tool {k}: function name must be a non-empty string, got {function.get('name')!r}")
        if not isinstance(function.get("description", ""), str):
            raise ZhllamaError(f"tool {k} ({function['name']}): description must be a string")
        if not isinstance(function.get("parameters", {}), Mapping):
            raise ZhllamaError(f"tool {k} ({function['name']}): parameters must be a JSON schema object")
    return [dict(tool) for tool in tools] or None


def wrap_tools(tools: Any) -> list[dict] | None:
    """``validate_tools`` of a list whose items may also be bare ``{"name", "description", "parameters"}`` functions
    (LLaMA-Factory's form), each wrapped as ``{"type": "function", "function": item}``."""
    if isinstance(tools, list):
        tools = [{"type": "function", "function": t} if isinstance(t, Mapping) and "function" not in t
                 and "type" not in t else t for t in tools]
    return validate_tools(tools)


def uses_tools(turns: list[Turn]) -> bool:
    """Whether any turn holds a tool call or a tool result."""
    return any(isinstance(reply, tuple) for _, reply in turns)


def split_turns(messages: Any) -> tuple[str | None, list[Turn]]:
    """(system text or None, [(user, reply), ...]) of a validated conversation; see ``Reply``."""
    msgs = validate_messages(messages)
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    body = msgs[1:] if system is not None else msgs
    turns: list[Turn] = []
    for msg in body:
        if msg["role"] == "user":
            turns.append((msg["content"], None))
            continue
        user, reply = turns[-1]
        if reply is None and msg["role"] == "assistant" and "tool_calls" not in msg:
            reply = msg["content"]
        else:
            reply = reply if isinstance(reply, tuple) else ()
            reply = (*reply, msg)
        turns[-1] = (user, reply)
    return system, turns


def awaits_assistant(reply: Reply) -> bool:
    """Whether the assistant speaks next after a turn whose assistant side is ``reply``."""
    return reply is None or (isinstance(reply, tuple) and reply[-1]["role"] == TOOL)
