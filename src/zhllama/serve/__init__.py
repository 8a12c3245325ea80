"""The OpenAI-compatible HTTP server with its web chat page (``zhllama serve``)."""

from __future__ import annotations

import socket
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass

from zhllama.serve.app import ServeConfig, check_config, create_app
from zhllama.serve.http import uvicorn_options

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def run_server(config: ServeConfig) -> None:
    """Load the model, then serve until Ctrl-C."""
    import uvicorn

    check_config(config)  # before the model loads: a bad flag should not cost a minute of loading
    if config.host not in LOCAL_HOSTS and not config.api_keys:
        print(f"warning: serving on {config.host} without --api-key: anyone who can reach this port can use it",
              file=sys.stderr)
    from zhllama.infer import load_engine

    engine = load_engine(config.model_dir, config.template, backend=config.backend, device=config.device,
                         name=config.name, max_tokens_limit=config.max_tokens_limit,
                         max_concurrency=config.max_concurrency, quantize=config.quantize, rope=config.rope,
                         rope_factor=config.rope_factor)
    app = create_app(engine, config)
    print(f"zhllama: serving {engine.name} at http://{config.host}:{config.port}/ (API under /v1)", flush=True)
    try:
        uvicorn.run(app, host=config.host, port=config.port, timeout_graceful_shutdown=3, **_options(config))
    finally:
        engine.close()


@dataclass
class BackgroundServer:
    """A server running in a thread of this process (the demo and the tests use it)."""

    url: str
    app: object
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_in_thread(engine, config: ServeConfig | None = None) -> BackgroundServer:
    """Serve an already loaded engine on a free localhost port (``config.port`` 0) until ``stop()``."""
    import uvicorn

    config = config or ServeConfig(port=0)
    if config.port == 0:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            config.port = sock.getsockname()[1]
    app = create_app(engine, config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, **_options(config)))
    thread = threading.Thread(target=server.run, daemon=True, name="zhllama-server")
    thread.start()
    url = f"http://{config.host}:{config.port}"
    for _ in range(400):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return BackgroundServer(url, app, server, thread)
        except OSError:
            time.sleep(0.05)
    server.should_exit = True
    raise RuntimeError(f"the server at {url} did not start")


def _options(config: ServeConfig) -> dict:
    return uvicorn_options(config.header_timeout, config.max_connections)


__all__ = ["BackgroundServer", "ServeConfig", "create_app", "run_server", "serve_in_thread"]
