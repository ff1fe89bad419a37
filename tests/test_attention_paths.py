"""Explanations take the fused attention kernel (SDPA) whenever no attention weights are needed:
the relevances must equal those of the written-out kernel, which the rules define."""

from __future__ import annotations

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


def test_cp_lrp_keeps_no_attention_matrix_for_the_backward():
    """CP-LRP's memory grows linearly with the prompt: no (tokens x tokens) tensor is saved."""
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-llama")).eval()
    n = 96
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        explain(model, None, torch.randint(0, model.config.vocab_size, (n,)).tolist(), method="cp-lrp")
    assert saved and not [s for s in saved if len(s) >= 2 and s[-1] == n and s[-2] == n]
