"""YaRN, LongRoPE and dynamic-NTK RoPE against transformers (the oracle): logits in one forward
for prompts shorter and longer than the original context, and greedy tokens through our KV cache
equal to transformers' ``generate`` across the short/long switch.

The original context is 32 tokens here (tiny models, short prompts); transformers' semantics:

* ``longrope`` picks the long factors per forward by ``max(position_ids) + 1``; Phi-3's
  ``generate`` additionally drops its cache when the sequence reaches 33 tokens and recomputes
  every token with the long factors, while other families (Llama) keep the short-factor keys;
* ``dynamic`` grows the NTK base with the longest sequence the model has seen, per forward, and
  resets it below ``max_position_embeddings``;
* ``yarn`` has fixed frequencies and an attention factor on cos/sin.
"""

import warnings

import pytest
import torch
import transformers as T

import lucidlm
from lucidlm import Config
from lucidlm.compiled import CompileFallback, CompiledDecoder, missing_compiler
from lucidlm.errors import ConfigError
from lucidlm.generate import generate_ids

ORIGINAL = 32
_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               tie_word_embeddings=False)
_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=ORIGINAL)


def _factors(n: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (1.0 + 3.0 * torch.rand(n, generator=g)).tolist()


def _longrope(pairs: int) -> dict:
    return dict(rope_type="longrope", rope_theta=10000.0, short_factor=_factors(pairs, 1),
                long_factor=_factors(pairs, 2))


CONFIGS = {
    "llama-yarn": lambda: T.LlamaConfig(**_COMMON, rope_parameters=dict(_YARN)),
    # DeepSeek-V2/V3's spelling: mscale and mscale_all_dim give the attention factor; betas set
    "llama-yarn-deepseek": lambda: T.LlamaConfig(**_COMMON, rope_parameters=dict(
        _YARN, factor=40.0, mscale=1.0, mscale_all_dim=0.707, beta_fast=32, beta_slow=1)),
    # gpt-oss's spelling: no truncation of the correction range
    "qwen2-yarn-untruncated": lambda: T.Qwen2Config(**_COMMON, rope_parameters=dict(
        _YARN, factor=8.0, truncate=False, beta_fast=16.0, beta_slow=2.0)),
    "qwen2-yarn-attention-factor": lambda: T.Qwen2Config(**_COMMON, rope_parameters=dict(
        _YARN, attention_factor=0.9)),
    # partial rotary, a head size that is no power of two: 80 / 4 = 20, rotary dim 8
    "phi-yarn-partial": lambda: T.PhiConfig(**{**_COMMON, "hidden_size": 80}, partial_rotary_factor=0.4,
                                            rope_parameters=dict(_YARN)),
    # Phi-3.5-mini style: factors from config.json, factor from max / original, top-level original length
    "phi3-longrope": lambda: T.Phi3Config(**_COMMON, original_max_position_embeddings=ORIGINAL,
                                          rope_parameters=_longrope(8)),
    # Phi-4-mini style: partial rotary (head 24, rotary dim 18: 9 factors)
    "phi3-longrope-partial": lambda: T.Phi3Config(**{**_COMMON, "hidden_size": 96}, partial_rotary_factor=0.75,
                                                  original_max_position_embeddings=ORIGINAL,
                                                  rope_parameters=_longrope(9)),
    "llama-longrope": lambda: T.LlamaConfig(**_COMMON, rope_parameters=dict(
        _longrope(8), original_max_position_embeddings=ORIGINAL)),
    "llama-dynamic": lambda: T.LlamaConfig(**{**_COMMON, "max_position_embeddings": ORIGINAL},
                                           rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
    "qwen2-dynamic": lambda: T.Qwen2Config(**{**_COMMON, "max_position_embeddings": ORIGINAL},
                                           rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=3.0)),
}


def build(name: str, tmp_path_factory):
    """(transformers model, our LLM loaded from its saved checkpoint), random weights, float32."""
    torch.manual_seed(0)
    config = CONFIGS[name]()
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory, safe_serialization=True)
    return model, lucidlm.LLM.load(directory)


def greedy(hf, llm, ids: torch.Tensor, new: int, chunk_size: int = 256) -> tuple[list[int], list[int]]:
    """transformers' ``generate`` and our ``generate_ids`` (through the cache), greedy, no stop token.
    ``chunk_size`` below the prompt: a dense cache's prefill still runs as one forward."""
    hf.generation_config.eos_token_id = None  # a random model may pick token 2: neither side stops
    expected = hf.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    got = [t[0] for t in generate_ids(llm.model, [ids[0].tolist()], max_new_tokens=new, chunk_size=chunk_size)]
    assert len(expected) == new
    return expected, got


