"""explain_batch: several prompts of different lengths in one padded forward and one backward give,
row by row, the single-prompt explain() (the reference), and padding carries no relevance."""

import pytest
import torch

import lucidlm
from lucidlm import GPT, Config
from lucidlm.errors import ExplainError
from lucidlm.explain.batch import explain_batch
from lucidlm.explain.explainer import explain

PROMPTS = [[1, 17, 42, 5, 63, 8, 29, 77, 11], [3, 9], [1, 200, 7, 7, 31], [44]]
TARGETS = [None, 5, (7, 12), 250]
TOL = 1e-5


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def assert_same(batched, single) -> None:
    """Equal within TOL (relative L2 of the relevance; the target score relative to its size, at
    least 1: a log-probability near 0 is the difference of two O(1) numbers, and rounds as they do);
    the rest exactly."""
    assert rel_l2(batched.relevance, single.relevance) < TOL
    assert abs(batched.target_logit - single.target_logit) <= TOL * max(abs(single.target_logit), 1.0)
    for field in ("tokens", "token_ids", "target", "target_ids", "method", "score_label", "prompt"):
        assert getattr(batched, field) == getattr(single, field), field
    assert batched.evicted is None and single.evicted is None


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT(Config.from_name("tiny-llama")).eval()


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp", "inputxgrad"])
def test_batch_equals_single_prompts(tiny, method):
    batch = explain_batch(tiny, None, PROMPTS, TARGETS, method=method)
    assert [len(e.relevance) for e in batch] == [len(p) for p in PROMPTS]  # padding is not returned
    for prompt, target, got in zip(PROMPTS, TARGETS, batch):
        assert_same(got, explain(tiny, None, prompt, target=target, method=method))


def test_padding_takes_no_relevance(tiny):
    """CP-LRP on a bias-free model conserves exactly: each row's relevances over its own tokens
    sum to its logit, so none of it reached the padding (float64: the law holds to ~1e-7)."""
    model = GPT(Config.from_name("tiny-llama")).double().eval()
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    for e, prompt in zip(explain_batch(model, None, PROMPTS, method="cp-lrp"), PROMPTS):
        with torch.no_grad():
            logit = float(model(torch.tensor([prompt]))[0, -1, e.target_ids[0]])
        assert e.target_logit == pytest.approx(logit, rel=1e-6)
        assert e.relevance.double().sum().item() == pytest.approx(logit, rel=1e-4, abs=1e-6)


def test_a_row_does_not_depend_on_its_batch(tiny):
    alone = explain_batch(tiny, None, PROMPTS[1:2])[0]
    for others in (PROMPTS, PROMPTS[::-1]):
        assert_same(explain_batch(tiny, None, others)[others.index(PROMPTS[1])], alone)


@pytest.mark.parametrize("family", ["gpt2", "mistral", "mixtral"])  # learned positions, a window, experts
def test_other_families(family, hf_checkpoint):
    model = lucidlm.LLM.load(hf_checkpoint(family)[1]).model.eval()
    prompts = [[min(i, 95) for i in p] for p in PROMPTS]
    targets = [None, 5, (7, 12), 50]
    for prompt, target, got in zip(prompts, targets, explain_batch(model, None, prompts, targets)):
        assert_same(got, explain(model, None, prompt, target=target))


def test_fallbacks_equal_explain(tiny):
    """A continuation row, ``layers`` and ``kv_cache`` go through explain() one prompt at a time."""
    targets = [[5, 6, 7], 5, None, (7, 12)]
    batch = explain_batch(tiny, None, PROMPTS, targets)
    assert batch[0] == explain(tiny, None, PROMPTS[0], target=targets[0])  # bitwise: it ran alone
    assert batch[0].score_label == "log-prob"
    for got, prompt, target in zip(batch[1:], PROMPTS[1:], targets[1:]):
        assert_same(got, explain(tiny, None, prompt, target=target))
    with_layers = explain_batch(tiny, None, PROMPTS[:2], layers="all")
    assert with_layers == [explain(tiny, None, p, layers="all") for p in PROMPTS[:2]]
    cached = explain_batch(tiny, None, [list(range(1, 13))], kv_cache="window", cache_tokens=4)
    assert cached == [explain(tiny, None, list(range(1, 13)), kv_cache="window", cache_tokens=4)]
    assert int(cached[0].evicted.sum()) == 7


def test_bad_input(tiny):
    with pytest.raises(ExplainError, match=r"targets: expected one per prompt \(2\), got 1"):
        explain_batch(tiny, None, PROMPTS[:2], targets=[None])
    with pytest.raises(ExplainError, match="method='lime'"):
        explain_batch(tiny, None, PROMPTS[:2], method="lime")
    with pytest.raises(ExplainError, match="token id 999 is out of range"):
        explain_batch(tiny, None, PROMPTS[:2], targets=[None, 999])
    with pytest.raises(ExplainError, match="objective='prob'"):
        explain_batch(tiny, None, PROMPTS[:2], objective="prob")
    assert explain_batch(tiny, None, []) == []


def test_the_real_model(converted):
    llm = lucidlm.LLM.load(converted)
    prompts = ["The capital of France is", "One, two, three, four,", "Water boils at a temperature of 100"]
    targets = [" Paris", None, (" degrees", " percent")]
    for method in ("attnlrp", "cp-lrp", "inputxgrad"):
        batch = explain_batch(llm.model, llm.tokenizer, prompts, targets, method=method)
        for prompt, target, got in zip(prompts, targets, batch):
            assert_same(got, llm.explain(prompt, target=target, method=method))
    assert batch[0].target == " Paris" and batch[2].score_label == "logit difference"
