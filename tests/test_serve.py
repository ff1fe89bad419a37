"""``lucidlm serve``: the official openai client against it, /v1/explain against ``llm.explain``,
bad inputs with their status codes (and the server stays up), disconnects, the bounded queue, and
requests from several threads at once."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import subprocess
import sys
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e '.[test]')")
httpx = pytest.importorskip("httpx", reason="httpx is a test dependency (pip install -e '.[test]')")

from cli_probe import probe
from serve_util import running_server, wait_idle

from lucidlm import LLM
from lucidlm.serve.worker import Busy, ModelWorker

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    return LLM.load(tiny_lm_dir)


@pytest.fixture(scope="module")
def url(tiny):
    with running_server(tiny, max_body_bytes=64 * 1024) as base:
        yield base


@pytest.fixture(scope="module")
def model_id(url):
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def real():
    """The embedded SmolLM2-135M-Instruct: its greedy text is worth comparing."""
    return LLM.load()


@pytest.fixture(scope="module")
def real_client(real):
    with running_server(real, api_key="sk-test") as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0)


def post(url: str, path: str, body) -> httpx.Response:
    if isinstance(body, (str, bytes)):
        return httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"})
    return httpx.post(f"{url}{path}", json=body, timeout=60)


# ----------------------------------------------------------------------------- the openai client
def test_openai_client_chat_equals_llm_chat(real, real_client):
    model = real_client.models.list().data[0].id
    reply = real_client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0)
    expected = real.chat(CHAT, max_new_tokens=12)
    assert reply.choices[0].message.content == expected
    assert "Paris" in expected
    assert reply.choices[0].message.role == "assistant"
    prompt_tokens = len(real.tokenizer.encode_chat(CHAT, add_generation_prompt=True))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens


def test_openai_client_completion_and_stream_equal_llm_generate(real, real_client):
    model = real_client.models.list().data[0].id
    expected = real.generate(PROMPT, max_new_tokens=10)
    whole = real_client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 10
    stream = real_client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected


def test_openai_client_chat_stream_with_usage_and_stop(real, real_client):
    model = real_client.models.list().data[0].id
    expected = real.chat(CHAT, max_new_tokens=12, stop=["is"])
    chunks = list(real_client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=12, temperature=0, stop=["is"], stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop" if "is" in real.chat(CHAT, max_new_tokens=12) else "length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_openai_client_errors_are_typed(real_client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        real_client.chat.completions.create(model="gpt-4o", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        real_client.chat.completions.create(model=real_client.models.list().data[0].id, messages=CHAT,
                                            temperature=-0.5)
    wrong = real_client.with_options(api_key="sk-wrong")
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


# ----------------------------------------------------------------------------- sampling fields
def test_seed_makes_sampling_reproducible_and_top_p_one_token_is_greedy(url, model_id, tiny):
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.5, "seed": 7}
    a, b = (post(url, "/v1/completions", body).json()["choices"][0]["text"] for _ in range(2))
    assert a == b
    other = post(url, "/v1/completions", body | {"seed": 8}).json()["choices"][0]["text"]
    assert other != a  # a random model at temperature 1.5: twelve equal draws would be a bug
    nucleus = post(url, "/v1/completions", body | {"top_p": 1e-6}).json()["choices"][0]["text"]
    assert nucleus == tiny.generate(PROMPT, max_new_tokens=12)  # only the top token survives


def test_return_token_ids_align_with_text(url, model_id, tiny):
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "return_token_ids": True}
    choice = post(url, "/v1/completions", body).json()["choices"][0]
    assert choice["prompt_token_ids"] == tiny.tokenizer.encode(PROMPT)
    assert tiny.tokenizer.decode(choice["token_ids"]) == choice["text"]
    assert len(choice["tokens"]) == len(choice["token_ids"]) == 6
    with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    streamed = [t for e in events for t in e["choices"][0].get("token_ids", []) if e["choices"]]
    assert streamed == choice["token_ids"]
    assert events[0]["choices"][0]["prompt_token_ids"] == choice["prompt_token_ids"]


# ----------------------------------------------------------------------------- /v1/explain
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp", "inputxgrad"])
def test_explain_endpoint_equals_llm_explain(url, tiny, method):
    answer = post(url, "/v1/explain", {"prompt": PROMPT, "method": method}).json()
    expected = tiny.explain(PROMPT, method=method)
    assert answer["tokens"] == expected.tokens and answer["token_ids"] == expected.token_ids
    assert answer["target_ids"] == expected.target_ids and answer["target"] == expected.target
    assert torch.equal(torch.tensor(answer["relevance"]), expected.relevance)
    assert answer["target_logit"] == expected.target_logit


def test_explain_endpoint_ids_contrast_layers_and_kv_policy(url, tiny, model_id):
    ids = tiny.tokenizer.encode("One two three four five six seven eight nine ten")
    answer = post(url, "/v1/explain", {"model": model_id, "input_ids": ids, "target": 42, "contrast": 7,
                                       "method": "cp-lrp", "layers": True}).json()
    expected = tiny.explain(ids, target=(42, 7), method="cp-lrp", layers="all")
    assert torch.equal(torch.tensor(answer["relevance"]), expected.relevance)
    assert set(answer["layers"]) == set(expected.layers)
    for key, value in expected.layers.items():
        assert torch.equal(torch.tensor(answer["layers"][key]), value)
    cached = post(url, "/v1/explain", {"input_ids": ids, "kv_cache": "window", "cache_tokens": 4}).json()
    expected = tiny.explain(ids, kv_cache="window", cache_tokens=4)
    assert cached["evicted"] == expected.evicted.tolist() and sum(cached["evicted"]) == len(ids) - 5
    assert torch.equal(torch.tensor(cached["relevance"]), expected.relevance)


def test_explain_endpoint_conversation_and_reply(url, tiny):
    answer = post(url, "/v1/explain", {"messages": CHAT, "reply": " Paris is", "method": "attnlrp"}).json()
    ids = tiny.tokenizer.encode_chat(CHAT, add_generation_prompt=True)
    expected = tiny.explain(ids, target=" Paris is")
    assert answer["token_ids"] == ids and answer["target_ids"] == expected.target_ids
    assert torch.equal(torch.tensor(answer["relevance"]), expected.relevance)


# ----------------------------------------------------------------------------- bad inputs
BAD = [
    ("/v1/completions", '{"model": "x", "prompt": ', 400, "not valid JSON"),
    ("/v1/completions", "[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "does not exist"),
    ("/v1/completions", {"model": "{m}", "prompt": "a", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": "{m}", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "{m}", "prompt": "a", "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {"model": "{m}", "prompt": "a", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "{m}", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "{m}", "prompt": "a", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "{m}", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "{m}"}, 400, "prompt"),
    ("/v1/completions", {"model": "{m}", "prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, 400, "stop"),
    ("/v1/completions", {"model": "{m}", "prompt": "word " * 300}, 400, "context length of 256"),
    ("/v1/chat/completions", {"model": "{m}", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "{m}", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": "{m}", "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("/v1/chat/completions", {"model": "{m}", "messages": [{"role": "user", "content": "hi " * 300}]}, 400,
     "context length of 256"),
    ("/v1/explain", {"prompt": "a", "method": "saliency"}, 400, "attnlrp"),
    ("/v1/explain", {"prompt": "a", "input_ids": [1]}, 400, "exactly one"),
    ("/v1/explain", {"input_ids": [1, 10 ** 7]}, 400, "not a token id"),
    ("/v1/explain", {"input_ids": [1, 2], "kv_cache": "lru"}, 400, "lru"),
    ("/v1/explain", {"input_ids": [1, 2], "target": 10 ** 7}, 400, "10000000"),
    ("/v1/explain", {"prompt": "a", "reply": "b"}, 400, "messages"),
    ("/v1/explain", {"prompt": "word " * 300}, 400, "context length of 256"),
]


@pytest.mark.parametrize("path, body, status, message", BAD, ids=[f"{p}:{m}" for p, _, _, m in BAD])
def test_bad_request_gets_status_and_message_and_server_stays_up(url, model_id, path, body, status, message):
    if isinstance(body, dict):
        body = json.loads(json.dumps(body).replace("{m}", model_id))
    response = post(url, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"], error
    assert httpx.get(f"{url}/health").json()["status"] == "ready"


def test_body_over_the_size_limit_gets_413(url, model_id):
    response = post(url, "/v1/completions", {"model": model_id, "prompt": "x" * 70_000})
    assert response.status_code == 413 and "65536 bytes" in response.json()["error"]["message"]


def test_api_key_is_required_when_set(tiny):
    with running_server(tiny, api_key="sk-right") as base:
        assert httpx.get(f"{base}/v1/models").status_code == 401
        wrong = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer sk-wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer sk-right"}).status_code == 200
        assert httpx.get(f"{base}/health").status_code == 200  # health checks need no key


def test_public_bind_without_key_is_refused_before_loading(tmp_path):
    """The refusal comes before the model loads: nothing under --model is opened, neither torch nor
    the server's FastAPI is imported (tmp_path is no checkpoint: loading it would fail differently)."""
    result, stderr = probe("serve", "--host", "0.0.0.0", "--model", tmp_path, watched=tmp_path,
                           unset=("LUCIDLM_API_KEY",))
    assert result["status"] == 2 and "--api-key" in stderr
    assert result["opened"] == [] and result["heavy"] == []


