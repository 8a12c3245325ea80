"""Tool calling in the chat templates: the two tool formats, rendered in Python and in Jinja, and their parser.

* ``chatml`` writes Qwen2.5's format (the Hermes style), character for character what Qwen2.5-7B-Instruct's own
  template writes on the same messages and tools when the conversation has a system message: the tools go into the
  system block under ``# Tools``, one ``tojson`` line each; a call is ``<tool_call>\\n{"name": …, "arguments": …}
  \\n</tool_call>`` (several calls in one message are several blocks, after the message's content, if any); the
  results of consecutive tool messages are ``<tool_response>`` blocks in one ``user`` turn. One deliberate
  difference: without a system message Qwen's template writes its default system prompt ("You are Qwen, created by
  Alibaba Cloud. …"); ours writes none, and with tools its system block starts at ``# Tools`` (as Qwen3's does).
* ``llama3`` writes Meta's Llama 3.1 JSON tool calls, what Meta's template writes with its defaults
  (``tools_in_user_message`` true, no ``builtin_tools``): ``Environment: ipython`` heads the system block when
  there are tools; the tools, ``tojson(indent=4)`` each, go into the first user message behind Meta's preamble; a
  call is the assistant turn ``{"name": …, "parameters": …}<|eot_id|>`` (the message's content is not written, as
  in Meta's template, and one call per message: Meta's template refuses more); a result is an ``ipython`` turn
  whose content is written through ``tojson`` (Meta's template does that to a string, so ``{"a": 1}`` becomes
  ``"{\\"a\\": 1}"``: kept, since engines that serve Llama 3.1 with Meta's template write the same).

Deliberate differences from both references: an empty tool list means no tools (Meta's template would write the
preamble with no functions), and call arguments given as JSON text are written as they are (the references pass
them through ``tojson`` again, which quotes the whole text; transformers asks for a dict there, and with a dict
all three agree). Loss targets: a call message (its text and end-of-turn marker) is a target like a reply; tool
results never are.
"""

from __future__ import annotations

import json
import re
from typing import Any

from zhllama.errors import ZhllamaError

Segments = list[tuple[str, bool]]

CHATML, LLAMA3 = "qwen2.5", "llama3.1"  # the tool formats (ChatTemplate.tool_format)


def _dumps(value: Any, indent: int | None = None) -> str:
    """transformers' ``tojson`` filter (``json.dumps`` without ASCII escapes)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def arguments_text(arguments: str | dict) -> str:
    """Call arguments as written: JSON text as it is, a dict as ``tojson`` writes it."""
    return arguments if isinstance(arguments, str) else _dumps(arguments)


def tool_problem(template_name: str, tool_format: str | None, messages: list[dict], tools: list | None) -> str | None:
    """Why a template cannot write these (validated) messages and tools, or None."""
    calls = [m["tool_calls"] for m in messages if m.get("tool_calls")]
    if tool_format is None:
        if tools or calls or any(m["role"] == "tool" for m in messages):
            return f"chat template {template_name} has no tool format; use llama3 or chatml"
    elif tool_format == LLAMA3 and any(len(c) != 1 for c in calls):
        return (f"chat template {template_name} writes one tool call per assistant message (Meta's Llama 3.1 "
                "format has no parallel calls)")
    return None


# --------------------------------------------------------------------------------------------------------------
# chatml: Qwen2.5

QWEN_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                   "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
QWEN_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                   "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                   '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def chatml_system(system: str | None, tools: list | None) -> str:
    """The system block: the system message, then with tools the ``# Tools`` section."""
    if tools is None:
        return "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
    head = "" if system is None else system + "\n\n"
    listed = "".join("\n" + _dumps(tool) for tool in tools)
    return f"<|im_start|>system\n{head}{QWEN_TOOLS_HEAD}{listed}{QWEN_TOOLS_TAIL}<|im_end|>\n"


def chatml_reply(message: dict) -> str:
    """The text of an assistant message after its header: the content, then a ``<tool_call>`` block per call."""
    calls = [f'<tool_call>\n{{"name": "{c["function"]["name"]}", "arguments": '
             f'{arguments_text(c["function"]["arguments"])}}}\n</tool_call>' for c in message.get("tool_calls", ())]
    if not calls:
        return message["content"]
    return "\n".join(([message["content"]] if message["content"] else []) + calls)


def chatml_exchange(steps: tuple[dict, ...]) -> Segments:
    """Segments of the assistant and tool messages of a turn (calls and replies targets, results not)."""
    segs: Segments = []
    for k, msg in enumerate(steps):
        if msg["role"] == "tool":
            first = steps[k - 1]["role"] != "tool"  # a turn's first step is the assistant's
            last = k + 1 == len(steps) or steps[k + 1]["role"] != "tool"
            segs.append((("<|im_start|>user" if first else "") + "\n<tool_response>\n" + msg["content"]
                         + "\n</tool_response>" + ("<|im_end|>\n" if last else ""), False))
        else:
            segs += [("<|im_start|>assistant\n", False), (chatml_reply(msg) + "<|im_end|>", True), ("\n", False)]
    return segs


