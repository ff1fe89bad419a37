"""Continuous batching in the server's worker (lucidlm.serve.worker / batching): concurrent requests
decode in one batch, and each request's tokens equal its solo run — the oracle is
``generate_ids`` / ``LLM.generate`` on the request alone (and ``LLM.explain`` for explanations).

The worker-level tests use a random tiny model (no tokenizer); the server tests go through the
official ``openai`` client against the tiny Llama checkpoint (and, marked slow, the embedded model).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest
import torch

from lucidlm import GPT, LLM, Config
from lucidlm.generate import Sampling, generate_ids
from lucidlm.serve.batching import BatchEngine, GenRequest
from lucidlm.serve.worker import Busy, ModelWorker

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e '.[test]')")
httpx = pytest.importorskip("httpx", reason="httpx is a test dependency (pip install -e '.[test]')")

from serve_util import running_server, wait_idle  # noqa: E402

PROMPTS = [[1, 5, 9], [7, 3, 3, 8, 2, 4, 11], [4], [9, 9, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12], [2, 6],
           [30, 31, 32, 33, 34], [100, 3, 200, 5], [17, 16, 15, 14, 13, 12, 11, 10, 9]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(Config.from_name("tiny-llama")).eval()


def solo(model, request: GenRequest, **cache) -> list[int]:
    """The oracle: the request alone through generate_ids (what LLM.generate runs)."""
    return [step[0] for step in generate_ids(model, [request.ids], request.max_new, request.sampling, **cache)]


class Steps(list):
    """``on_step``: the batch size of every decode step, in order."""

    def __call__(self, size: int) -> None:
        self.append(size)


def run_all(worker: ModelWorker, requests: list[GenRequest]) -> list[list[int]]:
    async def one(request):
        return [t async for t in worker.generate(request)]

    async def every():
        return await asyncio.gather(*(one(r) for r in requests))

    return asyncio.run(every())


def make_worker(model, steps: Steps, max_batch: int = 8, **cache) -> ModelWorker:
    return ModelWorker(max_queue=32, max_batch=max_batch, engine=BatchEngine(model, (), **cache), on_step=steps)


# ----------------------------------------------------------------------------- the worker
def test_greedy_batch_equals_each_request_alone(model):
    steps = Steps()
    worker = make_worker(model, steps)
    requests = [GenRequest(p, 6 + i) for i, p in enumerate(PROMPTS)]
    assert run_all(worker, requests) == [solo(model, r) for r in requests]
    assert max(steps) == 8  # all eight in one decode forward
    assert worker.stats()["running"] == 0 and worker.in_flight() == 0
    worker.shutdown()


def test_mixed_sampling_each_follows_its_own_seed(model):
    settings = [Sampling(), Sampling(1.0, seed=1), Sampling(0.8, top_p=0.9, seed=2), Sampling(),
                Sampling(1.2, top_k=20, seed=3), Sampling(1.0, seed=1)]
    requests = [GenRequest(p, 10, s) for p, s in zip(PROMPTS, settings)]
    steps = Steps()
    worker = make_worker(model, steps)
    got = run_all(worker, requests)
    expected = [solo(model, r) for r in requests]
    assert got == expected
    assert expected[1] != solo(model, GenRequest(PROMPTS[1], 10))  # it sampled: not the greedy tokens
    assert max(steps) == len(requests)
    worker.shutdown()


class Pacer(Steps):
    """``on_step`` that also holds the model thread after the decode steps numbered in ``stops``
    until the test lets it go on: what the batch holds at those points is then certain."""

    def __init__(self, *stops: int) -> None:
        super().__init__()
        self.reached = {n: threading.Event() for n in stops}
        self.resume = {n: threading.Event() for n in stops}

    def __call__(self, size: int) -> None:
        self.append(size)
        if len(self) in self.reached:
            self.reached[len(self)].set()
            assert self.resume[len(self)].wait(600), "the test never let the model go on"

    async def at(self, n: int) -> None:
        assert await asyncio.to_thread(self.reached[n].wait, 600)


def test_a_request_joins_mid_batch_and_one_leaves_cancelled(model):
    steps = Pacer(5, 8)
    worker = make_worker(model, steps)
    first, late, cancelled = GenRequest(PROMPTS[1], 40), GenRequest(PROMPTS[3], 12), GenRequest(PROMPTS[0], 40)

    async def scenario():
        stream_first, stream_cancelled = worker.generate(first), worker.generate(cancelled)
        await steps.at(5)
        got_cancelled = [await anext(stream_cancelled) for _ in range(3)]
        await stream_cancelled.aclose()  # the client went away: its slot frees at the next step
        steps.resume[5].set()
        await steps.at(8)
        stream_late = worker.generate(late)  # joins while the first one is decoding
        steps.resume[8].set()
        got_late = [t async for t in stream_late]
        return [t async for t in stream_first], got_late, got_cancelled

    got_first, got_late, got_cancelled = asyncio.run(scenario())
    assert got_first == solo(model, first) and got_late == solo(model, late)
    assert got_cancelled == solo(model, cancelled)[:3]
    # two decoding; the cancelled one gone at once; the late one joined the running batch
    assert steps[:9] == [2, 2, 2, 2, 2, 1, 1, 1, 2]
    assert len(steps) == 39  # the first one's 40 tokens: 39 decode steps, none for the cancelled one's rest
    assert worker.in_flight() == 0
    worker.shutdown()


def test_max_batch_bounds_the_decode_batch(model):
    steps = Steps()
    worker = make_worker(model, steps, max_batch=2)
    requests = [GenRequest(p, 5) for p in PROMPTS[:4]]
    assert run_all(worker, requests) == [solo(model, r) for r in requests]
    assert max(steps) == 2 and worker.stats()["max_batch"] == 2
    worker.shutdown()


@pytest.mark.parametrize("policy", ["window", "h2o", "sink+int8"])
def test_kv_policy_applies_per_sequence(model, policy):
    """Prompts longer than the budget: each sequence evicts on its own, as it does alone."""
    steps = Steps()
    worker = make_worker(model, steps, kv_cache=policy, cache_tokens=6)
    requests = [GenRequest(p, 12) for p in PROMPTS[1:7]]
    assert run_all(worker, requests) == [solo(model, r, kv_cache=policy, cache_tokens=6) for r in requests]
    assert max(steps) == len(requests)
    worker.shutdown()


def test_length_dependent_rope_runs_each_request_alone_interleaved():
    """Dynamic NTK rotates by the sequence's length, which one shared decode step cannot give each
    row: such a model runs every request through generate_ids alone, one token each per step."""
    import dataclasses

    torch.manual_seed(0)
    config = dataclasses.replace(Config.from_name("tiny-llama"), rope_scaling={
        "rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 8})
    dynamic = GPT(config).eval()
    steps = Steps()
    worker = make_worker(dynamic, steps)
    requests = [GenRequest(p, 10) for p in PROMPTS[:3]]
    assert worker.engine.solo
    assert run_all(worker, requests) == [solo(dynamic, r) for r in requests]
    worker.shutdown()


def test_full_queue_and_closed_admission_are_busy(model):
    worker = ModelWorker(max_queue=1, max_batch=1, engine=BatchEngine(model))
    gate = threading.Event()

    async def scenario():
        held = asyncio.ensure_future(worker.run(gate.wait))
        while worker.stats()["running"] == 0:
            await asyncio.sleep(0.01)
        first = worker.generate(GenRequest([1, 2], 3))  # the batch's one slot
        second = worker.generate(GenRequest([1, 2], 3))  # waits: the queue's one place
        with pytest.raises(Busy, match="busy"):
            worker.generate(GenRequest([1, 2], 3))
        gate.set()
        await held
        assert [len([t async for t in it]) for it in (first, second)] == [3, 3]
        worker.close_admission()
        with pytest.raises(Busy, match="shutting down"):
            worker.generate(GenRequest([1, 2], 3))

    asyncio.run(scenario())
    assert worker.in_flight() == 0
    worker.shutdown()


def test_grouped_jobs_waiting_together_run_as_one_call(model):
    worker = ModelWorker(max_queue=8)
    gate, calls = threading.Event(), []

    def double(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [2 * i for i in items]

    async def scenario():
        held = asyncio.ensure_future(worker.run(gate.wait))
        while worker.stats()["running"] == 0:
            await asyncio.sleep(0.01)
        jobs = [asyncio.ensure_future(worker.run_grouped("k", i, double)) for i in (1, 2, 3)]
        while worker.stats()["queued"] < 3:
            await asyncio.sleep(0.01)
        gate.set()
        await held
        results = await asyncio.gather(*jobs)
        bad = await asyncio.gather(worker.run_grouped("k", "bad", double), return_exceptions=True)
        return results, bad

    results, bad = asyncio.run(scenario())
    assert results == [2, 4, 6] and calls[0] == [1, 2, 3]
    assert isinstance(bad[0], ValueError)
    worker.shutdown()


# ----------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    return LLM.load(tiny_lm_dir)


TEXTS = ["The capital of France is", "Once upon a time", "A", "def add(a, b):", "Roses are red, violets",
         "1, 2, 3, 4,", "The quick brown fox jumps over the lazy dog and then", "Hello"]


def test_openai_client_concurrent_greedy_equals_llm_generate(tiny):
    with running_server(tiny, max_batch=8) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        name = client.models.list().data[0].id

        def ask(i: int) -> str:
            return client.completions.create(model=name, prompt=TEXTS[i], max_tokens=8 + i,
                                             temperature=0).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(ask, range(8)))
        assert wait_idle(url)["running"] == 0
    assert texts == [tiny.generate(t, max_new_tokens=8 + i) for i, t in enumerate(TEXTS)]


def test_server_kv_policy_per_request_equals_llm_generate(tiny):
    with running_server(tiny, kv_cache="window", cache_tokens=4) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        name = client.models.list().data[0].id

        def ask(text: str) -> str:
            stream = client.completions.create(model=name, prompt=text, max_tokens=10, temperature=0, stream=True)
            return "".join(chunk.choices[0].text for chunk in stream)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(ask, TEXTS[:4]))
    assert texts == [tiny.generate(t, max_new_tokens=10, kv_cache="window", cache_tokens=4) for t in TEXTS[:4]]


def test_a_stop_string_ends_the_sequence_and_frees_its_slot(tiny):
    """The consumer finds the stop string in the text and closes its token stream: the sequence
    leaves the batch then, not after max_tokens (the forwards are paced so the model cannot run
    far ahead of the reader)."""
    prompt = "Once upon a time"
    greedy = tiny.generate(prompt, max_new_tokens=12)
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]
    assert stop.strip(), f"the tiny model's text {greedy!r} has no usable stop string"
    forwards = []
    hook = tiny.model.register_forward_pre_hook(lambda *_: forwards.append(threading.Event().wait(0.02)))
    try:
        with running_server(tiny) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            answer = client.completions.create(model=tiny.name, prompt=prompt, max_tokens=200, temperature=0,
                                               stop=[stop])
            assert wait_idle(url)["running"] == 0
    finally:
        hook.remove()
    assert answer.choices[0].text == tiny.generate(prompt, max_new_tokens=200, stop=[stop])
    assert answer.choices[0].finish_reason == "stop"
    ids = tiny.tokenizer.encode(prompt)
    alone = list(generate_ids(tiny.model, [ids], 200, stop_ids=tiny.tokenizer.eos_ids))
    assert len(alone) > 100 and len(forwards) < 100  # it runs on without the stop string, and here it did not


def test_concurrent_explanations_run_as_one_explain_batch(tiny, monkeypatch):
    import lucidlm.explain.batch as batch

    calls, real_batch = [], batch.explain_batch

    def counted(model, tokenizer, prompts, **kwargs):
        calls.append(len(prompts))
        return real_batch(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(batch, "explain_batch", counted)
    gate = threading.Event()
    hook = tiny.model.register_forward_pre_hook(lambda *_: gate.wait(600) and None)
    try:
        with running_server(tiny) as url:
            bodies = [{"prompt": "The capital of France is"}, {"prompt": "Once upon a time", "target": " there"}]
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                held = pool.submit(httpx.post, f"{url}/v1/completions", timeout=600,
                                   json={"model": tiny.name, "prompt": "Hi", "max_tokens": 2})
                while httpx.get(f"{url}/health").json()["running"] == 0:
                    threading.Event().wait(0.01)  # the generation holds the model thread
                answers = [pool.submit(httpx.post, f"{url}/v1/explain", json=b, timeout=600) for b in bodies]
                while httpx.get(f"{url}/health").json()["queued"] < 2:
                    threading.Event().wait(0.01)
                gate.set()
                results = [a.result().json() for a in answers]
                assert held.result().status_code == 200
    finally:
        gate.set()
        hook.remove()
    assert calls == [2]
    for body, result in zip(bodies, results):
        expected = tiny.explain(tiny.tokenizer.encode(body["prompt"]), target=body.get("target"))
        assert result["target_ids"] == expected.target_ids
        assert torch.allclose(torch.tensor(result["relevance"]), torch.as_tensor(expected.relevance), atol=1e-5)


@pytest.mark.slow
def test_real_model_eight_concurrent_greedy_equal_llm_generate():
    real = LLM.load()
    with running_server(real) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

        def ask(i: int) -> str:
            return client.completions.create(model=real.name, prompt=TEXTS[i], max_tokens=12,
                                             temperature=0).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(ask, range(8)))
    assert texts == [real.generate(t, max_new_tokens=12) for t in TEXTS]
