"""Explanations under a KV-cache policy attribute only to the tokens the cache still holds."""

import pytest
import torch

import lucidlm
from lucidlm.errors import ExplainError
from lucidlm.explain.cached import explain_cached

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
def test_evicted_tokens_get_no_relevance_and_sum_is_conserved(llama64, policy):
    e = explain_cached(llama64, None, PROMPT, target=11, method="cp-lrp", kv_cache=policy, cache_tokens=6)
    assert e.evicted.any() and not e.evicted[-1]
    assert torch.all(e.relevance[e.evicted] == 0)
    # the decomposition is exact: what the cached step computed, spread over what it still sees
    assert e.relevance.double().sum().item() == pytest.approx(e.target_logit, rel=1e-4)


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


def test_llm_explain_routes_kv_cache(llama64, tmp_path):
    llm = lucidlm.LLM(llama64)
    e = llm.explain(PROMPT, kv_cache="window", cache_tokens=4)
    assert e.evicted is not None and int(e.evicted.sum()) == len(PROMPT) - 5