def prompt(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_short_and_long_prompts(name, tmp_path_factory):
    hf, llm = build(name, tmp_path_factory)
    # dynamic: each forward moves transformers' state; the same order runs through ours
    for length in (ORIGINAL - 12, ORIGINAL + 16, ORIGINAL + 24, ORIGINAL + 8, ORIGINAL - 4):
        ids = prompt(length, seed=length)
        with torch.no_grad():
            expected, got = hf(ids).logits, llm.model(ids)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5, msg=f"{name}, {length} tokens")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_frequencies_are_bit_equal(name, tmp_path_factory):
    """Frequencies and attention factor, computed operation for operation as transformers does:
    equal to the last bit, before the switch, after it, growing and reset (dynamic)."""
    hf, llm = build(name, tmp_path_factory)
    rotary_hf, rotary = hf.model.rotary_emb, llm.model.layers[0].attn.rotary
    assert rotary.scale == rotary_hf.attention_scaling
    x = torch.zeros(1)
    for length in (ORIGINAL - 12, ORIGINAL, ORIGINAL + 1, ORIGINAL + 30, ORIGINAL + 20, ORIGINAL - 1):
        positions = torch.arange(length)[None]
        rotary_hf(x, positions)
        torch.testing.assert_close(rotary.frequencies(positions), rotary_hf.inv_freq, atol=0, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_tokens_through_the_cache_cross_the_switch(name, tmp_path_factory):
    hf, llm = build(name, tmp_path_factory)
    for length, new, chunk in ((ORIGINAL - 12, 30, 256), (ORIGINAL - 1, 6, 256), (ORIGINAL + 4, 8, 8)):
        ids = prompt(length, seed=100 + length)
        with torch.no_grad():
            expected, got = greedy(hf, llm, ids, new, chunk)
        assert got == expected, f"{name}: prompt of {length} tokens"


def test_longrope_recompute_matters(tmp_path_factory):
    """The Phi-3 test above can fail: keeping the short-factor keys past the switch (Llama's rule)
    gives other logits than recomputing them with the long factors (Phi-3's rule)."""
    _, llm = build("phi3-longrope", tmp_path_factory)
    ids = prompt(ORIGINAL + 1, seed=7)
    with torch.no_grad():
        full = llm.model(ids)[:, -1]
        cache = lucidlm.cache.dense_cache(llm.config, batch=1, capacity=64)
        llm.model(ids[:, :-1], cache=cache)
        kept = llm.model(ids[:, -1:], cache=cache)[:, -1]
    assert (full - kept).abs().max() > 1e-3


def test_dynamic_state_follows_transformers_across_generations(tmp_path_factory):
    """Two generations in a row: the second starts with the NTK base the first one grew."""
    hf, llm = build("llama-dynamic", tmp_path_factory)
    for length, new in ((ORIGINAL - 8, 24), (ORIGINAL + 2, 4), (ORIGINAL - 20, 4)):
        ids = prompt(length, seed=200 + length)
        with torch.no_grad():
            expected, got = greedy(hf, llm, ids, new)
        assert got == expected, f"prompt of {length} tokens"


@pytest.mark.parametrize("name", ["phi3-longrope", "llama-longrope", "llama-dynamic"])
def test_left_padded_batch_through_the_cache(name, tmp_path_factory):
    """Two prompts of different lengths in one batch (left padding for transformers, our packed
    prefill): the sequence length is the longest row's, on both sides."""
    hf, llm = build(name, tmp_path_factory)
    prompts = [prompt(ORIGINAL - 10, seed=11)[0].tolist(), prompt(ORIGINAL - 16, seed=12)[0].tolist()]
    width, new = len(prompts[0]), 24
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                               pad_token_id=0)[:, width:].tolist()
        steps = list(generate_ids(llm.model, prompts, max_new_tokens=new))
    assert [[s[row] for s in steps] for row in range(2)] == expected


@pytest.mark.skipif(missing_compiler(torch.device("cpu")) is not None,
                    reason="TorchInductor needs a C++ compiler (g++/clang++), none installed")
