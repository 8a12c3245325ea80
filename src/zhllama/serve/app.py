"""The OpenAI-compatible server: routes, auth, limits, slots, streaming and the web page at ``/``.

Every generation holds one of ``max_concurrency`` slots (``serve.limits``); the engine decodes all slot holders
together. A streaming client that goes away cancels its task, and the cancellation reaches ``Engine.astream``,
which cancels the generation and so frees the slot at once. A non-streaming request, and a request waiting in line
for a slot, is watched for the same reason. A stream takes its slot before its 200 goes out, so that a full line
can still be answered with 429 and a long wait with 503. What every request passes first is in ``serve.guards``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from zhllama.config import ServeConfig
from zhllama.errors import ZhllamaError
from zhllama.infer.engine import Engine
from zhllama.infer.params import SamplingParams
from zhllama.serve import protocol
from zhllama.serve.guards import Guard
from zhllama.serve.limits import Lease, QueueRefused, Slots
from zhllama.serve.metrics import Metrics
from zhllama.serve.tools import CallWatch, reply_opening, split_reply, tool_call_deltas

log = logging.getLogger("zhllama.serve")


def check_config(config: ServeConfig) -> None:
    """Refuse settings that would make a server unsafe or unable to answer, before any model is loaded."""
    for key in config.api_keys:
        if not key.strip():
            # an empty key would accept "Authorization: Bearer " from anyone
            raise ZhllamaError("--api-key must not be empty (an empty key lets anyone in); give a real key, or "
                               "leave --api-key out to serve without one")
    for flag, value in (("--max-concurrency", config.max_concurrency), ("--queue-timeout", config.queue_timeout),
                        ("--read-timeout", min(config.header_timeout, config.body_timeout)),
                        ("--max-connections", config.max_connections), ("--max-body-bytes", config.max_body_bytes)):
        if not value > 0:
            raise ZhllamaError(f"{flag} must be above 0, got {value}")
    if config.max_queue < 0:
        raise ZhllamaError(f"--max-queue must be at least 0, got {config.max_queue}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body = status, protocol.error_body(message, type_, param, code)
        self.headers = headers


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    check_config(config)
    app = FastAPI(title="zhllama", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics()
    slots = Slots(config.max_concurrency, metrics, config.max_queue, config.queue_timeout)
    limit = min(config.max_tokens_limit, engine.max_tokens_limit)
    default_max_tokens = min(config.default_max_tokens, limit)
    app.state.engine, app.state.metrics, app.state.slots = engine, metrics, slots
    app.add_middleware(Guard, metrics=metrics, bind_host=config.host, allow_origins=config.allow_origins)

    def check_auth(request: Request) -> None:
        if not config.api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Every key is compared, each in constant time, so timing tells nothing about which one nearly matched.
        matches = [hmac.compare_digest(token.encode(), key.encode()) for key in config.api_keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {config.max_body_bytes}")
        body = bytearray()
        try:
            async with asyncio.timeout(config.body_timeout):
                async for part in request.stream():
                    body += part
                    if len(body) > config.max_body_bytes:
                        raise ApiError(413, f"the request body is over the limit of {config.max_body_bytes} bytes")
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {config.body_timeout:g} s "
                                f"({len(body)} bytes came)", headers={"Connection": "close"}) from None
        except ClientDisconnect:
            metrics.disconnects += 1
            raise ApiError(499, "the client closed the connection while sending the body") from None
        return protocol.parse_body(bytes(body))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else exc.headers
        return JSONResponse(exc.body, status_code=exc.status, headers=headers)

    @app.exception_handler(QueueRefused)
    async def _queue_refused(request: Request, exc: QueueRefused):
        code = "queue_full" if exc.status == 429 else "queue_timeout"
        return JSONResponse(protocol.error_body(str(exc), "server_busy" if exc.status == 503 else "rate_limit_error",
                                                code=code),
                            status_code=exc.status, headers={"Retry-After": str(exc.retry_after or 1)})

    @app.exception_handler(ZhllamaError)
    async def _bad_request(request: Request, exc: ZhllamaError):
        status = 404 if isinstance(exc, protocol.ModelNotFound) else 400
        param = getattr(exc, "param", None)
        code = "model_not_found" if status == 404 else None
        return JSONResponse(protocol.error_body(str(exc), param=param, code=code), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(protocol.error_body(str(exc.detail)), status_code=exc.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def web_page():
        return HTMLResponse(resources.files("zhllama.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/health")
    async def health():
        ok = engine.healthy()
        body = {"status": "ok" if ok else "engine stopped", "model": engine.name,
                "auth_required": bool(config.api_keys), "running": metrics.running, "waiting": metrics.waiting,
                "max_tokens_limit": limit, "context_length": engine.context_length}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus(request: Request):
        check_auth(request)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [_model_card(engine)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        check_auth(request)
        if model_id != engine.name:
            raise protocol.ModelNotFound(f"the model {model_id!r} does not exist; this server serves "
                                         f"{engine.name!r}")
        return _model_card(engine)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        check_auth(request)
        req = protocol.parse_chat(await read_json(request), engine.name, default_max_tokens, limit)
        tool_format = engine.prompt.tool_format
        # Tools go into the prompt where the template can write them; with tool_choice "none" and a template that
        # cannot, the model just answers.
        tools = req.tools.tools if req.tools.tools and (req.tools.active or tool_format) else None
        opening = reply_opening(req.tools, tool_format)
        # tokenizing a long history takes a while: off the event loop, so other streams keep flowing
        ids = await asyncio.to_thread(engine.encode_chat, req.messages, req.params, req.truncate, tools, opening)
        rid = protocol.new_id("chatcmpl")
        if req.stream:
            def chunk(text, finish=None):
                return protocol.chat_chunk(rid, engine.name, {"content": text} if text else {}, finish)

            first = protocol.chat_chunk(rid, engine.name, {"role": "assistant", "content": ""})
            watch = CallWatch(req.tools, tool_format, opening) if req.tools.active and tool_format else None
            lease = await watch_disconnect(request, slots.acquire())
            events = stream_events(ids, req, chunk, first, "chat.completion.chunk", rid, started, watch)
            return _sse_response(events, lease)
        result = await watch_disconnect(request, generate(ids, req.params, started))
        content, calls = split_reply(opening + result.text, req.tools, tool_format)
        return protocol.chat_response(rid, engine.name, result, content, calls)

    @app.post("/v1/completions")
    async def completions(request: Request):
        started = time.perf_counter()
        check_auth(request)
        req = protocol.parse_completion(await read_json(request), engine.name, default_max_tokens, limit)
        ids = await asyncio.to_thread(engine.encode_text, req.prompt, req.params)
        rid = protocol.new_id("cmpl")
        if req.stream:
            def chunk(text, finish=None):
                return protocol.completion_chunk(rid, engine.name, text, finish)

            lease = await watch_disconnect(request, slots.acquire())
            events = stream_events(ids, req, chunk, None, "text_completion", rid, started)
            return _sse_response(events, lease)
        result = await watch_disconnect(request, generate(ids, req.params, started))
        return protocol.completion_response(rid, engine.name, result)

    async def generate(ids: list[int], params: SamplingParams, started: float):
        lease = await slots.acquire()
        try:
            result = await engine.agenerate(ids, params)
        except RuntimeError as exc:  # the generation failed (the engine goes on): this request alone gets a 500
            log.error("%s", exc)
            raise ApiError(500, str(exc), "server_error") from None
        finally:
            lease.release()
        metrics.prompt_tokens += result.prompt_tokens
        metrics.completion_tokens += result.completion_tokens
        metrics.latency.observe(time.perf_counter() - started)
        return result

    async def stream_events(ids, req, chunk, first, obj, rid, started, watch=None) -> AsyncIterator[bytes]:
        """The SSE events of one generation; with a CallWatch, text that may be a tool call is held back and, if it
        is one, sent as OpenAI's tool-call deltas with finish_reason "tool_calls"."""
        tokens, first_seen = 0, False
        try:
            if first is not None:
                yield protocol.sse(first)
            async for delta in engine.astream(ids, req.params):
                tokens = delta.completion_tokens
                if not first_seen:
                    first_seen = True
                    metrics.time_to_first_token.observe(time.perf_counter() - started)
                if delta.error:
                    log.error("generation failed: %s", delta.error)
                    metrics.server_errors += 1  # after the 200: counted here, as the status cannot say it
                    yield protocol.sse(protocol.error_body(f"generation failed: {delta.error}", "server_error"))
                    break
                text = watch.feed(delta.text) if watch is not None and delta.text else delta.text
                finish = delta.finish_reason
                if finish and watch is not None:
                    rest, calls = watch.finish()
                    text += rest
                    if calls:
                        if text:
                            yield protocol.sse(chunk(text))
                        for part in tool_call_deltas(calls):
                            yield protocol.sse(protocol.chat_chunk(rid, engine.name, part))
                        text, finish = "", "tool_calls"
                if text:
                    yield protocol.sse(chunk(text))
                if finish:
                    yield protocol.sse(chunk("", finish))
            if req.include_usage:
                yield protocol.sse(protocol.usage_chunk(rid, engine.name, obj, len(ids), tokens))
            yield protocol.sse("[DONE]")
            metrics.latency.observe(time.perf_counter() - started)
        except (asyncio.CancelledError, GeneratorExit):
            metrics.disconnects += 1
            raise
        finally:
            metrics.prompt_tokens += len(ids)
            metrics.completion_tokens += tokens

    async def watch_disconnect(request: Request, work):
        """Run ``work``; if the client disconnects first, cancel it, which frees its slot (or its place in line)."""
        task, handed_over = asyncio.ensure_future(work), False
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.2)
                if done:
                    handed_over = True
                    return task.result()
                if await request.is_disconnected():
                    metrics.disconnects += 1
                    raise ApiError(499, "the client closed the connection")
        finally:
            if not task.done():
                task.cancel()
            elif not handed_over and not task.cancelled() and task.exception() is None \
                    and isinstance(task.result(), Lease):
                task.result().release()  # a slot that came just as the client left: nobody will use it

    return app


def _model_card(engine: Engine) -> dict:
    return {"id": engine.name, "object": "model", "created": 0, "owned_by": "zhllama",
            "context_length": engine.context_length}


class _LeasedStream(StreamingResponse):
    """A stream that gives its slot back when the response ends, however it ends (even before its first byte)."""

    def __init__(self, events: AsyncIterator[bytes], lease: Lease, **kwargs):
        super().__init__(events, **kwargs)
        self.lease = lease

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.lease.release()


def _sse_response(events: AsyncIterator[bytes], lease: Lease) -> StreamingResponse:
    # no-cache and no proxy buffering: every token must reach the client as it is made
    return _LeasedStream(events, lease, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