CHATML_JINJA_SYSTEM = r"""{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if system_message is not none -%}
{{- system_message + '\n\n' -}}
{%- endif -%}
{{- '""" + QWEN_TOOLS_HEAD.replace("\n", "\\n") + r"""' -}}
{%- for tool in tools -%}
{{- '\n' + (tool | tojson) -}}
{%- endfor -%}
{{- '""" + QWEN_TOOLS_TAIL.replace("\n", "\\n") + r"""<|im_end|>\n' -}}
{%- elif system_message is not none -%}
{{- '<|im_start|>system\n' + system_message + '<|im_end|>\n' -}}
{%- endif -%}
"""

CHATML_JINJA_MESSAGE = r"""{%- if message['role'] == 'tool' -%}
{%- if loop_messages[loop.index0 - 1]['role'] != 'tool' -%}
{{- '<|im_start|>user' -}}
{%- endif -%}
{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' -}}
{%- if loop.last or loop_messages[loop.index0 + 1]['role'] != 'tool' -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- elif message['role'] == 'assistant' and message.tool_calls -%}
{{- '<|im_start|>assistant' -}}
{%- if message['content'] -%}
{{- '\n' + message['content'] -}}
{%- endif -%}
{%- for tool_call in message.tool_calls -%}
{{- '\n<tool_call>\n{"name": "' + tool_call.function.name + '", "arguments": ' -}}
{%- if tool_call.function.arguments is string -%}
{{- tool_call.function.arguments -}}
{%- else -%}
{{- tool_call.function.arguments | tojson -}}
{%- endif -%}
{{- '}\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endif -%}
"""


# --------------------------------------------------------------------------------------------------------------
# llama3: Meta's Llama 3.1 JSON tool calls

L3_TOOLS_PREAMBLE = ("Given the following functions, please respond with a JSON for a function call with its proper "
                     "arguments that best answers the given prompt.\n\n"
                     'Respond in the format {"name": function name, "parameters": dictionary of argument name and '
                     'its value}.Do not use variables.\n\n')


def llama3_call(message: dict) -> str:
    """The single call of an assistant message as Meta's template writes it."""
    function = message["tool_calls"][0]["function"]
    return f'{{"name": "{function["name"]}", "parameters": {arguments_text(function["arguments"])}}}'


def llama3_tools_user(user: str, tools: list) -> str:
    """The first user message with the tool list in front of it (after its header)."""
    return L3_TOOLS_PREAMBLE + "".join(_dumps(tool, indent=4) + "\n\n" for tool in tools) + user.strip()


def llama3_exchange(steps: tuple[dict, ...], header, eot: str) -> Segments:
    segs: Segments = []
    for msg in steps:
        if msg["role"] == "tool":
            segs.append((header("ipython") + _dumps(msg["content"]) + eot, False))
        else:
            text = llama3_call(msg) if "tool_calls" in msg else msg["content"].strip()
            segs += [(header("assistant"), False), (text + eot, True)]
    return segs


LLAMA3_JINJA_FIRST_USER = r"""{%- if loop.first and tools -%}
{{- '<|start_header_id|>user<|end_header_id|>\n\n' + '""" + L3_TOOLS_PREAMBLE.replace("\n", "\\n") + r"""' -}}
{%- for tool in tools -%}
{{- (tool | tojson(indent=4)) + '\n\n' -}}
{%- endfor -%}
{{- (message['content'] | trim) + '<|eot_id|>' -}}
"""

LLAMA3_JINJA_TOOL_MESSAGES = r"""{%- elif message['role'] == 'tool' -%}
{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + (message['content'] | tojson) + '<|eot_id|>' -}}
{%- elif message['role'] == 'assistant' and message.tool_calls -%}
{%- if message.tool_calls | length != 1 -%}
{{- raise_exception('chat template llama3 writes one tool call per assistant message') -}}
{%- endif -%}
{%- set function = message.tool_calls[0].function -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "' + function.name + '", "parameters": ' -}}
{%- if function.arguments is string -%}
{{- function.arguments -}}
{%- else -%}
{{- function.arguments | tojson -}}
{%- endif -%}
{{- '}<|eot_id|>' -}}
"""

