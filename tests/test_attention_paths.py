"""Explanations take the fused attention kernel (SDPA) whenever no attention weights are needed:
the relevances must equal those of the written-out kernel, which the rules define."""

from __future__ import annotations

import math

import pytest
import torch

from lucidlm import GPT, Config
from lucidlm.explain.explainer import explain
from lucidlm.model import attention


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("name", ["tiny-llama"])
def test_fused_and_explicit_kernels_give_the_same_relevances(method, name, monkeypatch):
    torch.manual_seed(0)
    model = GPT(Config.from_name(name)).double().eval()
    ids = torch.randint(0, model.config.vocab_size, (24,)).tolist()
    fused = explain(model, None, ids, method=method)
    calls = []
    real_fused = attention.CausalSelfAttention._fused
    monkeypatch.setattr(attention.CausalSelfAttention, "_fused",
                        lambda *a, **k: calls.append(1) or real_fused(*a, **k))
    with attention.recording_weights():  # recording forces the explicit kernel
        explicit = explain(model, None, ids, method=method)
    assert calls == []  # the second run really took the explicit kernel
    torch.testing.assert_close(fused.relevance, explicit.relevance, rtol=1e-9, atol=1e-12)


def square_tensors_saved(run, n: int) -> list[tuple[int, ...]]:
    """Shapes of the per-head (n x n) tensors (attention logits or weights) that autograd saves for
    the backward while ``run()``. The model's own (1, 1, n, n) mask, one tensor shared by every
    layer, does not count."""
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    assert saved
    return [s for s in saved if len(s) >= 3 and s[-1] == n and s[-2] == n and math.prod(s[:-2]) > 1]


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_explanations_keep_no_attention_matrix_for_the_backward(method):
    """Memory grows linearly with the prompt: no (tokens x tokens) tensor is saved."""
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-llama")).eval()
    ids = torch.randint(0, model.config.vocab_size, (96,)).tolist()
    assert square_tensors_saved(lambda: explain(model, None, ids, method=method), 96) == []


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("family", ["smollm2", "gpt2"])
def test_patched_transformers_keep_no_attention_matrix_for_the_backward(method, family):
    pytest.importorskip("transformers")
    from families import build_hf_model

    from lucidlm import hf

    model = build_hf_model(family)
    ids = torch.randint(0, model.config.vocab_size, (96,)).tolist()
    assert square_tensors_saved(lambda: hf.explain(model, ids, method=method), 96) == []
