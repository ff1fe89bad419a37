"""``lucidlm serve``: an OpenAI-compatible server with explanations, and the viewer in the browser.

* :mod:`~lucidlm.serve.app`: the FastAPI routes (``/v1/models``, ``/v1/completions``,
  ``/v1/chat/completions``, ``/v1/explain``, ``/health``, and the viewer at ``/``);
* :mod:`~lucidlm.serve.schemas`: the request bodies, validated before the model sees them;
* :mod:`~lucidlm.serve.worker`: one model thread, a bounded queue, cancellation on disconnect;
* :mod:`~lucidlm.serve.viewer`: the static page (inline JS/CSS, no network), also written by
  ``lucidlm view FILE.json`` for a saved explanation.

>>> from lucidlm import LLM                                          # doctest: +SKIP
>>> serve(LLM.load(), port=8000)                                     # doctest: +SKIP
>>> from openai import OpenAI                                         # doctest: +SKIP
>>> client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-") # doctest: +SKIP

A tuned model served with its base answers ``/v1/explain`` with ``"diff": true`` too (the base
is loaded at the first such request; ``lucidlm serve --model BASE --adapter DIR`` does this):

>>> serve(LLM.load(adapter="my-adapter/"), base=LLM.load)           # doctest: +SKIP
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from ..errors import LucidError

__all__ = ["bind_socket", "create_app", "is_loopback", "serve"]


class ServeError(LucidError, ValueError):
    """The server cannot start with these options (e.g. a public address without an API key)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine.

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("::1"), is_loopback("0.0.0.0")
    (True, True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Binding beyond loopback exposes the model to the network: it needs an API key."""
    if not is_loopback(host) and not api_key:
        raise ServeError(f"--host {host} accepts connections from other machines: pass --api-key KEY "
                         "(clients then send 'Authorization: Bearer KEY'), or bind 127.0.0.1")


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening (uvicorn serves on it later).

    >>> sock = bind_socket("127.0.0.1", 0)
    >>> bind_socket("127.0.0.1", sock.getsockname()[1])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lucidlm.serve.ServeError: --port ...: cannot listen on 127.0.0.1:... (Address already in use): another server ...
    >>> sock.close()
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no obstacle
    try:
        sock.bind((host, port))
        sock.listen(2048)  # listening at once: no other process can take the port any more
    except OSError as exc:
        sock.close()
        raise ServeError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}): another server "
                         "holds it; stop it or pick another --port" if exc.errno == errno.EADDRINUSE else
                         f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from exc
    return sock


def create_app(*args, **kwargs):
    """See :func:`lucidlm.serve.app.create_app` (imported lazily: FastAPI loads only when serving)."""
    from .app import create_app as create

    return create(*args, **kwargs)


def serve(llm, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_level: str = "info", drain_seconds: float = 30.0, on_ready=None, **options) -> None:
    """Run the server until interrupted or sent SIGTERM. ``llm``: an ``LLM``, or a function that
    loads one: the port is taken first (a port in use raises :class:`ServeError` before anything
    loads), then the model loads in the background while ``/health`` says ``"loading"``; a load
    that fails stops the server and raises its error here. On SIGTERM new requests get 503,
    in-flight replies finish for up to ``drain_seconds``, and this returns. ``on_ready(app)``:
    called once the model serves. ``options``: see :func:`create_app` (``base``: the model ``llm``
    was tuned from, or a function loading it, for ``"diff": true``)."""
    check_bind(host, api_key)  # first: a refusal imports and loads nothing
    import uvicorn

    from .startup import DrainingServer, LoadingApp

    sock = bind_socket(host, port)
    load = llm if callable(llm) and not hasattr(llm, "model") else (lambda: llm)
    holder: list = []
    loading = LoadingApp(load, lambda model: create_app(model, api_key=api_key, **options),
                         on_failure=lambda: setattr(holder[0], "should_exit", True), on_ready=on_ready)
    config = uvicorn.Config(loading, log_level=log_level, timeout_graceful_shutdown=drain_seconds)
    server = DrainingServer(config, on_exit=loading.close_admission)
    holder.append(server)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if loading.error is not None:
        raise loading.error
