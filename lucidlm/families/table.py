"""The family table: :data:`FAMILIES`, every Hugging Face architecture lucidlm reads, and
:func:`register_family`, which adds one.

>>> FAMILIES["Qwen3ForCausalLM"].traits["qk_norm"], architecture_of({"model_type": "gpt2"})
('head', 'GPT2LMHeadModel')
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from ..errors import ConfigError
from ..registry import Registry
from . import readers as r
from .dbrx_jetmoe import dbrx, jetmoe
from .deepseek import deepseek
from .family import Family

_LLAMA = dict(norm="rmsnorm", mlp="glu")
_GEMMA = dict(norm="rmsnorm", mlp="glu", norm_unit_offset=True, scale_embeddings=True,
              post_attention_norm=True, post_mlp_norm=True)
#: transformers' config-class defaults for the keys we read (a key missing from config.json)
_LLAMA_DEFAULTS = dict(tie_word_embeddings=False, rms_norm_eps=1e-6, hidden_act="silu")
_GEMMA_DEFAULTS = dict(tie_word_embeddings=True, rms_norm_eps=1e-6, head_dim=256, query_pre_attn_scalar=256,
                       hidden_activation="gelu_pytorch_tanh", sliding_window=4096)
#: transformers' DeepseekV2Config/DeepseekV3Config defaults of the keys the reader reads
_DEEPSEEK_DEFAULTS = dict(rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, kv_lora_rank=512,
                          q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
_DEEPSEEK_V2_DEFAULTS = dict(_DEEPSEEK_DEFAULTS, vocab_size=102400, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                             moe_intermediate_size=1407, n_routed_experts=64, n_shared_experts=2,
                             routed_scaling_factor=1.0, topk_method="greedy", first_k_dense_replace=0)
_DEEPSEEK_V3_DEFAULTS = dict(_DEEPSEEK_DEFAULTS, vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                             num_hidden_layers=61, num_attention_heads=128, max_position_embeddings=4096,
                             moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
                             routed_scaling_factor=2.5, n_group=8, topk_group=4, num_experts_per_tok=8,
                             first_k_dense_replace=3, norm_topk_prob=True, rope_interleave=True)
#: transformers' GlmConfig/Glm4Config defaults (the same)
_GLM_DEFAULTS = dict(tie_word_embeddings=False, rms_norm_eps=1.5625e-07, hidden_act="silu", head_dim=128,
                     num_key_value_heads=2, attention_bias=True, partial_rotary_factor=0.5,
                     max_position_embeddings=131072)
_QWEN_DEFAULTS = dict(_LLAMA_DEFAULTS, sliding_window=4096, use_sliding_window=False, max_window_layers=28)

#: PhiMoE; published configs name the remote-code class PhiMoEForCausalLM (``architecture_of``)
_PHIMOE = Family("PhimoeForCausalLM", "mixtral", dict(norm="layernorm", mlp="moe", moe_routing="sparsemixer"),
                 dict(vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                      max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=1e6,
                      sliding_window=None, num_local_experts=16, router_jitter_noise=0.01, attention_bias=False,
                      lm_head_bias=False),
                 (r.phimoe, r.window_everywhere), "phimoe")


#: the families lucidlm ships
_BUILTIN = (
    Family("LlamaForCausalLM", "llama", _LLAMA, _LLAMA_DEFAULTS, (r.attention_bias, r.mlp_bias), "llama"),
    Family("MistralForCausalLM", "llama", _LLAMA, dict(_LLAMA_DEFAULTS, sliding_window=4096), (r.window_everywhere,),
           "mistral"),
    Family("MixtralForCausalLM", "mixtral", dict(_LLAMA, mlp="moe"),
           dict(_LLAMA_DEFAULTS, rms_norm_eps=1e-5, rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2),
           (r.moe, r.window_everywhere), "mixtral"),
    Family("Qwen2ForCausalLM", "llama", dict(_LLAMA, attn_bias=True), _QWEN_DEFAULTS, (r.qwen_windows,), "qwen2"),
    Family("Qwen3ForCausalLM", "llama", dict(_LLAMA, qk_norm="head"), dict(_QWEN_DEFAULTS, head_dim=128),
           (r.attention_bias, r.qwen_windows), "qwen3"),
    Family("Gemma2ForCausalLM", "gemma", _GEMMA,
           dict(_GEMMA_DEFAULTS, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
           (r.attention_bias, lambda hf: r.gemma({**hf, "sliding_window_pattern": 2})), "gemma2"),
    Family("Gemma3ForCausalLM", "gemma", dict(_GEMMA, qk_norm="head"),
           dict(_GEMMA_DEFAULTS, sliding_window_pattern=6, rope_theta=1e6, rope_local_base_freq=10000.0),
           (r.attention_bias, r.gemma, r.gemma3_rope), "gemma3_text"),
    Family("GemmaForCausalLM", "llama", dict(_LLAMA, norm_unit_offset=True, scale_embeddings=True),
           dict(tie_word_embeddings=True, rms_norm_eps=1e-6, head_dim=256, hidden_act="gelu_pytorch_tanh"),
           (r.attention_bias, r.gemma1), "gemma"),
    Family("StableLmForCausalLM", "stablelm", dict(norm="layernorm", mlp="glu"),
           dict(tie_word_embeddings=False, layer_norm_eps=1e-5, hidden_act="silu", partial_rotary_factor=0.25,
                use_qkv_bias=False, qk_layernorm=False, use_parallel_residual=False),
           (r.stablelm,), "stablelm"),
    Family("SmolLM3ForCausalLM", "llama", _LLAMA,
           dict(_LLAMA_DEFAULTS, tie_word_embeddings=True, no_rope_layer_interval=4, use_sliding_window=False),
           (r.attention_bias, r.mlp_bias, r.smollm3), "smollm3"),
    Family("OlmoForCausalLM", "llama", dict(_LLAMA, norm="layernorm", norm_affine=False),
           dict(tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=2048), (r.olmo,), "olmo"),
    Family("GraniteForCausalLM", "llama", _LLAMA,
           dict(_LLAMA_DEFAULTS, max_position_embeddings=2048, embedding_multiplier=1.0, residual_multiplier=1.0,
                attention_multiplier=1.0, logits_scaling=1.0),
           (r.attention_bias, r.mlp_bias, r.granite), "granite"),
    Family("CohereForCausalLM", "llama",
           dict(norm="layernorm", norm_bias=False, mlp="glu", parallel_residual=True, shared_attention_norm=True,
                rope_interleaved=True),
           dict(tie_word_embeddings=True, layer_norm_eps=1e-5, hidden_act="silu", max_position_embeddings=8192,
                logit_scale=0.0625, use_qk_norm=False),
           (r.cohere,), "cohere"),
    Family("Olmo2ForCausalLM", "olmo2",
           dict(_LLAMA, pre_norm=False, post_attention_norm=True, post_mlp_norm=True, qk_norm="full"),
           dict(_LLAMA_DEFAULTS, rms_norm_eps=1e-5), (r.attention_bias,), "olmo2"),
    Family("PhiForCausalLM", "phi",
           dict(norm="layernorm", mlp="mlp", attn_bias=True, attn_out_bias=True, mlp_bias=True, lm_head_bias=True,
                parallel_residual=True, shared_attention_norm=True),
           dict(tie_word_embeddings=False, layer_norm_eps=1e-5, hidden_act="gelu_new", partial_rotary_factor=0.5),
           (r.phi,), "phi"),
    Family("Phi3ForCausalLM", "phi3", _LLAMA,
           dict(_LLAMA_DEFAULTS, rms_norm_eps=1e-5, original_max_position_embeddings=4096),
           (r.window_everywhere, r.phi3_longrope), "phi3"),
    Family("GPT2LMHeadModel", "gpt2",
           dict(norm="layernorm", mlp="mlp", position_embedding="learned", attn_bias=True, attn_out_bias=True,
                mlp_bias=True),
           dict(tie_word_embeddings=True, layer_norm_epsilon=1e-5, activation_function="gelu_new", n_positions=1024),
           (r.gpt2,), "gpt2"),
    Family("GPTJForCausalLM", "gptj",
           dict(norm="layernorm", mlp="mlp", mlp_bias=True, lm_head_bias=True, parallel_residual=True,
                shared_attention_norm=True, rope_interleaved=True),
           dict(tie_word_embeddings=False, layer_norm_epsilon=1e-5, activation_function="gelu_new", n_positions=2048,
                rotary_dim=64),
           (r.gptj,), "gptj"),
    Family("Qwen2MoeForCausalLM", "qwen_moe", dict(_LLAMA, mlp="moe", attn_bias=True),
           dict(_QWEN_DEFAULTS, rope_theta=10000.0, decoder_sparse_step=1, moe_intermediate_size=1408,
                shared_expert_intermediate_size=5632, num_experts_per_tok=4, num_experts=60, norm_topk_prob=False,
                qkv_bias=True),
           (lambda hf: {"attn_bias": bool(hf["qkv_bias"])}, r.qwen_moe, r.qwen2_moe_windows), "qwen2_moe"),
    Family("Qwen3MoeForCausalLM", "qwen_moe", dict(_LLAMA, mlp="moe", qk_norm="head"),
           dict(_QWEN_DEFAULTS, rope_theta=10000.0, decoder_sparse_step=1, moe_intermediate_size=768,
                num_experts_per_tok=8, num_local_experts=128, norm_topk_prob=False),
           (r.attention_bias, r.qwen_moe, r.qwen3_moe_windows), "qwen3_moe"),
    Family("DeepseekV2ForCausalLM", "deepseek", _LLAMA, _DEEPSEEK_V2_DEFAULTS, (deepseek,), "deepseek_v2"),
    Family("DeepseekV3ForCausalLM", "deepseek", _LLAMA, _DEEPSEEK_V3_DEFAULTS, (deepseek,), "deepseek_v3"),
    Family("FalconForCausalLM", "falcon", dict(norm="layernorm", mlp="mlp"),
           dict(vocab_size=65024, hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
                layer_norm_epsilon=1e-5, max_position_embeddings=2048, tie_word_embeddings=True, alibi=False,
                new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False,
                activation="gelu"),
           (r.falcon,), "falcon"),
    Family("GPTNeoXForCausalLM", "gpt_neox", dict(norm="layernorm", mlp="mlp", mlp_bias=True),
           dict(tie_word_embeddings=False, layer_norm_eps=1e-5, hidden_act="gelu", rotary_pct=0.25,
                rotary_emb_base=10000, use_parallel_residual=True, attention_bias=True),
           (r.neox,), "gpt_neox"),
    Family("GptOssForCausalLM", "gpt_oss", dict(_LLAMA, mlp="clamped_moe", attn_sinks=True),
           dict(_LLAMA_DEFAULTS, rms_norm_eps=1e-5, head_dim=64, sliding_window=128, attention_bias=True,
                num_local_experts=128, num_experts_per_tok=4, swiglu_alpha=1.702, swiglu_limit=7.0,
                max_position_embeddings=131072, rope_theta=150000.0,
                rope_parameters=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                     original_max_position_embeddings=4096)),
           (r.gpt_oss,), "gpt_oss"),
    Family("Starcoder2ForCausalLM", "starcoder2", dict(norm="layernorm", mlp="mlp"),
           dict(tie_word_embeddings=True, norm_epsilon=1e-5, hidden_act="gelu_pytorch_tanh", num_key_value_heads=2,
                use_bias=True, max_position_embeddings=4096),
           (r.starcoder2, r.window_everywhere), "starcoder2"),
    Family("PersimmonForCausalLM", "persimmon",
           dict(norm="layernorm", mlp="mlp", attn_bias=True, attn_out_bias=True, mlp_bias=True),
           dict(tie_word_embeddings=False, layer_norm_eps=1e-5, hidden_act="relu2", partial_rotary_factor=0.5,
                rope_theta=10000.0, qk_layernorm=True, max_position_embeddings=16384),
           (r.persimmon,), "persimmon"),
    Family("Cohere2ForCausalLM", "llama",
           dict(norm="layernorm", norm_bias=False, mlp="glu", parallel_residual=True, shared_attention_norm=True,
                rope_interleaved=True),
           dict(tie_word_embeddings=True, layer_norm_eps=1e-5, hidden_act="silu", max_position_embeddings=8192,
                logit_scale=0.0625, sliding_window=4096, sliding_window_pattern=4),
           (r.cohere2,), "cohere2"),
    Family("Exaone4ForCausalLM", "olmo2", dict(_LLAMA, pre_norm=False, post_attention_norm=True, post_mlp_norm=True,
                                               qk_norm="head"),
           dict(_LLAMA_DEFAULTS, rms_norm_eps=1e-5, max_position_embeddings=2048, num_key_value_heads=32,
                sliding_window=4096, sliding_window_pattern=4),
           (r.exaone4,), "exaone4"),
    Family("Olmo3ForCausalLM", "olmo2",
           dict(_LLAMA, pre_norm=False, post_attention_norm=True, post_mlp_norm=True, qk_norm="full"),
           dict(_LLAMA_DEFAULTS, rms_norm_eps=1e-5, max_position_embeddings=2048, rope_theta=500000.0,
                sliding_window=4096),
           (r.olmo3,), "olmo3"),
    Family("DbrxForCausalLM", "dbrx", dict(norm="layernorm", norm_bias=False, mlp="dbrx_moe"),
           dict(d_model=2048, n_heads=16, n_layers=24, max_seq_len=2048, vocab_size=32000, tie_word_embeddings=False),
           (dbrx,), "dbrx"),
    Family("JetMoeForCausalLM", "jetmoe", dict(_LLAMA, mlp="jetmoe_moe"),
           dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=12, num_key_value_heads=16, kv_channels=128,
                intermediate_size=5632, max_position_embeddings=4096, activation_function="silu", num_local_experts=8,
                num_experts_per_tok=2, tie_word_embeddings=True, rms_norm_eps=1e-6),
           (jetmoe,), "jetmoe"),
    Family("OlmoeForCausalLM", "qwen_moe", dict(_LLAMA, mlp="moe", qk_norm="full"),
           dict(vocab_size=50304, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16,
                num_attention_heads=16, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5,
                tie_word_embeddings=False, attention_bias=False, num_experts=64, num_experts_per_tok=8,
                norm_topk_prob=False),
           (r.olmoe,), "olmoe"),
    Family("GraniteMoeForCausalLM", "granitemoe", dict(_LLAMA, mlp="moe", moe_routing="topk_softmax"),
           dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                tie_word_embeddings=False, attention_bias=False, embedding_multiplier=1.0, logits_scaling=1.0,
                residual_multiplier=1.0, attention_multiplier=1.0, num_local_experts=8, num_experts_per_tok=2),
           (r.granitemoe,), "granitemoe"),
    _PHIMOE,
    Family("ArceeForCausalLM", "llama", dict(norm="rmsnorm", mlp="mlp"),
           dict(_LLAMA_DEFAULTS, rms_norm_eps=1e-5, hidden_act="relu2"), (r.attention_bias, r.mlp_bias), "arcee"),
    Family("NemotronForCausalLM", "llama", dict(norm="layernorm", norm_unit_offset=True, mlp="mlp"),
           dict(tie_word_embeddings=False, norm_eps=1e-5, hidden_act="relu2", partial_rotary_factor=0.5,
                max_position_embeddings=4096),
           (r.attention_bias, r.mlp_bias, r.nemotron), "nemotron"),
    # Apertus: a plain MLP with xIELU learned per layer, q/k RMSNorm per head, Llama 3 RoPE by default
    Family("ApertusForCausalLM", "apertus", dict(norm="rmsnorm", mlp="mlp", qk_norm="head"),
           dict(tie_word_embeddings=False, rms_norm_eps=1e-5, hidden_act="xielu", max_position_embeddings=65536,
                rope_parameters=dict(rope_type="llama3", rope_theta=12000000.0, factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=8192)),
           (r.attention_bias,), "apertus"),
    # GLM-4-9B (GlmForCausalLM) and GLM-4-0414 (Glm4ForCausalLM, + a norm after attention and after the MLP):
    # half of each head rotates in adjacent pairs; q/k/v biases; a fused [gate; up] SwiGLU
    Family("GlmForCausalLM", "glm", dict(_LLAMA, rope_interleaved=True), _GLM_DEFAULTS, (r.qkv_bias,), "glm"),
    Family("Glm4ForCausalLM", "glm4", dict(_LLAMA, rope_interleaved=True, post_attention_norm=True,
                                           post_mlp_norm=True), _GLM_DEFAULTS, (r.qkv_bias,), "glm4"),
)

#: ``architectures[0]`` -> its :class:`Family` (the one family table; :func:`register_family` adds)
FAMILIES: Registry[Family] = Registry("family", ((f.architecture, f) for f in _BUILTIN))


def register_family(family: Family) -> Family:
    """Teach :meth:`~lucidlm.config.Config.from_hf` a new architecture. Its weight layout is registered with
    :func:`lucidlm.checkpoints.layouts.register_layout`; :func:`lucidlm.register_family` does both."""
    if not isinstance(family, Family):
        raise ConfigError(f"register_family: expected a Family, got {type(family).__name__}")
    FAMILIES[family.architecture] = family
    return family


#: the remote-code class names published configs give an architecture transformers spells otherwise
_ALIASES = MappingProxyType({"PhiMoEForCausalLM": "PhimoeForCausalLM"})  # microsoft/Phi-3.5-MoE-instruct


def architecture_of(raw: dict[str, Any]) -> str | None:
    """``architectures[0]`` (transformers' spelling of it), or the architecture registered for ``model_type``.

    >>> architecture_of({"architectures": ["PhiMoEForCausalLM"]})
    'PhimoeForCausalLM'
    """
    if raw.get("architectures"):
        name = raw["architectures"][0]
        return _ALIASES.get(name, name)
    return next((f.architecture for f in FAMILIES.values() if f.model_type == raw.get("model_type")), None)