@pytest.mark.parametrize("name", ["phi3-longrope", "llama-yarn", "llama-dynamic"])
def test_compiled_decode_steps(name, tmp_path_factory):
    """LongRoPE's choice is a torch.where and YaRN's frequencies are fixed: their decode steps
    compile (Phi-3's recompute at the switch prepares the new cache again); dynamic NTK keeps host
    state, so its steps run eagerly (no graph, no warning). Tokens equal transformers' either way."""
    hf, llm = build(name, tmp_path_factory)
    ids = prompt(ORIGINAL - 12, seed=5)
    decoder = CompiledDecoder(llm.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallback)
        got = [t[0] for t in generate_ids(llm.model, [ids[0].tolist()], max_new_tokens=30, decoder=decoder)]
    expected, _ = greedy(hf, llm, ids, 30)
    assert got == expected
    assert (decoder._compiled is None) == (name == "llama-dynamic")


# ---- bad input: a typed ConfigError naming the field ----------------------------------------------
def _hf(**changes) -> dict:
    base = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=96, hidden_size=64,
                intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    return {**base, **changes}


@pytest.mark.parametrize("hf, field", [
    (_hf(rope_scaling={"rope_type": "frobnicate", "factor": 2.0}), "frobnicate"),
    (_hf(rope_scaling={"rope_type": "yarn", "factor": 0.0, "original_max_position_embeddings": 32}), "factor"),
    (_hf(rope_scaling={"rope_type": "yarn", "factor": -2, "original_max_position_embeddings": 32}), "factor"),
    (_hf(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 7,
                       "original_max_position_embeddings": 32}), "long_factor"),
    (_hf(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [1.0] * 8,
                       "original_max_position_embeddings": 32}), "short_factor"),
    (_hf(rope_scaling={"rope_type": "dynamic"}), "factor"),
])
def test_bad_rope_configs_are_named(hf, field):
    with pytest.raises(ConfigError, match=field):
        Config.from_hf(hf)


def test_yarn_with_an_odd_rotary_dim_is_refused_as_transformers_fails():
    # head 20 * 0.25 = 5 rotary dims: transformers' YaRN ramp has 2 entries for 3 frequencies
    odd = dict(hidden_size=80, partial_rotary_factor=0.25, rope_parameters=dict(_YARN))
    with pytest.raises(RuntimeError, match="size"):
        T.AutoModelForCausalLM.from_config(T.PhiConfig(**{**_COMMON, **odd}))
    hf = dict(architectures=["PhiForCausalLM"], model_type="phi", vocab_size=96, hidden_size=80,
              intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
              partial_rotary_factor=0.25, rope_scaling=dict(_YARN))
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        Config.from_hf(hf)


def test_longrope_with_an_odd_rotary_dim_is_refused_as_transformers_cannot_run_it():
    """The seed's bug class with LongRoPE: head 20 * 0.25 = 5 rotary dims rotate 3 pairs; transformers'
    Phi-3 config demands 5 // 2 = 2 factors, and its frequencies then fail on 2 factors for 3 pairs."""
    odd = dict(hidden_size=80, partial_rotary_factor=0.25, original_max_position_embeddings=ORIGINAL)
    with pytest.raises(Exception, match="must have length 2"):  # a validation error of huggingface_hub
        T.Phi3Config(**{**_COMMON, **odd}, rope_parameters=_longrope(3))
    with pytest.raises(RuntimeError, match="size"):
        T.AutoModelForCausalLM.from_config(T.Phi3Config(**{**_COMMON, **odd}, rope_parameters=_longrope(2)))
    hf = dict(architectures=["Phi3ForCausalLM"], model_type="phi3", vocab_size=96, hidden_size=80,
              intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
              partial_rotary_factor=0.25, original_max_position_embeddings=ORIGINAL, rope_scaling=_longrope(2))
    with pytest.raises(ConfigError, match="short_factor has 2 entries, expected 3"):
        Config.from_hf(hf)


@pytest.mark.parametrize("params", [
    dict(rope_type="yarn", factor=40.0, mscale=1.0, mscale_all_dim=1.0),
    dict(rope_type="yarn", factor=40.0, mscale=0.707, mscale_all_dim=0.707),
    dict(rope_type="yarn", factor=4.0),
    dict(rope_type="default"),
])
def test_mla_softmax_scale_is_transformers(params):
    """DeepSeek-V2/V3's ``q·kᵀ`` scale with ``mscale_all_dim`` folded in (for the MLA attention)."""
    from transformers.modeling_rope_utils import yarn_apply_mscale

    from lucidlm.model.rope import softmax_scale

    assert softmax_scale(192 ** -0.5, params) == yarn_apply_mscale(params, 192 ** -0.5)