# ----------------------------------------------------------------------------- slots and queue
class ModelGate:
    """A forward pre-hook for the model behind a test server: counts its forwards, paces them (50 ms
    each: a 200-token job outlasts any disconnect by far), and holds them while :meth:`held` is open."""

    def __init__(self) -> None:
        self.forwards = 0  # written by the server's one model thread only
        self.entered = threading.Event()  # a forward began (cleared by held())
        self._open = threading.Event()
        self._open.set()

    def __call__(self, *_) -> None:
        self.forwards += 1
        self.entered.set()
        if not self._open.wait(timeout=600):
            raise RuntimeError("the test never let the model go on")
        time.sleep(0.05)

    @contextlib.contextmanager
    def held(self):
        """Forwards wait at their start until the block ends."""
        self.entered.clear()
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()


@pytest.fixture(scope="module")
def slow(tiny_lm_dir):
    """A server with room for one request (one sequence in the batch, none waiting), whose model's
    forwards a :class:`ModelGate` watches."""
    llm = LLM.load(tiny_lm_dir)
    gate = ModelGate()
    llm.model.register_forward_pre_hook(gate)
    with running_server(llm, max_queue=0, max_batch=1) as base:
        yield base, httpx.get(f"{base}/v1/models").json()["data"][0]["id"], gate


