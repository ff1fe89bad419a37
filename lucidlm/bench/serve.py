"""``lucidlm bench serve``: a loopback load test of ``lucidlm serve``.

The server starts in a child process (``python -m lucidlm serve`` on a free loopback port). Then,
for each client count N, N clients stream chat completions back to back for T seconds. Per row:
requests finished, requests/s, time to first token (p50/p99), generated tokens/s, the mean number
of sequences per decode step (continuous batching: read from the server's ``/metrics``, the
``lucidlm_step_batch_size`` histogram's sum and count over the row), and failed requests (a
non-200 answer, a broken stream, or a stream without ``[DONE]``).

The clients use the standard library's ``http.client``: the bench needs nothing the server does not.

>>> print(format_table([dict(clients=4, requests=20, failed=0, seconds=10.0, rps=2.0, ttft_p50=0.41,
...                          ttft_p99=1.9, tokens_per_s=31.5, batch=3.62)]))
| clients | requests | failed | req/s | TTFT p50 s | TTFT p99 s | tokens/s | batch |
|---:|---:|---:|---:|---:|---:|---:|---:|
| 4 | 20 | 0 | 2.00 | 0.410 | 1.900 | 31.5 | 3.62 |
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

from .args import add_serve as add_arguments  # noqa: F401  (lucidlm bench serve's options)

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What does a compiler do?",
             "Why is the sky blue?", "Give me a synonym for 'happy'.", "How many legs does a spider have?"]


def run(args) -> int:
    from . import emit, prepare_model, progress

    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    prepare_model(args.model)  # a GGUF converts here, with progress, not silently in the server
    port = _free_port()
    command = [sys.executable, "-m", "lucidlm", "serve", "--port", str(port), "--dtype", args.dtype,
               "--max-batch", str(args.max_batch), "--max-queue", str(max(counts))]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = []
    try:
        print("lucidlm bench serve: starting the server (loading the model)", file=sys.stderr, flush=True)
        model = _wait_ready(port, server)
        emit(f"lucidlm serve on 127.0.0.1, model {model}, {args.dtype}, {args.max_tokens}-token chat replies, "
             f"{args.seconds:g} s per row, {os.cpu_count()} CPUs")
        for line in format_table([]).splitlines():  # the header now, each row as it is measured
            emit(line)
        with progress(args.seconds * len(counts), "bench serve", unit="s",
                      bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}") as bar:
            for n in counts:
                bar.set_postfix_str(f"{n} client{'s' if n != 1 else ''}")
                rows.append(measure(port, model, n, args.seconds, args.max_tokens, bar=bar))
                emit(format_row(rows[-1]))
    except RuntimeError as exc:
        print(f"lucidlm bench serve: {exc}")
        return 1
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


def measure(port: int, model: str, clients: int, seconds: float, max_tokens: int, bar=None) -> dict:
    """``clients`` threads streaming requests back to back for ``seconds`` (``bar``: a tqdm bar
    counting seconds, advanced while they run)."""
    results: list[dict] = []
    lock = threading.Lock()
    steps_before = decode_steps(port)
    start = time.perf_counter()
    deadline = start + seconds

    def client(i: int) -> None:
        k = 0
        while time.perf_counter() < deadline:
            result = stream_once(port, model, QUESTIONS[(i + k) % len(QUESTIONS)], max_tokens)
            with lock:
                results.append(result)
            k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    shown = 0.0
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)
            if bar is not None:
                step = min(seconds, time.perf_counter() - start) - shown
                bar.update(step)
                shown += step
    if bar is not None:
        bar.update(seconds - shown)
    elapsed = time.perf_counter() - start
    (total, steps), (total_before, steps_before) = decode_steps(port), steps_before
    ok = [r for r in results if r["ok"]]
    ttft = sorted(r["ttft"] for r in ok)
    return dict(clients=clients, requests=len(ok), failed=len(results) - len(ok), seconds=elapsed,
                rps=len(ok) / elapsed, ttft_p50=_quantile(ttft, 0.5), ttft_p99=_quantile(ttft, 0.99),
                tokens_per_s=sum(r["tokens"] for r in ok) / elapsed,
                batch=(total - total_before) / (steps - steps_before) if steps > steps_before else float("nan"))


def decode_steps(port: int) -> tuple[float, float]:
    """(sequences summed over decode steps, decode steps) so far: the server's batch-size
    histogram, from ``/metrics`` (Prometheus text)."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    found = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
             if s.name in ("lucidlm_step_batch_size_sum", "lucidlm_step_batch_size_count")}
    return found.get("lucidlm_step_batch_size_sum", 0.0), found.get("lucidlm_step_batch_size_count", 0.0)


def stream_once(port: int, model: str, question: str, max_tokens: int) -> dict:
    """One streaming chat completion: ``ok``, time to the first content token, tokens received."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True, "return_token_ids": True})
    started = time.perf_counter()
    ttft, tokens, done = None, 0, False
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return {"ok": False, "status": response.status}
        for raw in response:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                new = sum(len(c.get("token_ids", [])) for c in chunk.get("choices", []))
                if new and ttft is None:
                    ttft = time.perf_counter() - started
                tokens += new
    except (OSError, http.client.HTTPException, json.JSONDecodeError):
        return {"ok": False}
    finally:
        conn.close()
    return {"ok": done and ttft is not None, "ttft": ttft, "tokens": tokens}


def format_table(rows: list[dict]) -> str:
    lines = ["| clients | requests | failed | req/s | TTFT p50 s | TTFT p99 s | tokens/s | batch |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(lines + [format_row(r) for r in rows])


def format_row(r: dict) -> str:
    """One row of :func:`format_table`."""
    return (f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['rps']:.2f} | "
            f"{r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {r['tokens_per_s']:.1f} | {r['batch']:.2f} |")


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1] if q < 1 else values[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, server: subprocess.Popen, timeout: float = 300) -> str:
    """The served model's id, once ``/health`` says ``"ready"`` (while the model loads it answers
    503 ``"loading"``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {(server.stderr.read() or '').strip().splitlines()[-1:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            health = json.loads(conn.getresponse().read())
            conn.close()
            if health.get("status") == "ready":
                return health["model"]
            time.sleep(0.2)
        except (OSError, http.client.HTTPException, ValueError):
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /health within {timeout:g} s")
