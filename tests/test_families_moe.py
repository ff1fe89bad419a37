"""MoE families of issue 26 (OLMoE, GraniteMoE) beyond what every family gets from
tests/test_parity.py, test_check.py and test_explain.py (logits, saving back, prefill + decode,
conservation checks, both LRP methods): greedy tokens through our KV cache equal transformers'
``generate`` (the oracle), and bad configs get typed errors naming the field."""

import pytest
import torch

import lucidlm
from lucidlm.config import Config
from lucidlm.errors import ConfigError
from lucidlm.explain.explainer import explain
from lucidlm.generate import generate_ids
from test_explain import EXACT, load, plain_logits, rel_err
from test_explain import PROMPT as EXPLAIN_PROMPT
from test_families_dense import hf_greedy

MOE_FAMILIES = ["olmoe", "granitemoe"]
PROMPT = [5, 17, 3, 42, 8, 11, 60, 23]
N_NEW = 12


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_cached_greedy_tokens_equal_transformers_generate(family, hf_checkpoint):
    hf_model, directory = hf_checkpoint(family)
    llm = lucidlm.LLM.load(directory)
    ours = [step[0] for step in generate_ids(llm.model, [PROMPT], N_NEW)]
    assert ours == hf_greedy(hf_model, PROMPT, N_NEW)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_cp_lrp_conserves_the_logit_without_biases(family, hf_checkpoint):
    """Routing weights are constants under both rules, so a bias-free MoE is locally linear under
    CP-LRP: the relevances sum to the logit."""
    model = load(hf_checkpoint, family).double()
    assert not any(name.endswith(".bias") for name, _ in model.named_parameters())
    e = explain(model, None, EXPLAIN_PROMPT, method="cp-lrp")
    logit = plain_logits(model, EXPLAIN_PROMPT)[e.target_ids[0]].item()
    assert rel_err(e.target_logit, logit) < EXACT
    assert rel_err(e.relevance.double().sum().item(), e.target_logit) < 1e-4


def test_olmoe_head_dim_that_does_not_span_hidden_size_is_refused():
    raw = dict(architectures=["OlmoeForCausalLM"], hidden_size=64, num_attention_heads=4, head_dim=24,
               num_hidden_layers=1, vocab_size=96)
    with pytest.raises(ConfigError, match="head_dim=24"):
        Config.from_hf(raw)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_attention_lora_adapter_loads_in_peft_with_our_logits(family, hf_checkpoint, tmp_path):
    """LoRA's default on an MoE leaves the experts out (transformers 5 fuses them; GraniteMoE's
    checkpoints too): the attention adapter, saved with the checkpoint's names, gives peft's logits."""
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    from families import build_hf_model
    from lucidlm.train.lora import attach_lora, lora_layers, save_adapter
    from test_lora_interop import ids_for, randomise_b

    _, directory = hf_checkpoint(family)
    llm = lucidlm.LLM.load(directory)
    attach_lora(llm.model, r=4, alpha=8)
    assert lora_layers(llm.model) and not any(".experts." in name for name in lora_layers(llm.model))
    randomise_b(llm.model)
    save_adapter(llm.model, tmp_path / "a")
    base = build_hf_model(family)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    ids = ids_for(llm.config.vocab_size)
    with torch.no_grad():
        ours, want, plain = llm.model(ids), theirs(ids).logits, build_hf_model(family)(ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)
