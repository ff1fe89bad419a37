"""One model, many requests: a single model thread runs a continuous-batching loop.

At each step the thread (1) takes the newly admitted work, (2) runs the other jobs (explanations,
diffs: each owns the model while it runs, between two decode steps; explanations that arrived
together run as one call, see :meth:`ModelWorker.run_grouped`), (3) prefills the new generation
requests together and joins them to the batch (up to ``max_batch`` sequences; the rest wait), (4)
samples every active sequence's next token with its own settings and hands it to its request,
(5) drops the finished and the cancelled sequences at once, and (6) runs one decode forward over
the rest (:mod:`lucidlm.serve.batching`).

Admission is bounded: ``max_batch`` sequences decode together, and at most ``max_queue`` requests
wait beyond them (generation requests that find no room in the batch, and other jobs); one more is
refused at once (:class:`Busy`, a 503) instead of piling up. A consumer that stops
reading (a client disconnect, a stop string) cancels its sequence: its slot frees at the next step.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

from .batching import BatchEngine, GenRequest, Sequence

T = TypeVar("T")
_END = object()


class Busy(Exception):
    """The queue is full (or the server is shutting down): the client should retry later."""


class _Job:
    """Work other than generation: ``fn(items)`` for a group of ``items`` sharing ``key``."""

    def __init__(self, key: Hashable | None, item: Any, fn: Callable[[list[Any]], list[Any]]) -> None:
        self.key, self.item, self.fn, self.future = key, item, fn, Future()


class _Generation:
    """A generation request: what the model thread hands its consumer's event loop."""

    def __init__(self, request: GenRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request, self.loop = request, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.seq: Sequence | None = None

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class ModelWorker:
    """The model thread and its bounded admission. ``engine``: the generation engine (None: a
    worker for :meth:`run` jobs only). ``on_step(batch_size)``: called after every decode step.

    >>> import asyncio
    >>> from lucidlm import Config, GPT
    >>> from lucidlm.generate import Sampling
    >>> worker = ModelWorker(engine=BatchEngine(GPT(Config.from_name("tiny-llama")).eval()))
    >>> async def tokens():
    ...     return [t async for t in worker.generate(GenRequest([1, 2, 3], 3))]
    >>> len(asyncio.run(tokens())), worker.stats()["running"]
    (3, 0)
    >>> worker.shutdown()
    """

    def __init__(self, max_queue: int = 16, max_batch: int = 8, engine: BatchEngine | None = None,
                 on_step: Callable[[int], None] | None = None) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue}: expected at least 0 (0: no request waits)")
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: expected at least 1")
        self.max_queue, self.max_batch, self.engine, self.on_step = max_queue, max_batch, engine, on_step
        self._cond = threading.Condition()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._waiting: collections.deque[_Generation] = collections.deque()
        self._admitted = 0  # admitted and not finished: in the batch, running or waiting
        self._running_jobs = 0
        self._batch = 0
        self._closed = False  # admission closed (draining)
        self._stopped = False  # the thread should end
        self._thread = threading.Thread(target=self._loop, name="lucidlm-model", daemon=True)
        self._thread.start()

    # ---- bookkeeping ------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        with self._cond:
            # a request is counted out (admitted) just before its end is handed over, the batch
            # after the step: never report more running than admitted
            running = min(self._admitted, self._batch + self._running_jobs)
            return {"running": running, "queued": self._admitted - running, "max_queue": self.max_queue,
                    "batch": self._batch, "max_batch": self.max_batch}

    def in_flight(self) -> int:
        """Requests admitted and not finished (a drain waits for this to reach 0)."""
        with self._cond:
            return self._admitted

    def close_admission(self) -> None:
        """From now on every new request gets :class:`Busy`; admitted ones still finish."""
        with self._cond:
            self._closed = True

    def _admit(self, generation: bool = False) -> None:  # holds self._cond
        """Count one more request in, unless it would make more than ``max_queue`` wait (see
        :meth:`_waiting_with`)."""
        if self._closed:
            raise Busy("the server is shutting down")
        waiting = self._waiting_with(jobs=0, generations=0)
        if self._waiting_with(jobs=int(not generation), generations=int(generation)) > self.max_queue:
            raise Busy(f"the server is busy ({self._batch} sequences decoding, {waiting} requests waiting, "
                       f"limits --max-batch {self.max_batch}, --max-queue {self.max_queue}); retry shortly")
        self._admitted += 1

    def _waiting_with(self, jobs: int, generations: int) -> int:  # holds self._cond
        """Requests that would wait with ``jobs``/``generations`` more: generations beyond the
        batch's free room, and jobs beyond the one the model thread runs next."""
        room = self.max_batch - self._batch
        pending_jobs = len(self._jobs) + jobs
        next_job = 0 if self._running_jobs else 1
        return max(0, pending_jobs - next_job) + max(0, len(self._waiting) + generations - room)

    def _finished(self, n: int = 1) -> None:  # holds self._cond
        self._admitted -= n

    # ---- submitting -------------------------------------------------------------------------
    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model thread, between decode steps; raises :class:`Busy` when full."""
        return await self.run_grouped(None, None, lambda _items: [fn()])

    async def run_grouped(self, key: Hashable | None, item: Any, fn: Callable[[list[Any]], list[Any]]) -> Any:
        """``fn(items)[i]`` for this ``item``: jobs with the same ``key`` (not None) that are waiting
        together run as ONE call of ``fn`` over their items (one result per item, in order); a
        group whose call fails runs again one item at a time, so each request gets its own error."""
        job = _Job(key, item, fn)
        with self._cond:
            self._admit()
            self._jobs.append(job)
            self._cond.notify()
        return await asyncio.wrap_future(job.future)

    def generate(self, request: GenRequest) -> AsyncIterator[int]:
        """The request's tokens as they come (requires an ``engine``). Admission happens here,
        before any response starts, so :class:`Busy` can still become a 503; closing the returned
        iterator early cancels the sequence (its slot frees at the next step)."""
        if self.engine is None:
            raise RuntimeError("this worker has no generation engine")
        gen = _Generation(request, asyncio.get_running_loop())
        with self._cond:
            self._admit(generation=True)
            self._waiting.append(gen)
            self._cond.notify()
        return self._consume(gen)

    async def _consume(self, gen: _Generation) -> AsyncIterator[int]:
        try:
            while True:
                item = await gen.queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # normal end, error, or the consumer went away: the model thread drops it
            gen.cancelled.set()

    def shutdown(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    # ---- the model thread -------------------------------------------------------------------
    def _loop(self) -> None:
        active: list[_Generation] = []
        while True:
            with self._cond:
                while not (self._jobs or self._waiting or active or self._stopped):
                    self._cond.wait()
                if self._stopped:
                    self._fail_all(active)
                    return
                jobs, self._jobs = list(self._jobs), collections.deque()
                joining = self._take_waiting(self.max_batch - len(active))
                self._running_jobs, self._batch = len(jobs), len(active) + len(joining)
            self._run_jobs(jobs)
            active += self._join(joining)
            active = self._step(active)

    def _take_waiting(self, room: int) -> list[_Generation]:  # holds self._cond
        """Up to ``room`` waiting requests, in order; those that gave up while waiting leave now
        (even when the batch is full), freeing their place in the queue."""
        joining, kept = [], collections.deque()
        for gen in self._waiting:
            if gen.cancelled.is_set():
                self._finished()
            elif len(joining) < room:
                joining.append(gen)
            else:
                kept.append(gen)
        self._waiting = kept
        return joining

    def _run_jobs(self, jobs: list[_Job]) -> None:
        groups: dict[Any, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(id(job) if job.key is None else ("key", job.key), []).append(job)
        for group in groups.values():
            live = [job for job in group if job.future.set_running_or_notify_cancel()]  # not given up
            outcomes = self._outcomes(live) if live else []
            with self._cond:  # counted out before the answer, so a caller never sees itself running
                self._running_jobs -= len(group)
                self._finished(len(group))
            for job, (ok, value) in zip(live, outcomes):
                if ok:
                    job.future.set_result(value)
                else:
                    job.future.set_exception(value)

    @staticmethod
    def _outcomes(group: list[_Job]) -> list[tuple[bool, Any]]:
        """(True, result) or (False, exception) per job of a group run as one call."""
        try:
            results = group[0].fn([job.item for job in group])
        except Exception as exc:
            if len(group) == 1:
                return [(False, exc)]
            # one bad request must not fail the others: each alone
            return [ModelWorker._outcomes([job])[0] for job in group]
        return [(True, result) for result in results]

    def _join(self, joining: list[_Generation]) -> list[_Generation]:
        """Prefill the joining requests together; those with nothing to generate end here."""
        ready = []
        for gen in joining:
            if self.engine.max_new(gen.request) == 0:
                self._end(gen)
            else:
                ready.append(gen)
        if not ready:
            return []
        try:
            seqs = self.engine.start([g.request for g in ready])
        except Exception as exc:
            for gen in ready:
                self._end(gen, exc)
            return []
        for gen, seq in zip(ready, seqs):
            gen.seq = seq
        return ready

    def _step(self, active: list[_Generation]) -> list[_Generation]:
        """Sample and hand out one token per active sequence, drop the finished and cancelled,
        and run the decode forward for the rest."""
        active = self._drop(active, lambda g: g.cancelled.is_set())
        if not active:
            return self._set_batch(active)
        try:
            tokens = self.engine.sample([g.seq for g in active])
            for gen, token in zip(active, tokens):
                gen.put(token)
            active = self._drop(active, lambda g: g.seq.finished or g.cancelled.is_set())
            if active:
                self.engine.forward([g.seq for g in active])
                if self.on_step is not None:
                    self.on_step(len(active))
        except Exception as exc:  # a failed step fails every sequence in it (and the thread goes on)
            for gen in active:
                self._end(gen, exc)
            active = []
        return self._set_batch(active)

    def _set_batch(self, active: list[_Generation]) -> list[_Generation]:
        with self._cond:
            self._batch = len(active)
        return active

    def _drop(self, active: list[_Generation], done: Callable[[_Generation], bool]) -> list[_Generation]:
        kept = []
        for gen in active:
            if done(gen):
                self._end(gen)
            else:
                kept.append(gen)
        return kept

    def _end(self, gen: _Generation, error: BaseException | None = None) -> None:
        with self._cond:  # counted out before the end is handed over
            self._finished()
        if error is not None:
            gen.put(error)
        gen.put(_END)

    def _fail_all(self, active: list[_Generation]) -> None:  # holds self._cond
        for gen in [*active, *self._waiting]:
            gen.put(_END)
        for job in self._jobs:
            job.future.cancel()


def text_pieces(tokenizer, tokens: AsyncIterator[int], stops: list[str] | None = None) -> AsyncIterator[Any]:
    """:func:`lucidlm.api.stream_pieces` over an async stream of tokens: one
    :class:`~lucidlm.api.Piece` per token, then the held-back rest. Ends (and closes ``tokens``,
    freeing the sequence's slot) at a stop token or a stop string."""
    from ..api import stream_pieces

    pending: collections.deque[int | None] = collections.deque()

    def feed() -> Iterator[int | None]:
        while True:
            yield pending.popleft()  # exactly one token per piece asked for

    async def pieces() -> AsyncIterator[Any]:
        decode = stream_pieces(tokenizer, feed(), stops or ())
        try:
            async for token in tokens:
                pending.append(token)
                piece = next(decode, None)
                if piece is None:
                    return
                yield piece
                if piece.stopped:
                    return
            pending.append(None)
            last = next(decode, None)
            if last is not None:
                yield last
        finally:
            await tokens.aclose()

    return pieces()
