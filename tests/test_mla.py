"""DeepSeek-V2/V3 (multi-head latent attention, grouped-routing MoE) against transformers 5 (the
oracle): logits, greedy tokens through our KV cache (which holds the latent, not keys and values)
equal to transformers' ``generate``, under evicting policies too; the LRP checks; bad MLA configs;
the catalogue entry and the cache's bytes per token against full keys and values."""

import pytest
import torch
import transformers as T

import lucidlm
from lucidlm import Config
from lucidlm.cache import build_cache
from lucidlm.cache.base import DenseLayerCache
from lucidlm.compiled import CompiledDecoder, missing_compiler
from lucidlm.errors import ConfigError
from lucidlm.generate import generate_ids
from lucidlm.model.mla import MLAttention
from lucidlm.model.mlp import DeepSeekMoE

_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
               num_experts_per_tok=2, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10,
               first_k_dense_replace=1, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
               pad_token_id=0, tie_word_embeddings=False)
_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32, mscale=0.707,
             mscale_all_dim=0.707, beta_fast=32, beta_slow=1)

CONFIGS = {
    # V2-Lite's shape: a full q_proj, greedy softmax routing, YaRN with mscale in the softmax scale
    "v2-lite": lambda: T.DeepseekV2Config(**_COMMON, q_lora_rank=None, topk_method="greedy",
                                          rope_parameters=dict(_YARN)),
    # V2: low-rank q, group-limited routing, a routed scaling factor, plain RoPE
    "v2-grouped": lambda: T.DeepseekV2Config(**_COMMON, q_lora_rank=24, topk_method="group_limited_greedy",
                                             n_group=4, topk_group=2, routed_scaling_factor=1.5),
    # V3: low-rank q, sigmoid scores + correction bias, renormalised, interleaved rotary pairs
    "v3": lambda: T.DeepseekV3Config(**_COMMON, q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True,
                                     routed_scaling_factor=2.5, rope_interleave=True),
    # V3 with the rotate-half layout and an odd head size (nope 13 + rope 6 = 19)
    # every layer dense (first_k_dense_replace = num_hidden_layers): a decode step torch.compile takes whole
    "v2-dense": lambda: T.DeepseekV2Config(**{**_COMMON, "first_k_dense_replace": 3}, q_lora_rank=None,
                                           rope_parameters=dict(_YARN)),
    "v3-halves": lambda: T.DeepseekV3Config(**{**_COMMON, "qk_nope_head_dim": 13}, q_lora_rank=24, n_group=2,
                                            topk_group=1, norm_topk_prob=False, rope_interleave=False),
}


def build(name: str, tmp_path_factory):
    """(transformers model, our LLM loaded from its saved checkpoint), random weights, float32."""
    torch.manual_seed(0)
    config = CONFIGS[name]()
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager", experts_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):  # V3's bias changes the choice, not the weights
                b.normal_(0, 0.1)
    model.eval()
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory, safe_serialization=True)
    return model, lucidlm.LLM.load(directory)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    return request.param, *build(request.param, tmp_path_factory)


def prompt(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (1, length), generator=torch.Generator().manual_seed(seed))


def greedy(hf, model, ids: torch.Tensor, new: int, **kwargs) -> tuple[list[int], list[int]]:
    hf.generation_config.eos_token_id = None  # a random model may pick token 2: neither side stops
    with torch.no_grad():
        expected = hf.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    got = [t[0] for t in generate_ids(model, [ids[0].tolist()], max_new_tokens=new, **kwargs)]
    assert len(expected) == new
    return expected, got


def test_builds_latent_attention_and_deepseek_moe(pair):
    name, _, llm = pair
    layers = llm.model.layers
    assert all(isinstance(layer.attn, MLAttention) for layer in layers)
    assert not isinstance(layers[0].mlp, DeepSeekMoE)  # first_k_dense_replace=1 (v2-dense: 3)
    assert all(isinstance(layer.mlp, DeepSeekMoE) != (name == "v2-dense") for layer in layers[1:])
    assert hasattr(layers[0].attn, "q_proj") == (name in ("v2-lite", "v2-dense"))


def test_logits_match_transformers(pair):
    _, hf, llm = pair
    ids = torch.cat([prompt(13, seed=1), prompt(13, seed=2)])
    with torch.no_grad():
        expected, got = hf(ids).logits, llm.model(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [256, 5])
def test_greedy_through_the_latent_cache_matches_generate(pair, chunk_size):
    """One prefill, or the prompt in chunks of 5 through the cache (several latents appended per step)."""
    _, hf, llm = pair
    expected, got = greedy(hf, llm.model, prompt(17, seed=3), 20, chunk_size=chunk_size)
    assert got == expected


@pytest.mark.skipif(missing_compiler(torch.device("cpu")) is not None,
                    reason="TorchInductor needs a C++ compiler (g++/clang++), none installed")
def test_compiled_decode_over_the_static_latent_cache_matches_generate(tmp_path_factory):
    hf, llm = build("v2-dense", tmp_path_factory)
    decoder = CompiledDecoder(llm.model)
    expected, got = greedy(hf, llm.model, prompt(9, seed=7), 10, decoder=decoder)
    assert decoder.fallback_reason is None and got == expected


