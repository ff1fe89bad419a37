"""Targets that surprise: a text target one leading space away from the model's prediction is
named, continuations are labelled log-prob, and ids are taken as ids."""

import warnings

import pytest

from lucidlm import LLM
from lucidlm.errors import TargetHint

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm():
    return LLM.load()


def test_a_target_one_space_away_from_the_prediction_is_named(llm):
    with pytest.warns(TargetHint, match=r"' Paris' \(token 7042, logit 17.37\)") as caught:
        e = llm.explain(PROMPT, target="Paris")
    assert e.target == "Paris" and e.target_ids != [7042]  # explained as asked, not swapped silently
    assert "'Paris' is token" in str(caught[0].message)


@pytest.mark.parametrize("target", [" Paris", 7042, None, (" Paris", " Lyon")])
def test_no_hint_when_the_target_is_what_the_model_predicts_or_an_id(llm, target):
    with warnings.catch_warnings():
        warnings.simplefilter("error", TargetHint)
        e = llm.explain(PROMPT, target=target)
    if target in (7042, None, " Paris"):
        assert e.target_ids == [7042] and e.score_label == "logit"
    else:
        assert e.score_label == "logit difference"


def test_the_hint_also_holds_under_a_kv_policy(llm):
    with pytest.warns(TargetHint, match="' Paris'"):
        llm.explain(PROMPT, target="Paris", kv_cache="h2o", cache_tokens=16)


def test_a_continuation_is_labelled_log_prob(llm):
    e = llm.explain(PROMPT, target=" Paris, the city")
    assert e.score_label == "log-prob" and e.target_logit < 0
