"""Tiny random Hugging Face configs for every family we claim, with the options real checkpoints use.

Shared by the parity, cache and explanation tests: each entry builds a ``transformers`` config.
"""

from __future__ import annotations

import transformers as T

_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=16)


def _cfg(cls, **kw):
    return cls(**{**_COMMON, **kw})


FAMILIES = {
    "llama2": lambda: _cfg(T.LlamaConfig, num_key_value_heads=4, tie_word_embeddings=False),
    "llama3": lambda: _cfg(T.LlamaConfig, rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=False),
    "smollm2": lambda: _cfg(T.LlamaConfig, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                            rope_parameters=dict(rope_type="default", rope_theta=100000.0)),
    "mistral": lambda: _cfg(T.MistralConfig, sliding_window=5, head_dim=24),
    "mixtral": lambda: _cfg(T.MixtralConfig, num_local_experts=4, num_experts_per_tok=2, sliding_window=6),
    "qwen2": lambda: _cfg(T.Qwen2Config, tie_word_embeddings=True),
    "qwen3": lambda: _cfg(T.Qwen3Config, head_dim=24, tie_word_embeddings=False),
    "gemma2": lambda: _cfg(T.Gemma2Config, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                           attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "gemma3": lambda: _cfg(T.Gemma3TextConfig, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                                            "full_attention": dict(rope_type="linear", factor=4.0,
                                                                   rope_theta=1000000.0)}),
    "phi2": lambda: T.PhiConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                num_attention_heads=4, max_position_embeddings=128, partial_rotary_factor=0.4,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "phi3": lambda: _cfg(T.Phi3Config),
    "gpt2": lambda: T.GPT2Config(vocab_size=96, n_embd=64, n_layer=3, n_head=4, n_positions=128,
                                 bos_token_id=1, eos_token_id=2),
    # rotary_pct 0.2 * head_size 16 = 3.2 -> dim 3 (odd): transformers rotates 4 dims
    "pythia": lambda: T.GPTNeoXConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.2,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    "pythia-sequential": lambda: T.GPTNeoXConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                                 num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
                                                 use_parallel_residual=False, bos_token_id=1, eos_token_id=2,
                                                 tie_word_embeddings=False),
    "olmo2": lambda: _cfg(T.Olmo2Config),
    # c4ai-command-r-v01: no qk norm; c4ai-command-r-plus: use_qk_norm
    "cohere": lambda: _cfg(T.CohereConfig, logit_scale=0.0625, tie_word_embeddings=True),
    "cohere-qk-norm": lambda: _cfg(T.CohereConfig, logit_scale=0.8333, use_qk_norm=True, tie_word_embeddings=True),
    # granite-3.x: multipliers of the published configs (attention_multiplier is the scale)
    "granite": lambda: _cfg(T.GraniteConfig, embedding_multiplier=12.0, residual_multiplier=0.22,
                            attention_multiplier=0.0078125, logits_scaling=8.0, tie_word_embeddings=True),
    # OLMo-1B-hf: no clip; OLMo-7B-0424-hf: clip_qkv=8 (here small enough to clamp random weights)
    "olmo": lambda: _cfg(T.OlmoConfig, num_key_value_heads=4, clip_qkv=0.5),
    # SmolLM3-3B: every 4th layer without RoPE; here every 2nd, and the window on the NoPE layers
    "smollm3": lambda: _cfg(T.SmolLM3Config, num_hidden_layers=4, no_rope_layer_interval=2, use_sliding_window=True,
                            sliding_window=5, rope_parameters=dict(rope_type="default", rope_theta=5000000.0)),
    "gemma": lambda: _cfg(T.GemmaConfig, head_dim=16, num_key_value_heads=1, hidden_act="gelu"),
    # stablelm-2-1_6b: qkv bias, sequential; stablelm-2-12b: parallel residual with per-head qk norm
    "stablelm": lambda: _cfg(T.StableLmConfig, num_key_value_heads=4, use_qkv_bias=True,
                             rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25)),
    "stablelm-parallel": lambda: _cfg(T.StableLmConfig, use_qkv_bias=False, use_parallel_residual=True,
                                      qk_layernorm=True, partial_rotary_factor=0.25),
    # gpt-j-6b: rotary_dim 64 of head 256 (a quarter); here 6 of 16, interleaved pairs
    "gptj": lambda: T.GPTJConfig(vocab_size=96, n_embd=64, n_layer=3, n_head=4, n_positions=128, rotary_dim=6,
                                 bos_token_id=1, eos_token_id=2),
    # Qwen1.5-MoE-A2.7B: 60 experts, top-4, unnormalised, a gated shared expert; layer 1 dense here
    "qwen2-moe": lambda: _cfg(T.Qwen2MoeConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                              shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1]),
    # Qwen3-30B-A3B: 128 experts, top-8, normalised, no shared expert; decoder_sparse_step 2 here
    "qwen3-moe": lambda: _cfg(T.Qwen3MoeConfig, head_dim=24, num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=2,
                              tie_word_embeddings=False),
    # falcon-7b: parallel block with one shared norm, multi-query (one KV head), no biases, tied head
    "falcon": lambda: T.FalconConfig(vocab_size=96, hidden_size=64, ffn_hidden_size=96, num_hidden_layers=3,
                                     num_attention_heads=4, max_position_embeddings=128, multi_query=True,
                                     parallel_attn=True, bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # falcon-40b/180B: new decoder architecture, grouped KV heads, ln_attn and ln_mlp on the same input
    # DeepSeek: multi-head latent attention (V2: full q_proj; V3: low-rank q, sigmoid routing in groups)
    "deepseek-v2": lambda: _cfg(T.DeepseekV2Config, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
                                qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10, n_routed_experts=4,
                                num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=24,
                                first_k_dense_replace=1, tie_word_embeddings=False),
    "deepseek-v3": lambda: _cfg(T.DeepseekV3Config, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24,
                                qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10, n_routed_experts=4,
                                num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                                moe_intermediate_size=24, first_k_dense_replace=1, tie_word_embeddings=False),
    "falcon-new": lambda: T.FalconConfig(vocab_size=96, hidden_size=64, ffn_hidden_size=96, num_hidden_layers=3,
                                         num_attention_heads=4, num_kv_heads=2, max_position_embeddings=128,
                                         new_decoder_architecture=True, bias=False, bos_token_id=1, eos_token_id=2,
                                         pad_token_id=0),
    # gpt-oss-20b: sinks, biases, YaRN, even layers slide over 128 tokens, 32 experts top-4 with a
    # clamped SwiGLU (limit 7); here head size 24 (not a power of two), a window of 4 and a limit
    # small enough to clamp random weights
    "gpt-oss": lambda: _cfg(T.GptOssConfig, head_dim=24, num_local_experts=4, num_experts_per_tok=2,
                            intermediate_size=32, sliding_window=4, swiglu_limit=0.08,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                            rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=8.0, beta_fast=32.0,
                                                 beta_slow=1.0, truncate=False, original_max_position_embeddings=16)),
    # starcoder2-3b: LayerNorm, biases everywhere (use_bias), a window on every layer, tied head
    "starcoder2": lambda: _cfg(T.Starcoder2Config, sliding_window=5, use_bias=True, tie_word_embeddings=True),
    # persimmon-8b: LayerNorm, fused NeoX-style qkv, shared q/k LayerNorm, ReLU², half the head rotates;
    # here head size 20 (not a power of two) with rotary fraction 0.3 -> 6 of 20 dims
    "persimmon": lambda: T.PersimmonConfig(vocab_size=96, hidden_size=80, intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=4, max_position_embeddings=128, qk_layernorm=True,
                                           rope_parameters=dict(rope_type="default", rope_theta=25000.0,
                                                                partial_rotary_factor=0.3),
                                           bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # c4ai-command-r7b: Cohere's parallel block, 3 sliding layers (interleaved RoPE) then one full layer
    # without positions; here head size 24 (not a power of two) and a window of 4
    "cohere2": lambda: _cfg(T.Cohere2Config, head_dim=24, sliding_window=4, logit_scale=0.25,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                            rope_parameters=dict(rope_type="default", rope_theta=50000.0)),
    # EXAONE-4.0-32B: post-norms only, per-head q/k RMSNorm, 3 sliding layers then one full layer without
    # RoPE (llama3-scaled); here every 2nd layer is full, head size 24, a window of 4. EXAONE-4.0-1.2B: no
    # window, every layer full and rotating
    "exaone4": lambda: _cfg(T.Exaone4Config, head_dim=24, sliding_window=4, sliding_window_pattern=2,
                            rope_parameters=dict(_LLAMA3_ROPE, rope_theta=1000000.0, factor=16.0)),
    "exaone4-global": lambda: _cfg(T.Exaone4Config, head_dim=20, sliding_window=None,
                                   layer_types=["full_attention"] * 3,
                                   rope_parameters=dict(_LLAMA3_ROPE, rope_theta=1000000.0, factor=16.0)),
    # Olmo-3-1025-7B: OLMo 2 with 3 sliding layers per full one, YaRN on the full layers only; here
    # head size 20 and a window of 4
    "olmo3": lambda: _cfg(T.Olmo3Config, hidden_size=80, sliding_window=4,
                          layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                          rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                                           "full_attention": dict(rope_type="yarn", rope_theta=500000.0, factor=8.0,
                                                                  beta_fast=32.0, beta_slow=1.0,
                                                                  attention_factor=1.2079441541679836,
                                                                  original_max_position_embeddings=16)}),
    # dbrx-instruct: fused clamped Wqkv, bias-free LayerNorm, 16 experts top-4 whose weights are divided by
    # their p-norm (p=1); here head size 20 (not a power of two), a clip small enough to clamp random
    # weights, p=2 to tell the norm from a sum, and a top-level RoPE base (transformers 5 reads it and ignores
    # attn_config.rope_theta, which its attention still requires)
    "dbrx": lambda: T.DbrxConfig(vocab_size=96, d_model=80, n_heads=4, n_layers=3, max_seq_len=128,
                                 attn_config=dict(kv_n_heads=2, clip_qkv=0.3, rope_theta=500000.0),
                                 ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2,
                                                 moe_normalize_expert_weights=2.0),
                                 rope_parameters=dict(rope_type="default", rope_theta=5000.0),
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # jetmoe-8b: 8 attention and 8 MLP experts, top-2, 16 shared kv heads of 128; here 3 experts top-2 over
    # 2 shared heads of 24 (not a power of two), and a final-norm eps far from the blocks' fixed 1e-6
    "jetmoe": lambda: T.JetMoeConfig(vocab_size=96, hidden_size=64, intermediate_size=40, num_hidden_layers=3,
                                     num_key_value_heads=2, kv_channels=24, num_local_experts=3,
                                     num_experts_per_tok=2, max_position_embeddings=128, rms_norm_eps=0.05,
                                     rope_parameters=dict(rope_type="default", rope_theta=20000.0),
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # OLMoE-1B-7B: 64 experts top-8, unnormalised softmax routing, q/k RMSNorm over the whole projections;
    # here head size 18 (not a power of two) and a clip_qkv small enough to clamp the normalised q and k
    "olmoe": lambda: _cfg(T.OlmoeConfig, hidden_size=72, num_experts=4, num_experts_per_tok=2, intermediate_size=32,
                          norm_topk_prob=False, clip_qkv=0.9),
    # granite-3.1-1b-a400m: 32 experts top-8 (softmax over the top-k logits), Granite's multipliers, tied head;
    # here head size 20 (not a power of two)
    "granitemoe": lambda: _cfg(T.GraniteMoeConfig, hidden_size=80, num_local_experts=4, num_experts_per_tok=2,
                               intermediate_size=32, embedding_multiplier=12.0, residual_multiplier=0.22,
                               attention_multiplier=0.015625, logits_scaling=6.0, tie_word_embeddings=True),
    # Phi-3.5-MoE: LayerNorm with bias, attention and head biases, sparsemixer top-2, LongRoPE with mscales;
    # here head size 18, a window of 7, a jitter eps large enough for the sparsemixer's mask to bite, and
    # the long/short switch at 16 tokens with distinct mscales
    "phimoe": lambda: _cfg(T.PhimoeConfig, hidden_size=72, num_local_experts=4, num_experts_per_tok=2,
                           intermediate_size=32, attention_bias=True, lm_head_bias=True, sliding_window=7,
                           router_jitter_noise=0.2,
                           rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                short_factor=[1.0 + 0.1 * i for i in range(9)],
                                                long_factor=[1.0 + 0.5 * i for i in range(9)],
                                                short_mscale=1.1, long_mscale=1.3,
                                                original_max_position_embeddings=16)),
    # AFM-4.5B: ReLU² MLP (no gate); a head size that is not a power of two
    "arcee": lambda: _cfg(T.ArceeConfig, head_dim=24, hidden_act="relu2"),
    # Minitron-4B: LayerNorm1P (1 + weight), ReLU², half of each head rotates; here head size 24 with
    # fraction 0.625 -> 15 rotary dims (odd: transformers' cos/sin come out 16 wide and rotate 16)
    "nemotron": lambda: _cfg(T.NemotronConfig, head_dim=24, rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.625)),
    # Apertus-8B: xIELU learned per layer, q/k RMSNorm per head, Llama 3 RoPE (here over a short
    # original context, so that the scaling changes most frequencies); head size 24
    "apertus": lambda: _cfg(T.ApertusConfig, head_dim=24, rope_parameters=dict(
        _LLAMA3_ROPE, rope_theta=12000000.0)),
    # GLM-4-9B / GLM-4-0414: adjacent-pair rotary over part of each head; here 15 of 24 dims (odd:
    # transformers rotates 16, with frequencies over 15), q/k/v biases, no bias on o_proj
    "glm": lambda: _cfg(T.GlmConfig, head_dim=24, rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.625)),
    "glm4": lambda: _cfg(T.Glm4Config, head_dim=24, rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.625)),
    "glm4-no-bias": lambda: _cfg(T.Glm4Config, attention_bias=False),  # bias-free: CP-LRP conserves
}


def build_hf_model(family: str, seed: int = 0, dtype=None):
    """A random ``transformers`` causal LM of ``family`` (eager attention, eval mode)."""
    import torch

    torch.manual_seed(seed)
    config = FAMILIES[family]()
    config._attn_implementation = "eager"
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # random init leaves norms at 1/0 and biases at 0: perturb every tensor so no feature hides
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    return model.to(dtype) if dtype is not None else model
