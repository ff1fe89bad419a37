"""Starting and stopping the server: the port first, the model in the background, a drain on SIGTERM.

* :func:`~lucidlm.serve.bind_socket` (first) takes the port before anything loads, so a port in
  use is one :class:`~lucidlm.serve.ServeError` at once, not a failure after minutes of loading.
* :class:`LoadingApp` answers at once: ``/health`` is ``{"status": "loading"}`` (503) and every
  other path a 503 until the model has loaded in a background thread; then it hands every request
  to the app :func:`~lucidlm.serve.app.create_app` built (``/health``: ``"ready"``, 200). A load
  that fails stops the server, and :func:`~lucidlm.serve.serve` raises its error.
* :class:`DrainingServer` (uvicorn's server): on SIGTERM it closes admission (new requests get
  503 "shutting down"), stops listening, lets in-flight replies finish for up to the drain
  time, and returns normally (exit 0) instead of re-raising the signal.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import signal
import threading
from collections.abc import Callable
from typing import Any

import uvicorn


async def _answer(send, status: int, body: dict[str, Any]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


class LoadingApp:
    """ASGI app: 503 while ``load()`` runs (in a thread), then ``build(llm)``'s app for everything.

    ``on_ready(app)`` runs once the built app serves; ``on_failure()`` when loading failed (the
    error is kept in :attr:`error`)."""

    def __init__(self, load: Callable[[], Any], build: Callable[[Any], Any], on_failure: Callable[[], None],
                 on_ready: Callable[[Any], None] | None = None) -> None:
        self.load, self.build, self.on_failure, self.on_ready = load, build, on_failure, on_ready
        self.app: Any = None
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stack = contextlib.AsyncExitStack()
        self._task: asyncio.Task | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            return await _answer(send, 503, {"status": "loading"})
        await _answer(send, 503, {"error": {"message": "the model is still loading; retry shortly (GET /health "
                                            "says 'ready' when it serves)", "type": "server_error",
                                            "param": None, "code": "model_loading"}})

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.loop = asyncio.get_running_loop()
                self._task = asyncio.create_task(self._start())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._task is not None and not self._task.done():
                    self._task.cancel()  # the loading thread is a daemon: it dies with the process
                await self._stack.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _start(self) -> None:
        try:
            llm = await asyncio.wrap_future(_in_daemon_thread(self.load))
            app = self.build(llm)
            await self._stack.enter_async_context(app.router.lifespan_context(app))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 -- serve() raises it once the server has stopped
            self.error = exc
            self.on_failure()
            return
        self.app = app
        if self.on_ready is not None:
            self.on_ready(app)

    def close_admission(self) -> None:
        """Safe from a signal handler: the worker's lock is taken on the event loop, not here."""
        if self.loop is not None and self.app is not None:
            self.loop.call_soon_threadsafe(self.app.state.worker.close_admission)


def _in_daemon_thread(fn: Callable[[], Any]) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 -- handed to the awaiting task
            future.set_exception(exc)

    threading.Thread(target=run, name="lucidlm-load", daemon=True).start()
    return future


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with ``on_exit`` called at the first exit signal; a SIGTERM drain ends
    with a normal return (exit status 0) rather than the re-raised signal."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            self.on_exit()
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)  # uvicorn >= 0.29 re-raises them after serving
        if captured is not None:
            captured[:] = [s for s in captured if s != signal.SIGTERM]