def test_disconnect_mid_stream_frees_the_slot(slow):
    url, model, gate = slow
    body = {"model": model, "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True,
            "return_token_ids": True}
    before = gate.forwards
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the stream has begun; now hang up
    health = wait_idle(url, timeout=600)  # a guard against a hang, not a time limit: 200 tokens end too
    assert health["running"] == 0 and health["queued"] == 0
    stopped_after = gate.forwards - before
    assert stopped_after < 100  # 200 tokens take 200 forwards: the job stopped early
    short = post(url, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 2})
    assert short.status_code == 200  # the single slot is free again
    assert gate.forwards - before - stopped_after >= 2  # the count sees every token (two more here)


def test_full_queue_gets_503_and_recovers(slow):
    """A request that finds the only slot taken is answered 503 while the first one still runs."""
    url, model, gate = slow
    body = {"model": model, "prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with gate.held():
            first = pool.submit(post, url, "/v1/completions", body)
            assert gate.entered.wait(timeout=600), "the first request never reached the model"
            assert httpx.get(f"{url}/health").json()["running"] == 1
            busy = post(url, "/v1/completions", body)
            assert busy.status_code == 503 and "busy" in busy.json()["error"]["message"]
            assert not first.done()  # the refusal did not wait for the running request
        assert first.result().status_code == 200
    assert post(url, "/v1/completions", body | {"max_tokens": 2}).status_code == 200


def test_worker_refuses_beyond_its_queue():
    import asyncio

    async def scenario():
        worker = ModelWorker(max_queue=0)  # the running job, nothing waiting
        started, gate = threading.Event(), threading.Event()

        def job():
            started.set()
            gate.wait()
            return "first"

        running = asyncio.ensure_future(worker.run(job))
        assert await asyncio.to_thread(started.wait, 600)  # the job runs on the model thread
        stats = worker.stats()
        assert (stats["running"], stats["queued"], stats["max_queue"]) == (1, 0, 0)
        with pytest.raises(Busy):
            await worker.run(lambda: None)
        assert not running.done()
        gate.set()
        assert await running == "first"
        assert await worker.run(lambda: 42) == 42 and worker.stats()["running"] == 0
        worker.shutdown()

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- concurrency
def _jobs(llm):
    ids = llm.tokenizer.encode("A quick brown fox jumps over the lazy dog")
    return [
        lambda: llm.explain(ids, method="attnlrp", layers="all"),
        lambda: llm.explain(ids, target=(5, 6), method="cp-lrp", layers=[0]),
        lambda: llm.explain(ids, method="inputxgrad"),
        lambda: llm.explain(ids, kv_cache="h2o", cache_tokens=4, method="cp-lrp"),
        lambda: llm.generate("Once upon a time", max_new_tokens=12),
        lambda: llm.generate("Once upon a time", max_new_tokens=12, temperature=1.0, seed=3),
        lambda: llm.chat(CHAT, max_new_tokens=8),
    ]


def _same(a, b) -> bool:
    return a == b if isinstance(a, str) else a.to_dict() == b.to_dict()


def test_explaining_and_generating_from_several_threads_at_once(tiny):
    """Each explanation's mode (a ContextVar), latent hooks and caches stay in its own thread:
    every result equals the one computed alone."""
    jobs = _jobs(tiny)
    alone = [job() for job in jobs]
    start = threading.Barrier(len(jobs) * 2)

    def run(i: int):
        start.wait()
        return [jobs[i % len(jobs)]() for _ in range(3)]

    with concurrent.futures.ThreadPoolExecutor(len(jobs) * 2) as pool:
        results = list(pool.map(run, range(len(jobs) * 2)))
    for i, repeats in enumerate(results):
        for result in repeats:
            assert _same(result, alone[i % len(jobs)]), f"job {i % len(jobs)} differs when run beside others"


def test_concurrent_http_requests_each_get_their_own_answer(url, model_id, tiny):
    requests = [("/v1/explain", {"prompt": PROMPT, "method": m}) for m in ("attnlrp", "cp-lrp", "inputxgrad")]
    requests += [("/v1/completions", {"model": model_id, "prompt": p, "max_tokens": 8, "temperature": 0})
                 for p in ("One", "Two", "Three")]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda r: post(url, *r).json(), requests * 2))
    for (path, body), answer in zip(requests * 2, answers):
        if path == "/v1/explain":
            assert answer["relevance"] == tiny.explain(PROMPT, method=body["method"]).relevance.tolist()
        else:
            assert answer["choices"][0]["text"] == tiny.generate(body["prompt"], max_new_tokens=8)


