"""Run the server in a thread on a free loopback port, for the server and browser tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(llm, **options) -> Iterator[str]:
    """Serve ``llm`` (``options``: :func:`lucidlm.serve.create_app`'s) and yield its base URL."""
    import uvicorn

    from lucidlm.serve import create_app

    port = free_port()
    config = uvicorn.Config(create_app(llm, **options), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_idle(url: str, timeout: float = 10.0) -> dict:
    """Poll /health until nothing runs or waits; returns the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{url}/health").json()
        if health["running"] == 0 and health["queued"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.02)
