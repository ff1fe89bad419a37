"""Running ``lucidlm serve`` as an operator does: sampling defaults (the checkpoint's
``generation_config.json``, else greedy), the port taken before the model loads, one-line startup
errors with exit 2, ``/health`` loading then ready, ``/metrics`` (read with prometheus_client's own
parser), a SIGTERM drain that loses no in-flight reply, and ``--adapter`` in ``/v1/models``.
Clients are the official ``openai`` client (httpx where the raw SSE lines matter)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e '.[test]')")
httpx = pytest.importorskip("httpx", reason="httpx is a test dependency (pip install -e '.[test]')")
parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client is a dependency of the server")

from cli_probe import probe
from serve_util import free_port, running_server

from lucidlm import LLM

PROMPT = "The capital of France is"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    return LLM.load(tiny_lm_dir)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)


# ----------------------------------------------------------------------------- sampling defaults
def test_request_without_temperature_is_greedy_and_models_says_so(tiny):
    with running_server(tiny) as url:
        c = client(url)
        card = c.models.list().data[0]
        assert card.sampling_defaults == {"temperature": 0.0, "top_p": 1.0, "top_k": None,
                                          "source": "server default (greedy)"}
        reply = c.completions.create(model=card.id, prompt=PROMPT, max_tokens=12)
    assert reply.choices[0].text == tiny.generate(PROMPT, max_new_tokens=12)


def test_generation_config_sets_the_defaults(tiny_lm_dir, tmp_path):
    """A checkpoint whose generation_config.json samples: a request without temperature/top_p draws
    as LLM.generate does with those values and the same seed."""
    folder = tmp_path / "sampled"
    shutil.copytree(tiny_lm_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config |= {"do_sample": True, "temperature": 1.3, "top_p": 0.9}
    (folder / "generation_config.json").write_text(json.dumps(config))
    llm = LLM.load(folder)
    with running_server(llm) as url:
        c = client(url)
        card = c.models.list().data[0]
        assert card.sampling_defaults == {"temperature": 1.3, "top_p": 0.9, "top_k": None,
                                          "source": "generation_config.json"}
        texts = [c.completions.create(model=card.id, prompt=PROMPT, max_tokens=12, seed=s).choices[0].text
                 for s in (3, 4)]
        explicit = c.completions.create(model=card.id, prompt=PROMPT, max_tokens=12, seed=3, temperature=0)
    assert texts == [llm.generate(PROMPT, max_new_tokens=12, temperature=1.3, top_p=0.9, seed=s) for s in (3, 4)]
    assert texts[0] != texts[1]  # it really samples: two seeds, twelve tokens at 1.3
    assert explicit.choices[0].text == llm.generate(PROMPT, max_new_tokens=12)  # the request's own value wins


@pytest.mark.slow
def test_readme_snippet_answers_paris():
    """The README's client snippet as written (no temperature) on the embedded model."""
    with running_server(LLM.load()) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="-")
        model = c.models.list().data[0].id
        reply = c.chat.completions.create(model=model, messages=[
            {"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content


# ----------------------------------------------------------------------------- startup
def test_port_in_use_is_one_line_and_exit_2_before_loading(tmp_path):
    """tmp_path is no checkpoint: a load would open it (and import torch). Neither happens."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result, stderr = probe("serve", "--model", tmp_path, "--port", port, watched=tmp_path)
    assert result["status"] == 2
    assert stderr.splitlines() == [stderr.strip()] and stderr.startswith(f"lucidlm: error: --port {port}: ")
    assert "in use" in stderr
    assert result["opened"] == [] and "torch" not in result["heavy"]


def test_a_load_that_fails_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    done = subprocess.run([sys.executable, "-m", "lucidlm", "serve", "--model", str(tmp_path), "--port",
                           str(free_port())], capture_output=True, text=True, timeout=300, env=_env())
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("lucidlm: error: ") and "config.json" in lines[0], done.stderr
    assert "serving" not in done.stderr


def test_health_says_loading_then_ready(tiny):
    """The port answers at once: /health is 503 "loading" (and /v1/* 503) until the model is there."""
    import uvicorn

    from lucidlm.serve import create_app
    from lucidlm.serve.startup import DrainingServer, LoadingApp

    gate, ready = threading.Event(), []

    def load():
        gate.wait(60)
        return tiny

    loading = LoadingApp(load, create_app, on_failure=lambda: None, on_ready=ready.append)
    port = free_port()
    server = DrainingServer(uvicorn.Config(loading, host="127.0.0.1", port=port, log_level="warning"),
                            on_exit=loading.close_admission)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: server.started)
        health = httpx.get(f"{url}/health")
        assert (health.status_code, health.json()) == (503, {"status": "loading"})
        with pytest.raises(openai.InternalServerError, match="loading"):
            client(url).completions.create(model="x", prompt=PROMPT, max_tokens=2)
        gate.set()
        _wait(lambda: httpx.get(f"{url}/health").status_code == 200)
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ready" and health["model"] == tiny.name and "queued" in health
        assert len(ready) == 1
        assert client(url).completions.create(model=tiny.name, prompt=PROMPT, max_tokens=4).choices[0].text == \
            tiny.generate(PROMPT, max_new_tokens=4)
    finally:
        gate.set()
        server.should_exit = True
        thread.join(timeout=30)


# ----------------------------------------------------------------------------- metrics
def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, read by prometheus_client's parser: {(name, labels): value}."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_exactly_what_requests_did(tiny):
    with running_server(tiny) as url:
        c = client(url)
        before = scrape(url)
        a = c.completions.create(model=tiny.name, prompt=PROMPT, max_tokens=5)
        b = c.chat.completions.create(model=tiny.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=7)
        chunks = list(c.completions.create(model=tiny.name, prompt="Once upon", max_tokens=6, stream=True,
                                           stream_options={"include_usage": True}))
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=5)
        after = scrape(url)
    streamed = chunks[-1].usage
    usages = [a.usage, b.usage, streamed]

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("lucidlm_requests_total", endpoint="/v1/completions", status="200") == 2
    assert moved("lucidlm_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert moved("lucidlm_requests_total", endpoint="/v1/completions", status="404") == 1
    assert moved("lucidlm_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert moved("lucidlm_generated_tokens_total") == sum(u.completion_tokens for u in usages)
    assert moved("lucidlm_request_latency_seconds_count") == 3
    assert moved("lucidlm_time_to_first_token_seconds_count") == 3
    assert moved("lucidlm_step_batch_size_count") >= 1  # the streamed reply's steps (the worker's hook)
    assert after[("lucidlm_queued_requests", ())] == 0 and after[("lucidlm_running_requests", ())] == 0
    assert moved("lucidlm_requests_total", endpoint="/metrics", status="200") == 1  # the first scrape


def test_each_app_has_its_own_registry(tiny):
    with running_server(tiny) as one, running_server(tiny) as two:
        client(one).completions.create(model=tiny.name, prompt=PROMPT, max_tokens=2)
        counts = [scrape(u).get(("lucidlm_requests_total", (("endpoint", "/v1/completions"), ("status", "200"))),
                                0.0) for u in (one, two)]
    assert counts == [1.0, 0.0]


# ----------------------------------------------------------------------------- the CLI server
def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _wait(condition, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout  # a guard against a hang, not a timing assertion
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def _ready(url: str, process: subprocess.Popen) -> bool:
    assert process.poll() is None, process.stderr.read()
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/health").status_code == 200
    return False


@contextlib.contextmanager
def cli_server(*argv: str):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lucidlm", "serve", "--port", str(port), *argv],
                               stderr=subprocess.PIPE, text=True, env=_env())
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _ready(url, process))
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def _stream_raw(url: str, model: str, lines: list[str]) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 120, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as response:
        lines.extend(line for line in response.iter_lines() if line)


def test_sigterm_drains_in_flight_streams_and_exits_0(tiny_lm_dir):
    with cli_server("--model", str(tiny_lm_dir), "--max-queue", "8") as (url, process):
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        replies: list[list[str]] = [[] for _ in range(3)]
        threads = [threading.Thread(target=_stream_raw, args=(url, model, r)) for r in replies]
        for t in threads:
            t.start()
        _wait(lambda: (lambda h: h["running"] + h["queued"])(httpx.get(f"{url}/health").json()) == 3)
        process.send_signal(signal.SIGTERM)  # all three admitted, none finished
        for t in threads:
            t.join(timeout=300)
        assert process.wait(timeout=120) == 0
        stderr = process.stderr.read()
    for lines in replies:
        assert lines[-1] == "data: [DONE]", lines[-3:]
        finish = json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
        assert finish in ("stop", "length")
    assert "Traceback" not in stderr


def test_adapter_is_served_and_listed(tiny_lm_dir, tmp_path):
    from diff_util import save_opened_adapter

    adapter = save_opened_adapter(tiny_lm_dir, tmp_path / "my-adapter")
    tuned = LLM.load(tiny_lm_dir, adapter=adapter)
    with cli_server("--model", str(tiny_lm_dir), "--adapter", str(adapter)) as (url, process):
        c = client(url)
        cards = c.models.list().data
        served, listed = cards
        texts = [c.completions.create(model=m, prompt=PROMPT, max_tokens=10).choices[0].text
                 for m in (served.id, listed.id)]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    assert listed.id == "my-adapter" and listed.parent == served.id and listed.root == str(adapter)
    assert served.parent is None and served.adapter == {"id": "my-adapter", "path": str(adapter)}
    want = tuned.generate(PROMPT, max_new_tokens=10)
    assert texts == [want, want]
    assert want != LLM.load(tiny_lm_dir).generate(PROMPT, max_new_tokens=10)  # the adapter changes the text
