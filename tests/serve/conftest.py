"""A live server on a free localhost port, in a thread of the test process, over the session's tiny engine."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from zhllama.serve import ServeConfig, serve_in_thread

API_KEY = "sk-zhllama-test"


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    api_key: str | None
    app: object

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def start(engine, **settings):
    background = serve_in_thread(engine, ServeConfig(port=0, **settings))
    keys = settings.get("api_keys") or (None,)
    return LiveServer(background.url, keys[0], background.app), background


@pytest.fixture(scope="session")
def live_server(tiny_engine):
    """The server with an API key required (key: ``live_server.api_key``); max_concurrency 8, read timeouts 2 s."""
    live, background = start(tiny_engine, api_keys=(API_KEY,), max_concurrency=8, max_tokens_limit=256,
                             default_max_tokens=16, max_body_bytes=200_000, header_timeout=2.0, body_timeout=2.0)
    yield live
    background.stop()


@pytest.fixture(scope="session")
def open_server(tiny_engine):
    """The same engine served without an API key."""
    live, background = start(tiny_engine, max_concurrency=4, max_tokens_limit=256, default_max_tokens=16)
    yield live
    background.stop()
