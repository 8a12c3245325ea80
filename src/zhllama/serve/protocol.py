"""OpenAI's request and response shapes: parsing with field-named errors, and the JSON the server sends back.

Requests are parsed by hand rather than by a pydantic model so that every refusal is OpenAI's error shape with
the field in ``param`` and a sentence a user can act on. Unknown fields are ignored, as OpenAI-compatible
servers commonly do, because clients (LangChain among them) send fields a local model has no use for.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from zhllama.chat import validate_messages
from zhllama.errors import ZhllamaError
from zhllama.infer.params import BadRequest, Completion, SamplingParams

ROLES = ("system", "user", "assistant")


@dataclass
class ParsedRequest:
    params: SamplingParams
    stream: bool
    include_usage: bool
    messages: list[dict] | None = None  # chat
    prompt: str | None = None  # completions
    truncate: bool = False


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
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


def parse_chat(data: dict, model_name: str, default_max_tokens: int, max_tokens_limit: int) -> ParsedRequest:
    _check_model(data, model_name)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object", "messages")
        role = message.get("role")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
        clean.append({"role": role, "content": _content_text(message.get("content"), i)})
    try:
        clean = validate_messages(clean)
    except ZhllamaError as exc:
        raise BadRequest(str(exc), "messages") from None
    if clean[-1]["role"] != "user":
        raise BadRequest("the last message must be from the user", "messages")
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    return ParsedRequest(_sampling(data, max_tokens, default_max_tokens, max_tokens_limit),
                         _bool(data, "stream"), _include_usage(data), messages=clean,
                         truncate=_bool(data, "truncate"))


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


def chat_response(rid: str, model: str, result: Completion) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
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
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# Characters that JSON leaves as they are but str.splitlines() breaks lines at: clients that read SSE with it
# (httpx's aiter_lines among them) would cut an event in two where the model wrote one of these.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS)
    return f"data: {payload}\n\n".encode()
