"""``/metrics``: the server's Prometheus metrics, in a registry of the app's own (two apps in one
process never share a counter).

Counters: requests by endpoint and status, prompt and generated tokens. Gauges read from the
worker at scrape time: requests running, queued, and the current decode batch. Histograms: the
batch size of each decode step (the worker's ``on_step``), time to first token and request
latency (measured in the app; for a whole, non-streamed reply the first token reaches the client
with the reply, so its time to first token is its latency).

>>> from prometheus_client.parser import text_string_to_metric_families
>>> m = ServerMetrics(lambda: {"running": 1, "queued": 2, "batch": 1})
>>> m.request("/v1/completions", 200); m.reply(prompt_tokens=5, generated_tokens=3, first_token_s=0.1, latency_s=0.2)
>>> families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
>>> families["lucidlm_generated_tokens"].samples[0].value, families["lucidlm_queued_requests"].samples[0].value
(3.0, 2.0)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

#: the endpoints counted by name; any other path is counted as "other" (bounded label values)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/explain", "/v1/models", "/health", "/metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: when the current request arrived (set by :class:`CountRequests`; read where a reply is measured)
REQUEST_START: ContextVar[float | None] = ContextVar("lucidlm_request_start", default=None)
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class _WorkerGauges:
    """A collector that asks the worker at scrape time, so a gauge is never stale."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats

    GAUGES = (("running", "lucidlm_running_requests", "requests being generated now"),
              ("queued", "lucidlm_queued_requests", "requests admitted and waiting"),
              ("batch", "lucidlm_batch_size", "sequences in the current decode batch"))

    def describe(self) -> Iterator[GaugeMetricFamily]:  # the names, without asking the worker
        for _key, name, doc in self.GAUGES:
            yield GaugeMetricFamily(name, doc)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.stats()
        for key, name, doc in self.GAUGES:
            yield GaugeMetricFamily(name, doc, value=float(stats.get(key, 0)))


class ServerMetrics:
    """One app's metrics; ``stats``: the worker's ``stats()`` (read at each scrape)."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("lucidlm_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("lucidlm_prompt_tokens", "prompt tokens of answered requests", registry=r)
        self.generated_tokens = Counter("lucidlm_generated_tokens", "tokens generated", registry=r)
        self.step_batch = Histogram("lucidlm_step_batch_size", "sequences in each decode step", buckets=_BATCH,
                                    registry=r)
        self.first_token = Histogram("lucidlm_time_to_first_token_seconds", "request start to first token",
                                     buckets=_SECONDS, registry=r)
        self.latency = Histogram("lucidlm_request_latency_seconds", "request start to last token",
                                 buckets=_SECONDS, registry=r)
        r.register(_WorkerGauges(stats))

    def request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def reply(self, prompt_tokens: int, generated_tokens: int, first_token_s: float | None,
              latency_s: float) -> None:
        """A completion finished (or its client left): what it used and how long it took."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated_tokens)
        if first_token_s is not None:
            self.first_token.observe(first_token_s)
        self.latency.observe(latency_s)

    def step(self, batch_size: int) -> None:
        """The worker's ``on_step`` hook: one decode step over ``batch_size`` sequences."""
        self.step_batch.observe(batch_size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """Pure ASGI middleware: count each HTTP request by endpoint and final status."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]
        REQUEST_START.set(time.perf_counter())

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.request(scope["path"], status[0])