@pytest.mark.parametrize("policy", ["window", "sink", "h2o", "snapkv"])
def test_evicting_policies_keep_latent_slots(policy, tmp_path_factory):
    """With room for every token, an evicting policy generates what transformers generates (the
    explicit kernel and its scores run for h2o/snapkv); with less, each layer keeps ``cache_tokens``
    latent slots of ``kv_lora_rank + qk_rope_head_dim`` numbers and no values."""
    hf, llm = build("v2-grouped", tmp_path_factory)
    expected, got = greedy(hf, llm.model, prompt(9, seed=4), 12, kv_cache=policy, cache_tokens=64)
    assert got == expected
    c = llm.config
    cache = build_cache(c, batch=1, policy=policy, cache_tokens=8)
    with torch.no_grad():
        llm.model(prompt(20, seed=5), cache=cache)
    for layer in cache.layers:
        (k,), (v,) = layer.k, layer.v
        assert k.shape == (1, 1, 8, c.kv_lora_rank + c.qk_rope_head_dim) and v.shape == (1, 1, 8, 0)
        assert len(layer.positions()[0]) == 8
    if policy == "window":
        assert cache.kept_positions()[0] == set(range(12, 20))


def test_value_norm_policy_refuses_a_cache_without_values():
    from lucidlm.errors import CacheError

    with pytest.raises(CacheError, match="h2o-vlen.*no values"):
        build_cache(Config(**_tiny()), batch=1, policy="h2o-vlen", cache_tokens=8)


def test_latent_cache_bytes_per_token_against_full_keys_and_values():
    """DeepSeek-V2-Lite (the catalogue's config): its cache holds 512 + 64 numbers per token and
    layer, where full keys and values of the same attention hold 16 heads x (192 + 128)."""
    c = Config.from_name("DeepSeek-V2-Lite")
    tokens = 4

    def per_token(layer: DenseLayerCache) -> int:
        return (layer.k.numel() * layer.k.element_size() + layer.v.numel() * layer.v.element_size()) // tokens

    latent = build_cache(c, batch=1, policy="dense", cache_tokens=tokens, dtype=torch.bfloat16)
    full = DenseLayerCache(1, c.n_head, c.head_size, tokens, torch.bfloat16, value_size=c.v_head_dim)
    latent_bytes = sum(per_token(layer) for layer in latent.layers)
    full_bytes = c.n_layer * per_token(full)
    assert latent_bytes == 27 * (512 + 64) * 2 == 31_104
    assert full_bytes == 27 * 16 * (192 + 128) * 2 == 276_480


def test_catalogue_entry_reads_the_published_config():
    c = Config.from_name("DeepSeek-V2-Lite")
    assert (c.n_layer, c.n_embd, c.n_head, c.kv_lora_rank, c.q_lora_rank) == (27, 2048, 16, 512, None)
    assert (c.n_expert, c.n_expert_per_token, c.n_shared_experts, c.moe_intermediate_size) == (64, 6, 2, 1408)
    assert c.moe_layers == (False,) + (True,) * 26 and c.rope_scaling["rope_type"] == "yarn"


@pytest.mark.parametrize("name", ["v2-lite", "v3"])
def test_explain_check_passes(name):
    hf_config = CONFIGS[name]()
    config = Config.from_hf({**hf_config.to_dict(), "architectures": hf_config.architectures})
    torch.manual_seed(0)
    model = lucidlm.GPT(config)
    report = lucidlm.explain.check(model)
    assert report.ok, str(report)


def _tiny(**overrides) -> dict:
    fields = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, head_size=12, intermediate_size=48,
                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, mlp="deepseek_moe",
                  n_expert=4, n_expert_per_token=2, moe_intermediate_size=16, n_group=2, topk_group=1)
    return {**fields, **overrides}


@pytest.mark.parametrize("overrides, field", [
    (dict(kv_lora_rank=33), "kv_lora_rank"),  # larger than n_embd: no low rank
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(qk_rope_head_dim=5, head_size=13), "qk_rope_head_dim"),  # RoPE rotates pairs
    (dict(v_head_dim=0), "v_head_dim"),
    (dict(head_size=16), "head_size"),  # not qk_nope_head_dim + qk_rope_head_dim
    (dict(n_group=3), "n_group"),  # does not divide n_expert=4
    (dict(topk_group=3), "topk_group"),
    (dict(n_expert_per_token=3), "n_expert_per_token"),  # more than one group of 2 holds
    (dict(moe_scoring="tanh"), "moe_scoring"),
    (dict(topk_method="noaux"), "topk_method"),
])
def test_bad_mla_configs_are_config_errors_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        Config(**_tiny(**overrides))


def test_bad_mla_config_json_names_the_file_and_field():
    hf = {**CONFIGS["v2-lite"]().to_dict(), "architectures": ["DeepseekV2ForCausalLM"], "kv_lora_rank": 1000}
    with pytest.raises(ConfigError, match="config dict: kv_lora_rank=1000 does not fit"):
        Config.from_hf(hf)


@pytest.mark.parametrize("policy", ["dense", "window"])
def test_training_through_the_latent_cache_is_the_full_forward(policy):
    """Chunked training (gradients through the cached latents) equals one forward over the whole
    sequence when nothing is evicted (the full forward is transformers' logits, above)."""
    from torch.nn import functional as F

    from lucidlm.train.chunked import ChunkedCache

    hf_config = CONFIGS["v3"]()
    torch.manual_seed(0)
    model = lucidlm.GPT(Config.from_hf({**hf_config.to_dict(), "architectures": hf_config.architectures}))
    ids = prompt(20, seed=6)
    labels = torch.roll(ids, -1, 1)
    plan = ChunkedCache(policy, cache_tokens=32, chunk_size=6)
    grads = []
    for loss_fn in (lambda: plan.loss(model, ids, labels),
                    lambda: F.cross_entropy(model(ids)[0], labels[0], reduction="sum")):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        grads.append((loss.detach(), model.layers[1].attn.kv_b_proj.weight.grad.clone()))
    (chunked, g_chunked), (full, g_full) = grads
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_chunked, g_full, rtol=1e-4, atol=1e-6)
    assert g_full.abs().max() > 0