# The order check of zhllama.chat.messages, in Jinja: after a user the assistant, after a call its results, after
# a result another result or the assistant, after a reply the user.
JINJA_TOOL_ORDER = r"""{%- if loop.first -%}
{%- set allowed = ['user'] -%}
{%- elif loop_messages[loop.index0 - 1]['role'] == 'user' -%}
{%- set allowed = ['assistant'] -%}
{%- elif loop_messages[loop.index0 - 1]['role'] == 'tool' -%}
{%- set allowed = ['tool', 'assistant'] -%}
{%- elif loop_messages[loop.index0 - 1].tool_calls -%}
{%- set allowed = ['tool'] -%}
{%- else -%}
{%- set allowed = ['user'] -%}
{%- endif -%}
{%- if message['role'] not in allowed -%}
{{- raise_exception('""" + (
    "roles must be an optional system message, then user/assistant alternating, starting with user; an assistant "
    "message with tool_calls is followed by tool messages, and after them the assistant speaks again") + r"""') -}}
{%- endif -%}
"""


def jinja_no_tools(name: str) -> str:
    """The check a template without a tool format makes (before its loop)."""
    return (r"""{%- if tools -%}
{{- raise_exception('chat template """ + name + r""" has no tool format; use llama3 or chatml') -}}
{%- endif -%}
""")


def jinja_no_tool_calls(name: str) -> str:
    """The same check on each message of the loop (tool messages already fail the role check)."""
    return (r"""{%- if message.tool_calls -%}
{{- raise_exception('chat template """ + name + r""" has no tool format; use llama3 or chatml') -}}
{%- endif -%}
""")


# --------------------------------------------------------------------------------------------------------------
# Parsing a generated reply

_QWEN_CALL = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.DOTALL)


def _call(obj: Any, keys: tuple[str, ...]) -> dict[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    found = [k for k in keys if k in obj]
    if len(found) != 1 or set(obj) != {"name", found[0]} or not isinstance(obj[found[0]], dict):
        return None
    return {"name": obj["name"], "arguments": _dumps(obj[found[0]])}


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def split_tool_calls(template: Any, text: str) -> tuple[str, list[dict[str, str]]] | None:
    """(content, calls) of a generated reply (the text before the end-of-turn marker) in a template's format, the
    calls as ``[{"name": str, "arguments": JSON text of an object}]``; None when the text is not a well-formed call.

    ``llama3``: the whole text (stripped) is one JSON object ``{"name": …, "parameters": {…}}`` (``"arguments"``
    accepted too); the content is "". ``chatml``: the content (stripped; may be empty) is followed by one or more
    ``<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`` blocks with only whitespace between and after
    them, as the template writes them; other text after the first block, or a block whose JSON does not parse or
    has other keys, means no calls. Templates without a tool format never have calls.
    """
    from zhllama.chat.templates import get_template

    return calls_in_format(get_template(template).tool_format, text)


def calls_in_format(tool_format: str | None, text: str) -> tuple[str, list[dict[str, str]]] | None:
    """``split_tool_calls`` by tool format (``CHATML``, ``LLAMA3`` or None), for a model whose Jinja is not ours."""
    if tool_format == LLAMA3:
        call = _call(_loads(text.strip()), ("parameters", "arguments"))
        return None if call is None else ("", [call])
    start = text.find("<tool_call>") if tool_format == CHATML else -1
    if start < 0:
        return None
    calls, rest, pos = [], text[start:].rstrip(), 0
    while pos < len(rest):
        m = _QWEN_CALL.match(rest, pos)
        call = None if m is None else _call(_loads(m.group(1)), ("arguments",))
        if call is None:
            return None
        calls.append(call)
        pos = len(rest) - len(rest[m.end():].lstrip())
    return text[:start].strip(), calls


def parse_tool_calls(template: Any, text: str) -> list[dict[str, str]] | None:
    """The calls of ``split_tool_calls`` (None when the text is not a well-formed call in the template's format)."""
    found = split_tool_calls(template, text)
    return None if found is None else found[1]


def call_opening(tool_format: str, name: str | None = None) -> str:
    """The text every call of the format starts with, up to the arguments when the function is named: what a
    server writes at the start of a reply that must be a call (`tool_choice` "required" or a named function)."""
    if tool_format == LLAMA3:
        return '{"name": "' + (f'{name}", "parameters": ' if name else "")
    if tool_format == CHATML:
        return '<tool_call>\n{"name": "' + (f'{name}", "arguments": ' if name else "")
    raise ZhllamaError(f"no tool format {tool_format!r}")


def jinja_tool_format(jinja: str) -> str | None:
    """The tool format a model's own Jinja writes (Meta's Llama 3.1 or Qwen2.5 template and their copies), if any."""
    if "<tool_call>" in jinja and "<tool_response>" in jinja:
        return CHATML
    if "ipython" in jinja and '"parameters": ' in jinja:
        return LLAMA3
    return None
