"""Baseline attributions (lucidlm.explain.baselines): integrated gradients against its completeness
axiom and an unbatched reference, occlusion against a loop of plain forwards, attention rollout against
weights from transformers' eager attention, the seeded random floor, and that every baseline explains
the same score as the LRP methods."""

import dataclasses
import doctest
import threading
import warnings

import pytest
import torch

import lucidlm
from lucidlm import GPT, Config
from lucidlm.errors import ExplainError
from lucidlm.explain import baselines
from lucidlm.explain.baselines import CompletenessWarning, integrated_gradients, occlusion, rollout
from lucidlm.explain.explainer import explain, explain_generation
from lucidlm.methods import BASELINES
from lucidlm.model import attention

PROMPT = [1, 17, 42, 5, 63, 8, 29, 77, 11]


def tiny(dtype=torch.float64, **changes) -> GPT:
    torch.manual_seed(0)
    return GPT(dataclasses.replace(Config.from_name("tiny-llama"), **changes)).eval().to(dtype)


def logits_of(model, ids=None, embeds=None) -> torch.Tensor:
    """Plain forward (no lucidlm explainer code): the logits of every position, float64."""
    with torch.no_grad():
        out = model(torch.tensor([ids])) if embeds is None else model(inputs_embeds=embeds)
    return out[0].double()


def embeds_of(model, ids) -> torch.Tensor:
    return model.embed_tokens(torch.tensor([ids]), torch.arange(len(ids))[None]).detach()


def continuation_logprob(logits: torch.Tensor, n_prompt: int, continuation: list[int]) -> float:
    """Σ_i log p(c_i | prompt, c_<i), by hand from the logits of prompt + continuation[:-1]."""
    rows = logits[n_prompt - 1:].log_softmax(-1)
    return sum(rows[i, c].item() for i, c in enumerate(continuation))


def test_doctests():
    for module in (baselines, attention):
        assert doctest.testmod(module).failed == 0


# --------------------------------------------------------------------------- integrated gradients
def completeness_gaps(model, ids, target, baseline, baseline_score, step_counts):
    score = logits_of(model, ids)[-1, target].item()
    gaps = []
    for steps in step_counts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CompletenessWarning)  # the gaps are asserted by the caller
            e = integrated_gradients(model, None, ids, target=target, steps=steps, baseline=baseline, batch_size=5)
        assert e.target_logit == pytest.approx(score, rel=1e-6)
        gaps.append(abs(e.relevance.double().sum().item() - (score - baseline_score)))
    return gaps, score - baseline_score


def test_integrated_gradients_completeness_with_the_zero_baseline():
    """Σ relevance → score(x) − score(0), the midpoint error O(1/steps²). norm_eps=1: RMSNorm(α·h) is
    smooth at α = 0 (with eps=1e-5 the path jumps within α < 1e-5; see the next test)."""
    model = tiny(norm_eps=1.0)
    zero_score = logits_of(model, embeds=torch.zeros_like(embeds_of(model, PROMPT)))[-1, 3].item()
    assert zero_score == 0.0  # bias-free: the zero input scores 0
    (coarse, fine), difference = completeness_gaps(model, PROMPT, 3, "zeros", zero_score, (3, 24))
    assert coarse > 1e-3 * abs(difference)  # 3 steps are visibly off, so the shrinking means something
    assert fine < coarse / 20  # (24 / 3)² = 64 for a smooth path
    assert fine < 1e-3 * abs(difference)


def test_integrated_gradients_completeness_with_a_token_baseline():
    """Baseline = token 11 at every position: its score is the plain forward of [11] * n."""
    model = tiny()
    base_score = logits_of(model, [11] * len(PROMPT))[-1, 3].item()
    (coarse, fine), difference = completeness_gaps(model, PROMPT, 3, 11, base_score, (2, 32))
    assert coarse > 1e-3 * abs(difference)
    assert fine < coarse / 50  # 256 for a smooth path
    assert fine < 1e-3 * abs(difference)