# ----------------------------------------------------------------------------- lucidlm view
def test_view_writes_the_viewer_page_for_a_saved_explanation(tiny, tmp_path):
    saved = tiny.explain(PROMPT).save_json(tmp_path / "e.json")
    done = subprocess.run([sys.executable, "-m", "lucidlm", "view", str(saved), "--no-open"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "e.html").read_text()
    assert 'id="lucidlm-data"' in page and "http://" not in page.replace("http://www.w3.org", "")
    embedded = page.split('id="lucidlm-data">', 1)[1].split("</script>", 1)[0].replace("<\\/", "</")
    assert json.loads(embedded.replace("\\u003c", "<")) == json.loads(saved.read_text())


@pytest.mark.parametrize("content, message", [("{not json", "not a saved explanation"),
                                              ('{"type": "Nope"}', "expected one of")])
def test_view_refuses_a_file_that_is_not_an_explanation(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    done = subprocess.run([sys.executable, "-m", "lucidlm", "view", str(bad), "--no-open"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and str(bad) in done.stderr
    assert not (tmp_path / "bad.html").exists()


# ----------------------------------------------------------------------------- lucidlm bench serve
def test_bench_serve_prints_a_table_with_no_failures(tiny_lm_dir):
    done = subprocess.run([sys.executable, "-m", "lucidlm", "bench", "serve", "--model", str(tiny_lm_dir),
                           "--clients", "1,3", "--seconds", "1", "--max-tokens", "4"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r[0].strip() for r in rows[1:]] == ["1", "3"]
    for row in rows[1:]:
        assert int(row[1]) >= 1 and int(row[2]) == 0  # requests served, none failed
    batch = [float(r[-1]) for r in rows[1:]]  # mean sequences per decode step, from the server's /metrics
    assert batch[0] == 1.0 and 1.0 <= batch[1] <= 3.0
