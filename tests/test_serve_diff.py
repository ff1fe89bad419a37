"""``lucidlm serve --model BASE --adapter DIR``: ``/v1/explain`` with ``"diff": true`` answers the same
ExplanationDiff as ``tuned.explain_diff(base, ...)`` in Python; the base loads once, lazily, on the
model thread; a server without a base answers 400 naming --adapter."""

from __future__ import annotations

import threading

import pytest
import torch

httpx = pytest.importorskip("httpx", reason="httpx is a test dependency (pip install -e '.[test]')")

from cli_probe import probe
from diff_util import save_opened_adapter
from serve_util import running_server

from lucidlm import LLM
from lucidlm.explain.diff import ExplanationDiff
from lucidlm.explain.explanation import load_dict
from lucidlm.train.lora import has_lora

PROMPT = "The capital of France is"


class Loader:
    """Loads the base checkpoint when called, and records how often and on which thread."""

    def __init__(self, directory) -> None:
        self.directory, self.threads = directory, []

    def __call__(self) -> LLM:
        self.threads.append(threading.current_thread().name)
        return LLM.load(self.directory)


@pytest.fixture(scope="module")
def adapter(tiny_lm_dir, tmp_path_factory):
    return save_opened_adapter(tiny_lm_dir, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def tuned(tiny_lm_dir, adapter):
    return LLM.load(tiny_lm_dir, adapter=adapter)


@pytest.fixture(scope="module")
def base(tiny_lm_dir):
    return LLM.load(tiny_lm_dir)


@pytest.fixture(scope="module")
def served(tuned, tiny_lm_dir):
    loader = Loader(tiny_lm_dir)
    with running_server(tuned, base=loader) as url:
        yield url, loader


def explain(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/explain", json=body, timeout=120)


def assert_same_diff(got: ExplanationDiff, want: ExplanationDiff) -> None:
    for side in ("base", "tuned"):
        g, w = getattr(got, side), getattr(want, side)
        assert (g.tokens, g.token_ids, g.target_ids, g.method, g.score_label) == \
            (w.tokens, w.token_ids, w.target_ids, w.method, w.score_label)
        assert g.target_logit == pytest.approx(w.target_logit, rel=1e-5, abs=1e-6)
        torch.testing.assert_close(g.relevance, w.relevance, rtol=1e-4, atol=1e-6)
        assert (g.layers is None) == (w.layers is None)
        if w.layers is not None:
            assert sorted(g.layers) == sorted(w.layers)
            for name in w.layers:
                torch.testing.assert_close(g.layers[name], w.layers[name], rtol=1e-4, atol=1e-6)
    assert (got.adapter_relevance is None) == (want.adapter_relevance is None)
    if want.adapter_relevance is not None:
        torch.testing.assert_close(got.adapter_relevance, want.adapter_relevance, rtol=1e-4, atol=1e-6)


def test_diff_equals_explain_diff_in_python(served, tuned, base):
    url, _ = served
    resp = explain(url, prompt=PROMPT, diff=True, method="cp-lrp", layers=True)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["object"] == "explanation.diff" and data["type"] == "ExplanationDiff"
    assert data["model"] == tuned.name
    got = load_dict(data)
    assert isinstance(got, ExplanationDiff)
    want = tuned.explain_diff(base, PROMPT, method="cp-lrp")
    assert_same_diff(got, want)
    assert got.adapter_relevance is not None and got.adapter_relevance.abs().sum() > 0  # the adapter acts
    assert got.logit_delta == pytest.approx(want.logit_delta, rel=1e-4, abs=1e-5)
    got_top, want_top = got.components("heads", top=3), want.components("heads", top=3)
    assert [name for name, _ in got_top] == [name for name, _ in want_top]
    assert [v for _, v in got_top] == pytest.approx([v for _, v in want_top], rel=1e-4, abs=1e-6)


def test_diff_of_ids_with_a_contrast_and_without_layers(served, tuned, base):
    url, _ = served
    ids = tuned.tokenizer.encode(PROMPT)
    paris, london = tuned.tokenizer.encode(" Paris")[0], tuned.tokenizer.encode(" London")[0]
    resp = explain(url, input_ids=ids, target=paris, contrast=london, diff=True, method="attnlrp")
    assert resp.status_code == 200, resp.text
    got = ExplanationDiff.from_dict(resp.json())
    assert got.tuned.score_label == "logit difference" and got.tuned.target_ids == [paris, london]
    assert got.tuned.layers is None  # layers not asked for: none recorded
    want = tuned.explain_diff(base, ids, target=(paris, london), method="attnlrp")
    want.base.layers = want.tuned.layers = None
    assert_same_diff(got, want)


def test_the_base_loads_once_lazily_on_the_model_thread(tuned, tiny_lm_dir):
    loader = Loader(tiny_lm_dir)
    with running_server(tuned, base=loader) as url:
        assert httpx.get(f"{url}/health").json()["diff"] is True
        assert explain(url, prompt=PROMPT).json()["object"] == "explanation"  # no diff: no base needed
        assert loader.threads == []
        for _ in range(2):
            assert explain(url, prompt=PROMPT, diff=True).status_code == 200
        assert len(loader.threads) == 1 and loader.threads[0].startswith("lucidlm-model")


def test_without_a_base_diff_is_a_400_naming_adapter(base):
    with running_server(base) as url:
        assert httpx.get(f"{url}/health").json()["diff"] is False
        resp = explain(url, prompt=PROMPT, diff=True)
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert "--adapter" in error["message"] and error["param"] == "diff" and error["code"] == "no_base_model"
        assert explain(url, prompt=PROMPT).status_code == 200  # the server stays up


def test_diff_with_a_kv_policy_is_a_400(served):
    url, _ = served
    resp = explain(url, prompt=PROMPT, diff=True, kv_cache="window", cache_tokens=4)
    assert resp.status_code == 400 and "kv_cache" in resp.json()["error"]["message"]
    resp = explain(url, prompt=PROMPT, diff=True, method="occlusion")  # a baseline: no rules to split by
    assert resp.status_code == 400 and "occlusion" in resp.json()["error"]["message"]


def test_serve_command_attaches_the_adapter_and_loads_the_base_without_it(monkeypatch, tiny_lm_dir, adapter):
    import lucidlm.serve
    from lucidlm.commands.serve import SERVE

    captured = {}
    monkeypatch.setattr(lucidlm.serve, "serve", lambda llm, **options: captured.update(llm=llm, **options))
    args = SERVE.parse(["--model", str(tiny_lm_dir), "--adapter", str(adapter), "--port", "8123"])
    assert SERVE.run(args) == 0
    tuned = captured["llm"]()  # serve() gets a loader: it takes the port before the model loads
    assert has_lora(tuned.model) and captured["adapter"] == str(adapter)
    base = captured["base"]()
    assert isinstance(base, LLM) and not has_lora(base.model) and base.directory == tuned.directory
    args = SERVE.parse(["--model", str(tiny_lm_dir), "--port", "8123"])
    assert SERVE.run(args) == 0 and captured["base"] is None


def test_a_missing_adapter_is_refused_before_loading(tmp_path):
    result, stderr = probe("serve", "--model", tmp_path, "--adapter", tmp_path / "nope", watched=tmp_path)
    assert result["status"] == 2 and "--adapter" in stderr and "nope" in stderr
    assert result["opened"] == [] and result["heavy"] == []
