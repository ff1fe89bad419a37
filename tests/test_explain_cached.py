"""Explanations under a KV-cache policy: a replay of what each query saw, explained to the inputs.
Equal to the dense explanation when nothing was evicted; logits equal to the cached run when
something was."""

import pytest
import torch

import lucidlm
from lucidlm.errors import ExplainError
from lucidlm.cache.base import KVCache, VisibleKeys
from lucidlm.explain.cached import cached_run, explain_cached
from lucidlm.explain.explainer import explain

PROMPT = [5, 9, 17, 23, 4, 31, 40, 8, 12, 55, 61, 7, 3, 19, 27, 33]


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    from families import build_hf_model

    directory = tmp_path_factory.mktemp("llama-cached")
    build_hf_model("llama3").save_pretrained(directory)
    return lucidlm.LLM.load(directory, dtype=torch.float64).model


def test_dense_cache_explains_the_full_model_and_conserves(llama64):
    e = explain_cached(llama64, None, PROMPT, target=11, method="cp-lrp", kv_cache="dense")
    with torch.no_grad():
        logit = llama64(torch.tensor([PROMPT]))[0, -1, 11].item()
    assert e.target_logit == pytest.approx(logit, rel=1e-6)  # the cached step predicts like the model
    assert e.relevance.double().sum().item() == pytest.approx(logit, rel=1e-4)
    assert not e.evicted.any()


def test_dense_budget_smaller_than_prompt_is_an_error(llama64):
    from lucidlm.errors import CacheError

    with pytest.raises(CacheError, match="dense cache full"):
        explain_cached(llama64, None, PROMPT, kv_cache="dense", cache_tokens=8)


@pytest.mark.parametrize("policy", ["window", "sink", "h2o"])
def test_evicted_tokens_sum_is_conserved_and_relevance_reaches_past_evictions(llama64, policy):
    e = explain_cached(llama64, None, PROMPT, target=11, method="cp-lrp", kv_cache=policy, cache_tokens=6)
    assert e.evicted.any() and not e.evicted[-1]
    # the replay is a forward of the whole prompt: CP-LRP's decomposition stays exact
    assert e.relevance.double().sum().item() == pytest.approx(e.target_logit, rel=1e-6)
    # evicted tokens still matter through the tokens that saw them before they went
    assert e.relevance[e.evicted].abs().max() > 1e-6


POLICIES = ["window", "sink", "h2o", "window+int8", "h2o+int4"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp", "inputxgrad"])
def test_nothing_evicted_equals_the_dense_explanation(llama64, policy, method):
    dense = explain(llama64, None, PROMPT, target=11, method=method)
    cached = explain_cached(llama64, None, PROMPT, target=11, method=method, kv_cache=policy,
                            cache_tokens=len(PROMPT), chunk_size=5)
    assert not cached.evicted.any()
    torch.testing.assert_close(cached.relevance, dense.relevance, rtol=1e-5, atol=1e-7)
    assert cached.target_logit == pytest.approx(dense.target_logit, rel=1e-9)


def test_nothing_evicted_equals_dense_in_float32(tiny_lm_dir):
    llm = lucidlm.LLM.load(tiny_lm_dir)
    prompt = "The capital of France is Paris, and the capital of Italy is"
    dense = llm.explain(prompt)
    for policy in ("h2o", "sink", "window+int8"):
        cached = llm.explain(prompt, kv_cache=policy, cache_tokens=64)
        torch.testing.assert_close(cached.relevance, dense.relevance, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy, budget, chunk", [("window", 4, 256), ("window", 6, 3), ("sink", 6, 4),
                                                   ("h2o", 5, 1), ("h2o", 8, 4), ("sink", 7, 2)])
def test_replay_logits_equal_the_cached_run(llama64, policy, budget, chunk):
    seen, logits = cached_run(llama64, PROMPT, policy, budget, chunk)
    assert not all(s.tril().all() for s in seen)  # something was evicted
    positions = torch.arange(len(PROMPT))[None]
    with torch.no_grad():
        replayed = llama64(torch.tensor([PROMPT]), positions=positions, cache=KVCache([VisibleKeys(s) for s in seen]),
                           last_only=True)[0, -1]
    torch.testing.assert_close(replayed, logits, rtol=1e-9, atol=1e-9)
    e = explain_cached(llama64, None, PROMPT, target=11, kv_cache=policy, cache_tokens=budget, chunk_size=chunk)
    assert e.target_logit == pytest.approx(float(logits[11]), rel=1e-9)


@pytest.mark.parametrize("quant, bound", [("int8", 0.02), ("int4", 0.3)])
def test_replay_of_quantised_buffers_is_within_their_error(llama64, quant, bound):
    """The replay uses exact keys and values; the cached run read them back quantised."""
    seen, quantised = cached_run(llama64, PROMPT, f"h2o+{quant}", 6, 4)
    _, exact = cached_run(llama64, PROMPT, "h2o", 6, 4)
    positions = torch.arange(len(PROMPT))[None]
    with torch.no_grad():
        replayed = llama64(torch.tensor([PROMPT]), positions=positions, cache=KVCache([VisibleKeys(s) for s in seen]),
                           last_only=True)[0, -1]
    error = (replayed - quantised).abs().max().item()
    assert error < bound * quantised.abs().max().item()
    assert error > 0  # the buffers really were quantised


def test_window_keeps_exactly_the_most_recent_tokens(llama64):
    e = explain_cached(llama64, None, PROMPT, kv_cache="window", cache_tokens=4)
    n = len(PROMPT)
    # prefill of all but the last token leaves the 4 before it; the last token is the query
    assert e.evicted.tolist() == [True] * (n - 5) + [False] * 5


def test_sink_keeps_the_first_tokens(llama64):
    e = explain_cached(llama64, None, PROMPT, kv_cache="sink", cache_tokens=6)
    assert e.evicted[:4].tolist() == [False] * 4 and e.evicted[4:-3].all() and not e.evicted[-3:].any()


def test_attnlrp_is_finite_and_rejects_continuations(llama64):
    e = explain_cached(llama64, None, PROMPT, method="attnlrp", kv_cache="h2o+int8", cache_tokens=8)
    assert torch.isfinite(e.relevance).all()
    with pytest.raises(ExplainError, match="continuation"):
        explain_cached(llama64, None, PROMPT, target=[3, 4], kv_cache="window", cache_tokens=8)


def test_llm_explain_routes_kv_cache_and_layers(llama64, tmp_path):
    llm = lucidlm.LLM(llama64)
    e = llm.explain(PROMPT, kv_cache="window", cache_tokens=4, layers="all")
    assert e.evicted is not None and int(e.evicted.sum()) == len(PROMPT) - 5
    assert set(e.layers) == {f"layers.{i}.{part}" for i in range(len(llama64.layers)) for part in ("attn", "mlp")}
