"""DBRX and JetMoE against transformers 5 (the oracle), beyond what every family gets from
tests/test_parity.py, test_check.py and test_explain.py (logits, saving back, prefill + decode,
conservation checks, both LRP methods): greedy tokens through our KV cache equal transformers'
``generate``, relevance conservation (DBRX is bias-free; JetMoE's biases absorb exactly their share),
the KV cache of JetMoE's mixture of attention holds only the shared key/value heads, and bad config
values are named.

The tiny configs are ``tests/families.py``'s "dbrx" (head size 20, a clip that clamps, p=2 routing
norm) and "jetmoe" (3 attention and MLP experts top-2 over 2 shared heads of 24).
"""

import pytest
import torch
from transformers.models.dbrx import modeling_dbrx

import lucidlm
from lucidlm import Config, rules
from lucidlm.cache import POLICIES
from lucidlm.errors import ConfigError
from lucidlm.explain.explainer import explain
from lucidlm.generate import generate_ids
from lucidlm.model.rope import inverse_frequencies
from test_families_dense import hf_greedy

FAMILIES = ["dbrx", "jetmoe"]
PROMPT = [5, 17, 3, 42, 8, 11, 60, 23, 9]
N_NEW = 12


@pytest.fixture(scope="module")
def pairs(hf_checkpoint):
    return {f: (hf_checkpoint(f)[0], lucidlm.LLM.load(hf_checkpoint(f)[1])) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_tokens_equal_transformers_generate(family, pairs):
    hf_model, llm = pairs[family]
    ours = [step[0] for step in generate_ids(llm.model, [PROMPT], N_NEW)]
    assert ours == hf_greedy(hf_model, PROMPT, N_NEW)


_EXACT = [p for p in POLICIES if "int" not in p]  # quantised buffers round the keys: not exact


@pytest.mark.parametrize("policy", _EXACT)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_through_every_cache_with_room_equal_transformers_generate(family, policy, pairs):
    """Every policy with room for all the tokens keeps what the dense cache keeps: transformers' tokens
    (JetMoE's cache holds the shared heads, which every expert's queries read)."""
    hf_model, llm = pairs[family]
    got = [step[0] for step in generate_ids(llm.model, [PROMPT], N_NEW, kv_cache=policy, cache_tokens=64)]
    assert got == hf_greedy(hf_model, PROMPT, N_NEW)


@pytest.mark.parametrize("policy", [p for p in POLICIES if not p.startswith(("dense", "int"))])
def test_every_policy_evicting_runs_through_the_mixture_of_attention(policy, pairs):
    """With 8 slots per layer the policies evict (H2O/SnapKV score the shared heads by the weights
    of the expert heads that read them), and decoding goes on."""
    llm = pairs["jetmoe"][1]
    steps = list(generate_ids(llm.model, [PROMPT + PROMPT, [5, 6, 7]], 10, kv_cache=policy, cache_tokens=8))
    assert len(steps) == 10 and all(0 <= t < llm.config.vocab_size for step in steps for t in step)


def test_dbrx_clip_clamps_and_rope_base_is_the_top_level_one(pairs):
    """The tiny config's clip really clamps (so parity covers the clamp), and RoPE's base is the
    top-level one transformers 5 reads, not ``attn_config.rope_theta``."""
    hf_model, llm = pairs["dbrx"]
    seen = []
    wqkv = hf_model.transformer.blocks[0].norm_attn_norm.attn.Wqkv
    handle = wqkv.register_forward_hook(lambda m, i, out: seen.append(out.abs().max().item()))
    with torch.no_grad():
        hf_model(torch.tensor([PROMPT]))
    handle.remove()
    assert seen[0] > llm.config.clip_qkv == hf_model.config.attn_config.clip_qkv
    assert hf_model.config.attn_config.rope_theta != llm.config.rope_theta
    rotary = modeling_dbrx.DbrxRotaryEmbedding(hf_model.config)
    torch.testing.assert_close(inverse_frequencies(llm.config.head_size, 1.0, llm.config.rope_theta), rotary.inv_freq,
                               atol=0, rtol=1e-6)


def test_dbrx_cp_lrp_conserves_the_logit(pairs):
    """DBRX has no bias anywhere: CP-LRP's token relevances sum to the logit (the clamp takes the
    identity rule, the routing weights are constants)."""
    model = pairs["dbrx"][1].model.double().eval()
    try:
        e = explain(model, None, PROMPT, method="cp-lrp")
        with torch.no_grad():
            logit = model(torch.tensor([PROMPT]))[0, -1, e.target_ids[0]].item()
    finally:
        model.float()
    assert abs(e.target_logit - logit) < 1e-6 * abs(logit)
    assert abs(e.relevance.double().sum().item() - e.target_logit) < 1e-4 * abs(e.target_logit)


def test_jetmoe_biases_absorb_exactly_the_missing_relevance(pairs):
    """JetMoE's attention and MLP outputs carry a bias each: under CP-LRP the token relevances plus
    Σ b · ∂logit/∂b over those biases equal the logit."""
    model = pairs["jetmoe"][1].model.double().eval()
    try:
        ids = torch.tensor([PROMPT])
        h0 = model.embed_tokens(ids, torch.arange(len(PROMPT))[None]).detach().requires_grad_()
        biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
        assert len(biases) == 2 * model.config.n_layer
        with rules.explaining("cp-lrp"):
            logit = model(inputs_embeds=h0, last_only=True)[0, -1].max()
        grads = torch.autograd.grad(logit, [h0, *biases])
        tokens = (h0 * grads[0]).sum().item()
        absorbed = sum((b * g).sum().item() for b, g in zip(biases, grads[1:]))
    finally:
        model.float()
    assert abs(absorbed) > 1e-3 * abs(logit.item())  # the biases matter: the check below means something
    assert abs(tokens + absorbed - logit.item()) < 1e-6 * abs(logit.item())


def test_jetmoe_cache_holds_the_shared_heads(pairs):
    """transformers caches the shared key/value heads (num_key_value_heads of kv_channels), not the
    num_key_value_heads * num_experts_per_tok query heads: so does every policy here."""
    hf_model, llm = pairs["jetmoe"]
    with torch.no_grad():
        cache = hf_model(torch.tensor([PROMPT]), use_cache=True).cache
    keys, values = cache.layers[0].keys, cache.layers[0].values
    groups, key_size, value_size = llm.config.kv_slot_sizes()
    assert (keys.shape[1], keys.shape[3], values.shape[3]) == (groups, key_size, value_size)
    assert llm.config.n_head == groups * hf_model.config.num_experts_per_tok


_DBRX = dict(architectures=["DbrxForCausalLM"], model_type="dbrx", d_model=64, n_heads=4, n_layers=2, vocab_size=96,
             attn_config=dict(kv_n_heads=2, clip_qkv=8), ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4,
                                                                          moe_top_k=2))
