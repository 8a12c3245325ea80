"""The HTTP connection layer under the app: a header read timeout and a cap on open connections.

uvicorn has neither. Its keep-alive timer stops at the first byte of a request, so a client that sends half a
request line and then nothing held the connection for as long as it liked; and every such connection was kept. Both
live below ASGI (an app only sees a request once its headers are complete), so they are a small subclass of
uvicorn's h11 protocol. The body timeout is the app's (``app.read_json``), where the answer can be a 408.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from zhllama.serve.guards import OVER_LIMIT


def guarded_protocol(header_timeout: float, max_connections: int) -> type:
    """An h11 protocol class that closes a connection whose request headers take longer than ``header_timeout``
    seconds (from connecting, or from the end of its previous response), and that flags each request on a
    connection beyond ``max_connections`` open ones, which the app then answers with 503."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self.app_state = {**self.app_state, OVER_LIMIT: True}
            self._header_timer = None
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            # IDLE: the next request's headers have not all arrived (a request in progress is SEND_BODY or DONE)
            idle = self.cycle is None or self.cycle.response_complete
            if idle and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_options(header_timeout: float, max_connections: int) -> dict:
    """Keyword arguments for ``uvicorn.run`` or ``uvicorn.Config``."""
    return {"log_level": "warning", "http": guarded_protocol(header_timeout, max_connections)}
