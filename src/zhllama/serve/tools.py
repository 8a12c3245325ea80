"""Tool calling in the OpenAI API: the request's `tools`, `tool_choice` and `parallel_tool_calls`, the history's
tool calls and results, and the reply's `tool_calls`, whole or streamed.

The model writes a call in its chat template's format (llama3: Meta's JSON object; chatml: `<tool_call>` blocks);
`zhllama.chat.parse_tool_calls` reads it, above the engines, so both backends answer alike. A reply that is not a
well-formed call, or names a function the request did not offer, is plain content: never a 5xx. `tool_choice`
"required" or a named function starts the reply with the call's opening (the template's syntax, and the name when
one is named), so the model can only continue a call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from zhllama.infer.params import BadRequest, show_value

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class ToolRequest:
    tools: list[dict] = field(default_factory=list)  # OpenAI tool schemas, as sent
    choice: str = "auto"  # auto | none | required | function
    function: str | None = None  # the function named by tool_choice
    parallel: bool = True

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def active(self) -> bool:
        """Whether the reply may be a tool call (tools offered and not switched off)."""
        return bool(self.tools) and self.choice != "none"


def parse_tool_request(data: dict) -> ToolRequest:
    """The request's tool fields, each checked with the field named in the error."""
    tools = data.get("tools")
    tools = [] if tools is None else tools
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list of {type: 'function', function: {name, description, parameters}}",
                         "tools")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        _check_tool(tool, i, seen)
    parallel = data.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadRequest(f"parallel_tool_calls must be true or false, got {show_value(parallel)}",
                         "parallel_tool_calls")
    request = ToolRequest(tools, parallel=parallel is not False)
    choice = data.get("tool_choice")
    if choice is None or choice in ("auto", "none", "required"):
        request.choice = choice or "auto"
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in seen:
            raise BadRequest(f"tool_choice names the function {show_value(name)}, which is not among the tools "
                             f"({', '.join(sorted(seen)) or 'none given'})", "tool_choice")
        request.choice, request.function = "function", name
    else:
        raise BadRequest("tool_choice must be 'auto', 'none', 'required' or {type: 'function', function: {name}}",
                         "tool_choice")
    if request.choice in ("required", "function") and not tools:
        raise BadRequest(f"tool_choice {request.choice!r} needs tools", "tool_choice")
    return request


def _check_tool(tool: Any, i: int, seen: set[str]) -> None:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise BadRequest(f"{where} must be {{type: 'function', function: {{name, description, parameters}}}}", "tools")
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadRequest(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-', got "
                         f"{show_value(name)}", "tools")
    if name in seen:
        raise BadRequest(f"{where}.function.name {name!r} is given twice", "tools")
    seen.add(name)
    if not isinstance(function.get("description", ""), str):
        raise BadRequest(f"{where}.function.description must be a string", "tools")
    parameters = function.get("parameters")
    if parameters is not None and (not isinstance(parameters, dict)
                                   or not isinstance(parameters.get("type", "object"), str)):
        raise BadRequest(f"{where}.function.parameters must be a JSON Schema object", "tools")