_JETMOE = dict(architectures=["JetMoeForCausalLM"], model_type="jetmoe", hidden_size=64, num_hidden_layers=2,
               num_key_value_heads=2, kv_channels=16, num_local_experts=4, num_experts_per_tok=2, vocab_size=96)


@pytest.mark.parametrize("base, change, field", [
    (_DBRX, {"ffn_config": dict(_DBRX["ffn_config"], moe_normalize_expert_weights="two")},
     "ffn_config.moe_normalize_expert_weights"),
    (_DBRX, {"attn_config": dict(_DBRX["attn_config"], clip_qkv=-1)}, "attn_config.clip_qkv"),
    (_DBRX, {"attn_config": [2, 8]}, "attn_config"),
    (_DBRX, {"ffn_config": dict(_DBRX["ffn_config"], moe_top_k=5)}, "n_expert_per_token"),
    (_DBRX, {"tie_word_embeddings": True}, "tie_word_embeddings"),
    (_DBRX, {"ffn_config": dict(_DBRX["ffn_config"], ffn_act_fn={"name": "tanh"})}, "activation"),
    (_JETMOE, {"num_experts_per_tok": 5}, "num_experts_per_tok"),
    (_JETMOE, {"num_experts_per_tok": 0}, "num_experts_per_tok"),
])
def test_bad_config_values_are_named(base, change, field):
    with pytest.raises(ConfigError, match=field):
        Config.from_hf({**base, **change})


@pytest.mark.parametrize("config", [_DBRX, _JETMOE])
def test_good_configs_load_with_transformers_defaults(config):
    """The sparse dicts above are valid (so the failures above are the changed field's)."""
    c = Config.from_hf(config)
    assert c.n_expert == 4 and c.n_expert_per_token == 2
