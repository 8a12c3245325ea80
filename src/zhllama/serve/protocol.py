"""OpenAI's request and response shapes: parsing with field-named errors, and the JSON the server sends back.

Requests are parsed by hand rather than by a pydantic model so that every refusal is OpenAI's error shape with
the field in ``param`` and a sentence a user can act on. Unknown fields are ignored, as OpenAI-compatible
servers commonly do, because clients (LangChain among them) send fields a local model has no use for.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from zhllama.chat import validate_messages
from zhllama.errors import ZhllamaError
from zhllama.infer.params import BadRequest, Completion, SamplingParams, show_value
from zhllama.serve.tools import ToolRequest, history_message, parse_tool_request

ROLES = ("system", "user", "assistant", "tool")
# Newer OpenAI clients send the system prompt as "developer"; for a chat model it is the system message.
ROLE_ALIASES = {"developer": "system"}
MAX_DEPTH = 32  # an OpenAI request is a few levels deep; deeper JSON is an attack on the parser, not a request
# Fields whose meaning we cannot honour: refused, so that a client never takes a plain reply for one that followed
# them. Each maps to the values that ask for nothing (and so are accepted). OpenAI's deprecated `functions` are
# refused with a pointer to `tools`, which replaced them.
UNSUPPORTED = {"functions": (None, []), "function_call": (None, "none", "auto"),
               "response_format": (None, {"type": "text"})}


@dataclass
class ParsedRequest:
    params: SamplingParams
    stream: bool
    include_usage: bool
    messages: list[dict] | None = None  # chat
    prompt: str | None = None  # completions
    truncate: bool = False
    tools: ToolRequest = field(default_factory=ToolRequest)  # chat: the tools the reply may call


def parse_body(body: bytes) -> dict:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")\
            from None
    except RecursionError:  # json's C parser gives up near Python's recursion limit
        raise BadRequest(f"the request body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as exc:  # an integer of more than 4300 digits (sys.get_int_max_str_digits)
        raise BadRequest(f"the request body holds a number too long to read: {str(exc)[:80]}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    _check_values(data)
    return data


def _check_values(data: dict) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` and strings that are not Unicode text.

    JSON's ``\\ud800`` escape gives a lone surrogate, which no tokenizer and no UTF-8 encoder takes; it would fail
    deep inside a generation instead of here, with the field named.
    """
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(f"the request body is nested more than {MAX_DEPTH} levels deep (at {path})",
                             _top(path))
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                _check_text(key, where)
                stack.append((item, where, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise BadRequest(f"{path} holds a lone surrogate (\\u{ord(bad):04x}), which is not Unicode text; "
                         "send characters, or pairs of surrogates", _top(path)) from None


def _top(path: str) -> str | None:
    top = path.split(".")[0].split("[")[0]
    return top or None


def parse_chat(data: dict, model_name: str, default_max_tokens: int, max_tokens_limit: int) -> ParsedRequest:
    _check_model(data, model_name)
    for name, accepted in UNSUPPORTED.items():
        if name in data and data[name] not in accepted:
            raise BadRequest(f"{name} is not supported by this server; send the request without it (for function "
                             "calling, use tools)" if name.startswith("function") else
                             f"{name} is not supported by this server; send the request without it", name)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    clean, call_ids = [], set()
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object", "messages")
        role = message.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES + tuple(ROLE_ALIASES))}, "
                             f"got {show_value(role)}", "messages")
        content = message.get("content")
        if content is None and role == "assistant":  # OpenAI's shape for an assistant turn that only called tools
            content = ""
        clean.append(history_message(message, i, role, _content_text(content, i), call_ids))
    try:
        clean = validate_messages(clean)
    except ZhllamaError as exc:
        raise BadRequest(str(exc), "messages") from None
    if clean[-1]["role"] not in ("user", "tool"):
        raise BadRequest("the last message must be from the user (or tool results)", "messages")
    tools = parse_tool_request(data)
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    return ParsedRequest(_sampling(data, max_tokens, default_max_tokens, max_tokens_limit),
                         _bool(data, "stream"), _include_usage(data), messages=clean,
                         truncate=_bool(data, "truncate"), tools=tools)


def parse_completion(data: dict, model_name: str, default_max_tokens: int, max_tokens_limit: int) -> ParsedRequest:
    _check_model(data, model_name)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("prompt must be a non-empty string (one prompt per request)", "prompt")
    for unsupported in ("echo", "suffix"):
        if data.get(unsupported):
            raise BadRequest(f"{unsupported} is not supported", unsupported)
    return ParsedRequest(_sampling(data, data.get("max_tokens"), default_max_tokens, max_tokens_limit),
                         _bool(data, "stream"), _include_usage(data), prompt=prompt)


def _check_model(data: dict, model_name: str) -> None:
    model = data.get("model")
    if not isinstance(model, str):
        raise BadRequest("model must be a string naming the served model", "model")
    if model != model_name:
        raise ModelNotFound(f"the model {model!r} does not exist; this server serves {model_name!r}")


class ModelNotFound(BadRequest):
    def __init__(self, message: str):
        super().__init__(message, "model")


def _content_text(content: Any, i: int) -> str:
    """A string, or OpenAI's list of parts of which only text parts are accepted."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", "messages")


def _sampling(data: dict, max_tokens: Any, default_max_tokens: int, limit: int) -> SamplingParams:
    if data.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if data.get(name) not in (None, 0, 0.0):
            raise BadRequest(f"{name} is not supported; use repetition_penalty", name)
    if data.get("logprobs"):
        raise BadRequest("logprobs are not supported", "logprobs")
    stop = data.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple):
        raise BadRequest("stop must be a string or a list of strings", "stop")

    def get(name, default):
        value = data.get(name)
        return default if value is None else value

    params = SamplingParams(max_tokens=default_max_tokens if max_tokens is None else max_tokens,
                            temperature=get("temperature", 1.0), top_k=get("top_k", 0), top_p=get("top_p", 1.0),
                            repetition_penalty=get("repetition_penalty", 1.0), stop=tuple(stop),
                            seed=data.get("seed"))
    return params.check(limit)


def _bool(data: dict, name: str) -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {value!r}", name)
    return value


def _include_usage(data: dict) -> bool:
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    return bool(options.get("include_usage"))


# --- responses -------------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, result: Completion, content: str | None = None,
                  tool_calls: list[dict] | None = None) -> dict:
    """The reply: `result.text` (or `content`) as the message, or, with `tool_calls`, those calls and the text
    the model wrote before them (None when there is none) with finish_reason "tool_calls"."""
    message = {"role": "assistant", "content": result.text if content is None else content}
    if tool_calls:
        message = {"role": "assistant", "content": message["content"] or None, "tool_calls": tool_calls}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if tool_calls else result.finish_reason, "logprobs": None}],
            "usage": usage(result.prompt_tokens, result.completion_tokens)}


def completion_response(rid: str, model: str, result: Completion) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": usage(result.prompt_tokens, result.completion_tokens)}


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def completion_chunk(rid: str, model: str, text: str, finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def usage_chunk(rid: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    # A message may quote what the client sent; a lone surrogate in it would fail to encode the error itself.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if param is not None:
        param = param.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# Characters that JSON leaves as they are but str.splitlines() breaks lines at: clients that read SSE with it
# (httpx's aiter_lines among them) would cut an event in two where the model wrote one of these.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS)
    return f"data: {payload}\n\n".encode()
