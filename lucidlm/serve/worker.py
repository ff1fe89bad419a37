"""One model, many requests: a single worker thread runs every model call in turn.

The model is serialised rather than batched: each request owns the whole model while it runs, so
no KV cache or explanation mode is ever shared (the mode lives in a ``ContextVar`` anyway, see
:mod:`lucidlm.model.rules`). Admission is bounded: a request that finds ``max_queue`` others
running or waiting is refused at once (503) instead of piling up.

Streaming jobs push their items to the event loop as they come and check a cancel flag between
tokens, so a client that disconnects frees the worker at the next token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
_END = object()


class Busy(Exception):
    """The queue is full: the client should retry later."""


class ModelWorker:
    def __init__(self, max_queue: int = 16, on_step: Callable[[int], None] | None = None) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue}: expected at least 1")
        self.max_queue = max_queue
        self.on_step = on_step  # called with the batch size of each decode step (here always 1)
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lucidlm-model")
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._running = 0

    # ---- bookkeeping ------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"running": self._running, "queued": self._admitted - self._running,
                    "max_queue": self.max_queue, "batch": self._running, "max_batch": 1}

    def _admit(self) -> None:
        with self._lock:
            if self._closed:
                raise Busy("the server is shutting down; retry on another replica")
            if self._admitted >= self.max_queue:
                raise Busy(f"the server is busy ({self._admitted} requests running or queued, "
                           f"limit {self.max_queue}); retry shortly")
            self._admitted += 1

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def _job(self, fn: Callable[[], T]) -> Callable[[], T]:
        def run() -> T:
            with self._lock:
                self._running += 1
            try:
                return fn()
            finally:
                with self._lock:
                    self._running -= 1
                    self._admitted -= 1

        return run

    # ---- running model calls ----------------------------------------------------------------
    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model thread; raises :class:`Busy` when the queue is full."""
        self._admit()
        try:
            future = self._executor.submit(self._job(fn))
        except BaseException:
            self._release()
            raise
        return await asyncio.wrap_future(future)

    def stream(self, make: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
        """Items of the iterator ``make()`` (built and consumed on the model thread) as they come.

        Admission happens here, before the response starts (so :class:`Busy` can still become a
        503). Closing the returned iterator early (a client disconnect) stops the job at its next
        item and frees the worker.
        """
        self._admit()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def produce() -> None:
            try:
                for item in make():
                    if cancel.is_set():
                        break
                    if self.on_step is not None:
                        self.on_step(1)
                    put(item)
            except BaseException as exc:  # handed to the consumer, who raises it
                put(exc)
            finally:
                put(_END)

        try:
            self._executor.submit(self._job(produce))
        except BaseException:
            self._release()
            raise
        return self._consume(queue, cancel)

    @staticmethod
    async def _consume(queue: asyncio.Queue, cancel: threading.Event) -> AsyncIterator[Any]:
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # normal end, error, or the client went away: the producer stops at its next item
            cancel.set()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def close_admission(self) -> None:
        """From now on every new request gets :class:`Busy` (503): the server is draining."""
        with self._lock:
            self._closed = True

    def in_flight(self) -> int:
        """Requests admitted and not finished."""
        with self._lock:
            return self._admitted
