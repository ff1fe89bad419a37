"""MoE families of issue 26 (OLMoE, GraniteMoE, PhiMoE) beyond what every family gets from
tests/test_parity.py, test_check.py and test_explain.py (logits, saving back, prefill + decode,
conservation checks, both LRP methods): greedy tokens through our KV cache equal transformers'
``generate``, PhiMoE's routing and LongRoPE switch equal transformers' (the oracle), and bad
configs get typed errors naming the field."""

import pytest
import torch
from transformers.models.phimoe import modeling_phimoe

import lucidlm
from lucidlm.config import Config
from lucidlm.errors import ConfigError
from lucidlm.explain.explainer import explain
from lucidlm.generate import generate_ids
from lucidlm.model.mlp import sparsemixer
from test_explain import EXACT, load, plain_logits, rel_err
from test_explain import PROMPT as EXPLAIN_PROMPT
from test_families_dense import hf_greedy

MOE_FAMILIES = ["olmoe", "granitemoe", "phimoe"]
PROMPT = [5, 17, 3, 42, 8, 11, 60, 23]  # longer than phimoe's window of 7
N_NEW = 12  # 20 tokens in all: past phimoe's LongRoPE switch at 16


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_cached_greedy_tokens_equal_transformers_generate(family, hf_checkpoint):
    hf_model, directory = hf_checkpoint(family)
    llm = lucidlm.LLM.load(directory)
    ours = [step[0] for step in generate_ids(llm.model, [PROMPT], N_NEW)]
    assert ours == hf_greedy(hf_model, PROMPT, N_NEW)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_cp_lrp_conserves_the_logit_without_biases(family, hf_checkpoint):
    """Routing weights are constants under both rules, so a bias-free MoE is locally linear under
    CP-LRP: the relevances sum to the logit. PhiMoE's LayerNorms, attention and head have biases:
    zeroed here, its bias-free variant."""
    model = load(hf_checkpoint, family).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
    assert not any(name.endswith(".bias") for name, _ in model.named_parameters()) or family == "phimoe"
    e = explain(model, None, EXPLAIN_PROMPT, method="cp-lrp")
    logit = plain_logits(model, EXPLAIN_PROMPT)[e.target_ids[0]].item()
    assert rel_err(e.target_logit, logit) < EXACT
    assert rel_err(e.relevance.double().sum().item(), e.target_logit) < 1e-4


@pytest.mark.parametrize("family", ["olmoe", "granitemoe"])
def test_latent_relevances_conserve_per_branch(family, hf_checkpoint):
    """Bias-free, CP-LRP: each expert's neurons hold exactly what its layer's MLP passes on (the
    check of tests/test_explain.py, on these families' experts)."""
    import test_explain

    test_explain.test_latent_relevances_conserve_per_branch(family, hf_checkpoint)


def test_phimoe_logits_past_the_longrope_switch(hf_checkpoint):
    """A forward longer than original_max_position_embeddings (16) takes long_mscale; transformers 5.25
    keeps the short factors (it computes the frequencies without the length)."""
    hf_model, directory = hf_checkpoint("phimoe")
    llm = lucidlm.LLM.load(directory)
    ids = torch.randint(3, llm.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, got = hf_model(ids).logits, llm.model(ids)
        short = llm.model(ids[:, :16])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got[:, :16] - short).abs().max() > 1e-3  # the switch changed the first 16 positions too


@pytest.mark.parametrize("eps", [0.01, 0.2, 1.0])
def test_sparsemixer_equals_transformers(eps):
    scores = torch.randn(256, 6, generator=torch.Generator().manual_seed(0))
    scores[:8, 1] = scores[:8, 0] - 1e-3  # near ties: both inside the threshold
    want_weights, want_chosen = modeling_phimoe.sparsemixer(scores, jitter_eps=eps, training=False)
    weights, chosen = sparsemixer(scores, eps)
    assert torch.equal(chosen, want_chosen)
    torch.testing.assert_close(weights, want_weights, atol=0, rtol=0)
    assert ((weights[:, 0] < 1) & (weights[:, 0] > 0)).any()  # the mask left several candidates somewhere


def _phimoe(**rope):
    base = dict(architectures=["PhiMoEForCausalLM"], model_type="phimoe", hidden_size=64, num_attention_heads=4,
                num_hidden_layers=1, vocab_size=96, intermediate_size=32, num_local_experts=4, num_key_value_heads=2,
                max_position_embeddings=128)
    return base | ({"rope_scaling": rope} if rope else {})


def test_phimoe_remote_code_architecture_name_reads():
    config = Config.from_hf(_phimoe())
    assert (config.mlp, config.moe_routing, config.n_expert_per_token, config.norm) == (
        "moe", "sparsemixer", 2, "layernorm")


@pytest.mark.parametrize("rope, field", [
    (dict(type="longrope", short_factor=[1.0] * 8, long_factor=[1.0] * 8, short_mscale="big", long_mscale=1.0,
          original_max_position_embeddings=16), "rope_scaling.short_mscale"),
    (dict(type="longrope", short_factor=[1.0] * 8, long_factor=[1.0] * 8, short_mscale=1.0,
          original_max_position_embeddings=16), "rope_scaling.long_mscale"),
    (dict(type="longrope", short_factor=[1.0] * 7, long_factor=[1.0] * 8, short_mscale=1.0, long_mscale=1.0,
          original_max_position_embeddings=16), "rope_scaling.short_factor"),
    (dict(type="linear", factor=2.0), "rope_scaling.rope_type"),
])
def test_bad_phimoe_rope_names_the_field(rope, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Config.from_hf(_phimoe(**rope))


def test_olmoe_head_dim_that_does_not_span_hidden_size_is_refused():
    raw = dict(architectures=["OlmoeForCausalLM"], hidden_size=64, num_attention_heads=4, head_dim=24,
               num_hidden_layers=1, vocab_size=96)
    with pytest.raises(ConfigError, match="head_dim=24"):
        Config.from_hf(raw)


def test_sparsemixer_with_other_than_two_experts_is_refused():
    with pytest.raises(ConfigError, match="n_expert_per_token=3"):
        Config(mlp="moe", moe_routing="sparsemixer", n_expert=4, n_expert_per_token=3, n_embd=64, n_head=4)


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
