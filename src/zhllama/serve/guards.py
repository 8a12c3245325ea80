"""The ASGI layer in front of the routes: what every request passes before any route sees it.

- Counting: every response by endpoint and status, for ``/metrics``.
- A last catch: an exception no route handled becomes a 500 in OpenAI's error shape, counted, and logged with its
  traceback for the operator (the client gets one line). Without it Starlette answers from outside this layer,
  re-raises, and the 500 goes uncounted.
- Browsers: a page on another origin can POST ``text/plain`` to a local server without any preflight, and with DNS
  rebinding it can read the replies. So a POST must be ``application/json``, its ``Origin`` (when a browser sends
  one) must be this server's own or listed with ``--allow-origin``, and a server bound to loopback answers only
  requests whose ``Host`` is a loopback name or address. The web page at ``/`` is same-origin and passes all three.
- Connections over ``--max-connections`` (flagged by ``serve.http``) get 503.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from urllib.parse import urlsplit

from zhllama.serve import protocol
from zhllama.serve.metrics import Metrics

log = logging.getLogger("zhllama.serve")

KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}
LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}
OVER_LIMIT = "zhllama.over_connection_limit"  # the flag serve.http puts into the scope's state


def is_loopback(host: str) -> bool:
    """``127.0.0.1``, ``::1``, ``localhost`` and the like (a name or address, without a port)."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8000`` gives ``::1``)."""
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


class Guard:
    """ASGI middleware: counts, catches, and refuses what browsers and overload bring (see the module doc)."""

    def __init__(self, app, metrics: Metrics, bind_host: str, allow_origins: tuple[str, ...]):
        self.app, self.metrics = app, metrics
        self.loopback_only = is_loopback(bind_host)
        self.allow_origins = {o.rstrip("/").lower() for o in allow_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_PATHS else "other"
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                self.metrics.requests[(endpoint, status)] += 1
                if status >= 500:
                    self.metrics.server_errors += 1
            await send(message)

        refusal = self.refusal(scope)
        if refusal is not None:
            status, message, headers = refusal
            return await _send_error(counting_send, status, message, headers)
        try:
            await self.app(scope, receive, counting_send)
        except Exception as exc:
            log.exception("internal error on %s", path)
            if started:  # the status line is gone: count it and end the connection
                self.metrics.server_errors += 1
                return
            await _send_error(counting_send, 500, f"internal error: {type(exc).__name__}", (), "server_error")

    def refusal(self, scope) -> tuple[int, str, tuple] | None:
        """(status, message, extra headers) for a request refused before routing, or None."""
        if (scope.get("state") or {}).get(OVER_LIMIT):
            return 503, "the server has too many open connections (--max-connections); retry later", \
                ((b"retry-after", b"1"), (b"connection", b"close"))
        headers = {}
        for key, value in scope.get("headers", ()):
            headers.setdefault(key.lower(), value.decode("latin-1"))
        host = headers.get(b"host", "")
        if self.loopback_only and not is_loopback(split_host(host)):
            return 403, (f"Host {host!r} is not a loopback name or address; a server bound to loopback answers "
                         "only 127.0.0.1, ::1 and localhost (this protects it from DNS rebinding)"), ()
        if scope.get("method") != "POST":
            return None
        origin = headers.get(b"origin")
        if origin is not None and not self.origin_allowed(origin, host):
            return 403, (f"Origin {origin!r} may not use this server; start it with --allow-origin {origin} to "
                         "let pages from there call it"), ()
        content_type = headers.get(b"content-type", "").partition(";")[0].strip().lower()
        if content_type != "application/json":
            return 415, f"Content-Type must be application/json, got {content_type or 'none'!r}", ()
        return None

    def origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        if origin in self.allow_origins or "*" in self.allow_origins:
            return True
        # The server's own origin: the page at / fetching its own API sends an Origin naming the Host it loaded.
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc == host.lower()


async def _send_error(send, status: int, message: str, headers, type_: str = "invalid_request_error") -> None:
    body = json.dumps(protocol.error_body(message, type_)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