def test_integrated_gradients_warns_when_completeness_fails():
    """eps=1e-5 and the zero baseline: 4 midpoints miss the jump near α = 0; the warning says so
    exactly when the independently computed gap exceeds 5%."""
    model = tiny()
    difference = logits_of(model, PROMPT)[-1, 3].item()  # score(0) = 0
    with pytest.warns(CompletenessWarning, match="4 steps"):
        e = integrated_gradients(model, None, PROMPT, target=3, steps=4)
    assert abs(e.relevance.sum().item() - difference) > 0.05 * abs(difference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a smooth path: no warning
        integrated_gradients(model, None, PROMPT, target=3, steps=32, baseline=11)


def reference_ig(model, ids, baseline_embeds, score_fn, steps):
    """Sundararajan et al. Eq. 1 written out: one path point per forward, midpoint rule."""
    h0 = embeds_of(model, ids)
    total = torch.zeros_like(h0)
    for k in range(steps):
        point = (baseline_embeds + (k + 0.5) / steps * (h0 - baseline_embeds)).requires_grad_(True)
        logits = model(inputs_embeds=point)[0]
        (grad,) = torch.autograd.grad(score_fn(logits), point)
        total += grad
    return ((h0 - baseline_embeds) * total / steps).sum(-1)[0]


@pytest.mark.filterwarnings("ignore::lucidlm.explain.baselines.CompletenessWarning")  # 5-7 steps from zeros
def test_integrated_gradients_equals_an_unbatched_reference():
    model = tiny()
    contrast = lambda logits: logits[-1, 3] - logits[-1, 4]
    expected = reference_ig(model, PROMPT, torch.zeros_like(embeds_of(model, PROMPT)), contrast, steps=7)
    e = integrated_gradients(model, None, PROMPT, target=(3, 4), steps=7, batch_size=3,
                             baseline="zeros")  # 3 + 3 + 1 path points per forward
    torch.testing.assert_close(e.relevance.double(), expected, rtol=1e-5, atol=1e-6)
    # a tensor baseline is used as given
    generator = torch.Generator().manual_seed(1)
    custom = torch.randn(len(PROMPT), model.config.n_embd, dtype=torch.float64, generator=generator)
    expected = reference_ig(model, PROMPT, custom[None], contrast, steps=5)
    e = integrated_gradients(model, None, PROMPT, target=(3, 4), steps=5, baseline=custom)
    torch.testing.assert_close(e.relevance.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::lucidlm.explain.baselines.CompletenessWarning")  # 6 steps from zeros
def test_integrated_gradients_of_a_continuation_keeps_the_continuation_fixed():
    """Only the prompt rows walk the path; the continuation's inputs stay at their embeddings."""
    model, continuation, steps = tiny(), [3, 4, 5], 6
    inputs = PROMPT + continuation[:-1]
    h0 = embeds_of(model, inputs)
    n = len(PROMPT)
    start = torch.cat([torch.zeros_like(h0[:, :n]), h0[:, n:]], dim=1)

    def score(logits):
        return logits[n - 1:].log_softmax(-1)[torch.arange(3), torch.tensor(continuation)].sum()

    expected = reference_ig(model, inputs, start, score, steps)[:n]
    e = integrated_gradients(model, None, PROMPT, target=continuation, steps=steps)
    assert e.score_label == "log-prob" and len(e.relevance) == n
    assert e.target_logit == pytest.approx(continuation_logprob(logits_of(model, inputs), n, continuation), rel=1e-6)
    torch.testing.assert_close(e.relevance.double(), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- occlusion
@pytest.mark.parametrize("target", [None, (3, 4)])
def test_occlusion_equals_a_loop_of_plain_forwards(target):
    model = tiny()
    last = logits_of(model, PROMPT)[-1]
    top = int(last.argmax())
    score = (lambda z: z[3] - z[4]) if target else (lambda z: z[top])
    expected = [score(last).item() - score(logits_of(model, PROMPT[:t] + [9] + PROMPT[t + 1:])[-1]).item()
                for t in range(len(PROMPT))]
    e = occlusion(model, None, PROMPT, target=target, replacement=9, batch_size=4)
    torch.testing.assert_close(e.relevance.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert e.relevance[PROMPT.index(77)] != 0  # a real change
    assert e.relevance.ne(0).all()  # 9 is not in the prompt: every token changes the input


def test_occlusion_of_a_continuation():
    model, continuation = tiny(), [3, 4, 5]
    n = len(PROMPT)

    def logprob(prompt):
        return continuation_logprob(logits_of(model, prompt + continuation[:-1]), n, continuation)

    expected = [logprob(PROMPT) - logprob(PROMPT[:t] + [0] + PROMPT[t + 1:]) for t in range(n)]
    e = occlusion(model, None, PROMPT, target=continuation)  # no tokenizer: replacement 0
    torch.testing.assert_close(e.relevance.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- attention rollout
def test_rollout_by_hand():
    """Two 3×3 layers, rolled out from the last row by hand: v ← v · rownorm(A + I), top layer first."""
    a1 = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])
    a2 = torch.tensor([[1.0, 0, 0], [0.0, 1.0, 0], [0.6, 0.0, 0.4]])
    # layer 2: (a2 + I)[2] / 2 = [0.3, 0, 0.7]; layer 1 rows: [1, 0, 0], [.25, .75, 0], [.1, .15, .75]
    expected = torch.tensor([0.3 * 1 + 0.7 * 0.1, 0.7 * 0.15, 0.7 * 0.75])  # [0.37, 0.105, 0.525]
    torch.testing.assert_close(rollout([a1, a2])[2], expected)
    with pytest.raises(ExplainError):
        rollout([])


@pytest.mark.parametrize("family", ["smollm2", "mistral"])  # grouped-query heads; a sliding window
def test_attention_rollout_equals_rollout_of_transformers_weights(family, hf_checkpoint):
    hf_model, directory = hf_checkpoint(family)
    model = lucidlm.LLM.load(directory).model.eval()
    with torch.no_grad():
        attentions = hf_model(torch.tensor([PROMPT]), output_attentions=True).attentions
    assert len(attentions) == model.config.n_layer
    # written out the other way round: a row vector pushed down from the top layer
    v = torch.zeros(len(PROMPT), dtype=torch.float64)
    v[-1] = 1.0
    for weights in reversed(attentions):
        mixed = weights[0].double().mean(0) + torch.eye(len(PROMPT), dtype=torch.float64)
        v = v @ (mixed / mixed.sum(-1, keepdim=True))
    e = explain(model, None, PROMPT, method="attention-rollout")
    torch.testing.assert_close(e.relevance.double(), v, rtol=1e-4, atol=1e-6)
    assert e.relevance.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_recording_weights_sees_only_its_own_thread():
    """A forward in another thread while one thread records leaves the record alone (ContextVar)."""
    model = tiny(torch.float32)
    inside, other_done = threading.Event(), threading.Event()

    def other():
        inside.wait()
        with torch.no_grad():
            model(torch.tensor([PROMPT]))
        other_done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with attention.recording_weights() as weights:
        inside.set()
        assert other_done.wait(timeout=60)
        assert weights == []  # the other thread's forward recorded nothing here
        with torch.no_grad():
            recorded = model(torch.tensor([PROMPT[:4]]))
    thread.join()
    assert [tuple(w.shape[-2:]) for w in weights] == [(4, 4)] * model.config.n_layer
    torch.testing.assert_close(recorded[0], logits_of(model, PROMPT[:4]).float(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model(torch.tensor([PROMPT]))  # after the block: nothing more is appended
    assert len(weights) == model.config.n_layer


# --------------------------------------------------------------------------- random
def test_random_is_seeded():
    model = tiny()
    a, b, c = (explain(model, None, PROMPT, method="random", options={"seed": s}) for s in (5, 5, 6))
    assert torch.equal(a.relevance, b.relevance) and not torch.equal(a.relevance, c.relevance)
    torch.testing.assert_close(a.relevance, torch.randn(len(PROMPT), generator=torch.Generator().manual_seed(5)))


# --------------------------------------------------------------------------- every baseline
@pytest.mark.filterwarnings("ignore::lucidlm.explain.baselines.CompletenessWarning")  # 4 steps from zeros
@pytest.mark.parametrize("target, objective", [(None, "logprob"), (3, "logprob"), ((3, 4), "logprob"),
                                               ([3, 4, 5], "logprob"), ([3, 4, 5], "logit")])
def test_every_baseline_explains_the_same_score_as_attnlrp(target, objective):
    model = tiny()
    reference = explain(model, None, PROMPT, target=target, objective=objective, method="attnlrp")
    for method in BASELINES:
        e = explain(model, None, PROMPT, target=target, objective=objective, method=method,
                    options={"steps": 4} if method == "integrated-gradients" else None)
        assert e.method == method and len(e.relevance) == len(PROMPT)
        assert (e.target, e.target_ids, e.score_label) == \
            (reference.target, reference.target_ids, reference.score_label)
        assert e.target_logit == pytest.approx(reference.target_logit, rel=1e-6)


def test_options_reach_the_baseline():
    model = tiny()
    a = explain(model, None, PROMPT, target=3, method="integrated-gradients", options={"steps": 3, "baseline": 11})
    b = integrated_gradients(model, None, PROMPT, target=3, steps=3, baseline=11)
    c = integrated_gradients(model, None, PROMPT, target=3, steps=4, baseline=11)
    assert torch.equal(a.relevance, b.relevance) and not torch.equal(a.relevance, c.relevance)


@pytest.mark.parametrize("method", BASELINES)
def test_bfloat16(method):
    model = tiny(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompletenessWarning)  # bf16 rounding along a rough path
        e = explain(model, None, PROMPT, target=[3, 4], method=method)
    assert e.relevance.dtype == torch.float32 and torch.isfinite(e.relevance).all()
    assert e.relevance.abs().sum() > 0


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("method, options, match", [
    ("integrated-gradients", {"steps": 0}, "steps=0"),
    ("integrated-gradients", {"steps": 2.5}, "steps=2.5"),
    ("integrated-gradients", {"batch_size": 0}, "batch_size=0"),
    ("integrated-gradients", {"baseline": "ones"}, "baseline='ones'"),
    ("integrated-gradients", {"baseline": 256}, "baseline=256"),
    ("integrated-gradients", {"baseline": torch.zeros(3, 64)}, r"shape \(9, 64\)"),
    ("occlusion", {"replacement": 256}, "replacement=256: expected a token id of the vocabulary, 0 to 255"),
    ("occlusion", {"replacement": -1}, "replacement=-1"),
    ("occlusion", {"steps": 4}, "'steps'.*takes replacement, batch_size"),
    ("attention-rollout", {"seed": 1}, "takes no options"),
    ("random", {"seed": "a"}, "seed='a'"),
])
def test_bad_options(method, options, match):
    with pytest.raises(ExplainError, match=match):
        explain(tiny(), None, PROMPT, method=method, options=options)


def test_what_baselines_do_not_take():
    model = tiny()
    with pytest.raises(ExplainError, match="kv_cache='window' does not apply to method='occlusion'"):
        explain(model, None, PROMPT, method="occlusion", kv_cache="window", cache_tokens=4)
    with pytest.raises(ExplainError, match="layers='all' does not apply to method='random'"):
        explain(model, None, PROMPT, method="random", layers="all")
    with pytest.raises(ExplainError, match="only the baselines"):
        explain(model, None, PROMPT, method="attnlrp", options={"steps": 4})
    with pytest.raises(ExplainError, match="objective='prob'"):
        explain(model, None, PROMPT, method="occlusion", objective="prob")
    with pytest.raises(ExplainError, match="method='occlusion'"):
        explain_generation(model, None, PROMPT, method="occlusion")
    with pytest.raises(ExplainError, match="method='rollout'.*attention-rollout"):
        explain(model, None, PROMPT, method="rollout")


def test_rollout_refuses_attention_it_cannot_see():
    """A custom attention that never calls CausalSelfAttention.attend records no weights."""

    class Uniform(attention.CausalSelfAttention):
        def forward(self, x, pos, cache=None, rope_memo=None):
            return self.o_proj(torch.zeros(*x.shape[:2], self.n_head * self.head_size, dtype=x.dtype))

    model = GPT(dataclasses.replace(Config.from_name("tiny-llama"), attention_class=Uniform)).eval()
    with pytest.raises(ExplainError, match="0 of 2 layers"):
        explain(model, None, PROMPT, method="attention-rollout")


# --------------------------------------------------------------------------- the real model
def test_smollm2(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt)
    reference = smollm2.explain(prompt)  # attnlrp
    results = {m: smollm2.explain(prompt, method=m) for m in ("occlusion", "attention-rollout", "random")}
    for method, e in results.items():
        assert e.relevance.shape == (len(ids),) and torch.isfinite(e.relevance).all(), method
        assert e.target_ids == reference.target_ids and e.tokens == reference.tokens
    assert results["attention-rollout"].relevance.sum().item() == pytest.approx(1.0, abs=1e-4)
    # occlusion replaces with the single-space token by default
    space = tokenizer.encode(" ", add_special_tokens=False)
    assert len(space) == 1
    explicit = occlusion(model, tokenizer, prompt, replacement=space[0])
    torch.testing.assert_close(results["occlusion"].relevance, explicit.relevance)
    # completeness on the real model, from a baseline near the input (half the embeddings: the path
    # from zeros crosses RMSNorm's eps regime, see the module docstring)
    h0 = embeds_of(model, ids)
    with torch.no_grad():
        at_baseline = model(inputs_embeds=0.5 * h0, last_only=True)[0, -1, reference.target_ids[0]].item()
    difference = reference.target_logit - at_baseline
    gaps = []
    for steps in (8, 64):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CompletenessWarning)  # 8 steps are 11% off, as asserted below
            e = explain(model, tokenizer, prompt, method="integrated-gradients",
                        options={"steps": steps, "baseline": 0.5 * h0[0]})
        assert e.relevance.shape == (len(ids),) and e.target_ids == reference.target_ids
        gaps.append(abs(e.relevance.double().sum().item() - difference))
    assert gaps[1] < gaps[0] / 8 and gaps[1] < 0.01 * abs(difference)