def history_message(message: dict, i: int, role: str, content: str, call_ids: set[str]) -> dict:
    """One message of the history with its tool fields checked: an assistant's `tool_calls`, a tool result's
    `tool_call_id` (which must answer a call made earlier in the conversation)."""
    where = f"messages[{i}]"
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise BadRequest(f"{where}.tool_call_id is required for a tool message (the id of the call it answers)",
                             "messages")
        if call_id not in call_ids:
            raise BadRequest(f"{where}.tool_call_id {call_id!r} answers no tool call made earlier in the "
                             "conversation", "messages")
        return {"role": "tool", "content": content, "tool_call_id": call_id}
    calls = message.get("tool_calls")
    if role != "assistant" or calls is None:
        return {"role": role, "content": content}
    if not isinstance(calls, list) or not calls:
        raise BadRequest(f"{where}.tool_calls must be a non-empty list", "messages")
    clean = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments"), str) or not isinstance(call.get("id"), str):
            raise BadRequest(f"{where}.tool_calls[{j}] must be {{id, type: 'function', function: {{name, arguments "
                             "(a JSON string)}}}}", "messages")
        try:
            arguments = json.loads(function["arguments"])
        except json.JSONDecodeError:
            raise BadRequest(f"{where}.tool_calls[{j}].function.arguments is not valid JSON", "messages") from None
        call_ids.add(call["id"])
        clean.append({"id": call["id"], "type": "function",
                      "function": {"name": function["name"], "arguments": arguments}})
    return {"role": "assistant", "content": content, "tool_calls": clean}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def reply_tool_calls(calls: list[dict] | None, request: ToolRequest) -> list[dict] | None:
    """The reply's `tool_calls` (OpenAI's shape), or None when it is to be plain content: no call parsed, or a call
    to a function the request did not offer. Without parallel_tool_calls only the first call is kept."""
    if not request.active or not calls or any(c["name"] not in request.names for c in calls):
        return None
    if request.function is not None and any(c["name"] != request.function for c in calls):
        return None
    calls = calls if request.parallel else calls[:1]
    return [{"id": call_id(), "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls]


def tool_call_deltas(tool_calls: list[dict]) -> list[dict]:
    """The deltas OpenAI streams for tool calls: each call opens with its id, type and name (arguments empty), then
    its arguments follow."""
    deltas = []
    for index, call in enumerate(tool_calls):
        deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                       "function": {"name": call["function"]["name"], "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]})
    return deltas


def reply_opening(request: ToolRequest, tool_format: str | None) -> str:
    """What the reply must start with: the call syntax for `tool_choice` "required" (with the name when only one
    function is offered) or a named function; nothing otherwise."""
    from zhllama.chat.tools import call_opening

    if tool_format is None or request.choice not in ("required", "function"):
        return ""
    name = request.function or (request.names[0] if len(request.names) == 1 else None)
    return call_opening(tool_format, name)


def split_reply(text: str, request: ToolRequest, tool_format: str | None) -> tuple[str, list[dict] | None]:
    """(content, tool_calls) of a whole reply (its forced opening included): the calls in OpenAI's shape and the
    text before them, or the whole text as content and None when it is not a call this request can take."""
    from zhllama.chat.tools import calls_in_format

    found = calls_in_format(tool_format, text) if request.active and tool_format else None
    calls = reply_tool_calls(found[1] if found else None, request)
    return (found[0], calls) if calls else (text, None)


class CallWatch:
    """A streamed reply's text, held back where it may be a tool call and passed on as content where it cannot be.

    llama3 calls are the whole reply, a JSON object: text whose first non-space character is not "{" is content
    at once. chatml calls may follow content: text streams until "<tool_call>" appears (a tail that could still
    become it, and whitespace that may precede it, waits). A forced opening makes the whole reply a call. `finish`
    decides on the whole text.
    """

    TAG = "<tool_call>"

    def __init__(self, request: ToolRequest, tool_format: str, opening: str = ""):
        from zhllama.chat.tools import LLAMA3

        self.request, self.format, self.llama3 = request, tool_format, tool_format == LLAMA3
        self.text, self.sent, self.holding = opening, 0, bool(opening)

    def feed(self, piece: str) -> str:
        """The content that can be sent now."""
        self.text += piece
        if self.holding:
            return ""
        if self.llama3:
            head = self.text.lstrip()
            if not head:
                return ""
            self.holding = head[0] == "{"
            return "" if self.holding else self._send(len(self.text))
        found = self.text.find(self.TAG, self.sent)
        if found >= 0:
            self.holding = True
            return self._send(self._before_space(found))
        tail = next((k for k in range(min(len(self.TAG) - 1, len(self.text) - self.sent), 0, -1)
                     if self.text.endswith(self.TAG[:k])), 0)
        return self._send(self._before_space(len(self.text) - tail))

    def finish(self) -> tuple[str, list[dict] | None]:
        """(content still to send, tool_calls or None) once the reply is complete."""
        _, calls = split_reply(self.text, self.request, self.format)
        return ("", calls) if calls else (self._send(len(self.text)), None)

    def _before_space(self, end: int) -> int:
        """`end` moved back over the whitespace before it, which waits: before a call it is the template's
        separator, not content (`split_reply` strips it), so the streamed content equals the whole reply's."""
        return self.sent + len(self.text[self.sent:end].rstrip())

    def _send(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out
