"""Per-family ``config.json`` builders: the keys transformers' model of each GGUF architecture
reads, from the GGUF metadata (``{arch}.*`` keys, through :class:`~.reader.Keys`) and the names of
the file's tensors (a bias or norm the file holds switches it on).

Where transformers' GGUF loader drops a value the file carries (Qwen3/Gemma
``attention.key_length``, Gemma soft-caps, linear RoPE scaling, Phi-3 partial rotary) these read it
as llama.cpp does; the two agree on every checkpoint those families publish.

>>> meta = {"general.architecture": "gpt2", "gpt2.context_length": 1024, "gpt2.embedding_length": 768,
...         "gpt2.block_count": 12, "gpt2.attention.head_count": 12}
>>> config = gpt2_config(Keys(meta, "gpt2.gguf"), frozenset())
>>> config["n_embd"], config["n_positions"], config["activation_function"]
(768, 1024, 'gelu_new')
"""

from __future__ import annotations

from typing import Any

from .reader import Keys

def _has(names: frozenset[str], leaf: str) -> bool:
    """Whether any block holds ``leaf`` (``"attn_q.bias"``)."""
    return any(name.endswith("." + leaf) for name in names)


def _rope_parameters(k: Keys, theta: float) -> dict[str, Any]:
    """RoPE settings from ``rope.scaling.*``: none or linear (what llama.cpp writes for those)."""
    kind = k.text("rope.scaling.type", "linear" if k.number("rope.scale_linear", None) else "none")
    if kind == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        factor = k.number("rope.scaling.factor", None) or k.number("rope.scale_linear")
        return {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    raise k.error("rope.scaling.type", kind, "'none' or 'linear' (lucidlm implements no other RoPE scaling)")


def _decoder_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    """The keys every RoPE decoder family (Llama, Qwen, Phi-3, Gemma) spells alike."""
    hidden, heads = k.integer("embedding_length"), k.integer("attention.head_count")
    theta = k.number("rope.freq_base", 10000.0)
    return {
        "hidden_size": hidden,
        "intermediate_size": k.integer("feed_forward_length"),
        "num_hidden_layers": k.integer("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": k.integer("attention.head_count_kv", heads),
        "head_dim": k.integer("attention.key_length", hidden // heads),
        "rms_norm_eps": k.number("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": theta,
        "rope_parameters": _rope_parameters(k, theta),
        "max_position_embeddings": k.integer("context_length", None),
    }


def llama_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    if _has(names, "ffn_gate_exps.weight"):
        return mixtral_config(k, names)
    return _llama_config(k, names)


def _llama_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    config = _decoder_config(k, names)
    # older files name the head size only through the RoPE width, which equals it for Llama models
    head_dim = k.integer("attention.key_length", k.integer("rope.dimension_count", config["head_dim"]))
    return config | {
        "head_dim": head_dim,
        "hidden_act": "silu",
        "attention_bias": _has(names, "attn_q.bias"),
        "mlp_bias": _has(names, "ffn_up.bias"),
    }


def _experts(k: Keys) -> dict[str, Any]:
    return {"num_experts": k.integer("expert_count"), "num_experts_per_tok": k.integer("expert_used_count")}


def mixtral_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    # a "llama" file with ffn_*_exps tensors is Mixtral's (llama.cpp runs it without a sliding window)
    experts = _experts(k)
    return _llama_config(k, names) | {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": experts["num_experts"],
        "num_experts_per_tok": experts["num_experts_per_tok"],
        "sliding_window": None,
    }


def _qwen_moe_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    # llama.cpp runs every layer as a mixture of experts (no dense layers)
    return qwen_config(k, names) | _experts(k) | {
        "moe_intermediate_size": k.integer("expert_feed_forward_length"),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def qwen2moe_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    # Qwen1.5-MoE: a gated shared expert beside the routed ones, whose weights llama.cpp does not renormalise
    return _qwen_moe_config(k, names) | {
        "shared_expert_intermediate_size": k.integer("expert_shared_feed_forward_length"),
        "norm_topk_prob": False,
    }


def qwen3moe_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    # Qwen3-MoE: no shared expert; llama.cpp renormalises the chosen experts' weights
    return _qwen_moe_config(k, names) | {"norm_topk_prob": True}


def granite_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    # llama.cpp's converter writes each multiplier only when the config sets it (1.0 otherwise)
    return _llama_config(k, names) | {
        "embedding_multiplier": k.number("embedding_scale", 1.0),
        "residual_multiplier": k.number("residual_scale", 1.0),
        "attention_multiplier": k.number("attention.scale", 1.0),
        "logits_scaling": k.number("logit_scale", 1.0),
    }


def smollm3_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    # llama.cpp skips RoPE in every 4th layer (its n_no_rope_layer_step) and runs no sliding window
    return _llama_config(k, names) | {"no_rope_layer_interval": 4, "use_sliding_window": False}


def olmo_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    # OLMo's LayerNorm has no parameters and a fixed eps; clamp_kqv clips q, k and v
    config = _decoder_config(k, names)
    del config["rms_norm_eps"]
    return config | {"hidden_act": "silu", "attention_bias": _has(names, "attn_q.bias"),
                     "clip_qkv": k.number("attention.clamp_kqv", None)}


def olmo2_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    return _decoder_config(k, names) | {"hidden_act": "silu", "attention_bias": _has(names, "attn_q.bias")}


def qwen_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    # Qwen2 always has q/k/v biases; Qwen3 has none unless the file holds them. llama.cpp ignores
    # sliding windows for both (Qwen ships them disabled).
    return _decoder_config(k, names) | {
        "hidden_act": "silu",
        "attention_bias": _has(names, "attn_q.bias"),
        "use_sliding_window": False,
    }


def phi3_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    config = _decoder_config(k, names)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    config |= {"head_dim": head_dim, "hidden_act": "silu"}
    # Phi-4-mini rotates part of each head; llama.cpp and transformers both ignore Phi-3's
    # ``attention.sliding_window`` (0 on Phi-4)
    rotary = k.integer("rope.dimension_count", head_dim)
    if rotary != head_dim:
        config["partial_rotary_factor"] = rotary / head_dim
        config["rope_parameters"]["partial_rotary_factor"] = rotary / head_dim
    return config


def layer_types(n_layer: int, every: int) -> list[str]:
    """Every ``every``-th layer global, the others sliding (llama.cpp's ``set_swa_pattern``)."""
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layer)]


def gemma_attention_scalar(n_layer: int, hidden: int, heads: int, head_dim: int, layers_27b: int) -> int:
    """Gemma's ``query_pre_attn_scalar`` as llama.cpp derives it: ``head_dim``, except in the 27B
    models (recognised by their layer count), which use ``hidden / heads``."""
    return hidden // heads if n_layer == layers_27b else head_dim


def _gemma_config(k: Keys, names: frozenset[str], layers_27b: int) -> dict[str, Any]:
    config = _decoder_config(k, names)
    scalar = gemma_attention_scalar(config["num_hidden_layers"], config["hidden_size"],
                                    config["num_attention_heads"], config["head_dim"], layers_27b)
    return config | {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar}


def gemma2_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    config = _gemma_config(k, names, layers_27b=46)
    return config | {
        "sliding_window": k.integer("attention.sliding_window", 4096),
        "layer_types": layer_types(config["num_hidden_layers"], every=2),
        # llama.cpp's defaults when the keys are absent
        "attn_logit_softcapping": k.number("attn_logit_softcapping", 50.0),
        "final_logit_softcapping": k.number("final_logit_softcapping", 30.0),
    }


def gemma3_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    config = _gemma_config(k, names, layers_27b=62)
    window = k.integer("attention.sliding_window", 0)
    # five sliding layers per global one when the file names a window, else all global; the
    # sliding layers use RoPE base 10000 without scaling (llama.cpp hard-codes both)
    local = {"rope_type": "default", "rope_theta": k.number("rope.freq_base_swa", 10000.0)}
    config |= {
        "layer_types": layer_types(config["num_hidden_layers"], every=6 if window > 0 else 1),
        "rope_parameters": {"sliding_attention": local, "full_attention": config["rope_parameters"]},
        "attn_logit_softcapping": None,
        "final_logit_softcapping": k.number("final_logit_softcapping", None),
    }
    return config | ({"sliding_window": window} if window > 0 else {})


def gemma1_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    return _decoder_config(k, names) | {"hidden_act": "gelu_pytorch_tanh"}


def stablelm_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    config = _decoder_config(k, names)
    del config["rms_norm_eps"]  # StableLM normalises with LayerNorm
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    fraction = k.integer("rope.dimension_count", head_dim // 4) / head_dim
    config["rope_parameters"]["partial_rotary_factor"] = fraction
    # a parallel block has no norm before its MLP, so older files without the key still say which
    parallel = k.flag("use_parallel_residual", not _has(names, "ffn_norm.weight"))
    return config | {
        "head_dim": head_dim,
        "partial_rotary_factor": fraction,
        "layer_norm_eps": k.number("attention.layer_norm_epsilon", 1e-5),
        "hidden_act": "silu",
        "use_qkv_bias": _has(names, "attn_q.bias"),
        "use_parallel_residual": parallel,
        "qk_layernorm": _has(names, "attn_q_norm.weight"),
    }


def starcoder2_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    # LayerNorm with biases (use_bias: every projection has one); llama.cpp keeps no sliding window
    config = _decoder_config(k, names)
    del config["rms_norm_eps"]
    return config | {"norm_epsilon": k.number("attention.layer_norm_epsilon", 1e-5), "hidden_act": "gelu_pytorch_tanh",
                     "use_bias": _has(names, "attn_q.bias"), "sliding_window": None}


def nemotron_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    # LayerNorm1P (the file holds 1 + weight: GGUFFamily.norm_offset), a ReLU² MLP without gate, partial
    # RoPE over rope.dimension_count of each head (transformers' loader reads neither that nor key_length)
    config = _decoder_config(k, names)
    del config["rms_norm_eps"]
    fraction = _partial_rotary(k, config["head_dim"])
    config["rope_parameters"]["partial_rotary_factor"] = fraction
    return config | {"norm_eps": k.number("attention.layer_norm_epsilon", 1e-5), "hidden_act": "relu2",
                     "partial_rotary_factor": fraction, "attention_bias": _has(names, "attn_q.bias"),
                     "mlp_bias": _has(names, "ffn_up.bias")}


def falcon_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    # llama.cpp runs every Falcon as a parallel block whose attention reads attn_norm_2 when the file
    # has it (falcon-40b/180B's ln_attn; attn_norm is then ln_mlp) and attn_norm otherwise; one KV head without
    # attn_norm_2 is falcon-7b's multi-query model, anything else the new decoder architecture
    # (Falcon2-11B: grouped KV heads, one shared norm). transformers' loader reads neither (it always
    # builds falcon-7b), nor layer_norm_epsilon (it looks for layer_norm_rms_epsilon).
    hidden, heads = k.integer("embedding_length"), k.integer("attention.head_count")
    kv, two_norms = k.integer("attention.head_count_kv", 1), _has(names, "attn_norm_2.weight")
    new = two_norms or kv != 1
    theta = k.number("rope.freq_base", 10000.0)
    return {
        "hidden_size": hidden,
        "ffn_hidden_size": k.integer("feed_forward_length", 4 * hidden),
        "num_hidden_layers": k.integer("block_count"),
        "num_attention_heads": heads,
        "num_kv_heads": kv if new else heads,  # transformers' value for multi-query (it uses one)
        "multi_query": not new,
        "new_decoder_architecture": new,
        "num_ln_in_parallel_attn": (2 if two_norms else 1) if new else None,
        "parallel_attn": True,
        "alibi": False,
        "bias": _has(names, "attn_qkv.bias"),
        "activation": "gelu",
        "layer_norm_epsilon": k.number("attention.layer_norm_epsilon", 1e-5),
        "rope_theta": theta,
        "rope_parameters": _rope_parameters(k, theta),
        "max_position_embeddings": k.integer("context_length", 2048),
    }


def gpt2_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    context = k.integer("context_length")
    return {
        "n_embd": k.integer("embedding_length"),
        "n_layer": k.integer("block_count"),
        "n_head": k.integer("attention.head_count"),
        "n_positions": context,
        "n_ctx": context,
        "n_inner": k.integer("feed_forward_length", None),
        "layer_norm_epsilon": k.number("attention.layer_norm_epsilon", 1e-5),
        "activation_function": "gelu_new",
    }


def _partial_rotary(k: Keys, head_dim: int) -> float:
    """The rotated fraction of each head, from ``rope.dimension_count``."""
    return k.integer("rope.dimension_count", head_dim) / head_dim


def cohere_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    # Command-R: one LayerNorm (no bias) before a parallel attention and MLP, interleaved RoPE, logits
    # scaled by logit_scale; Command-R+ normalises each head's q and k (attn_q_norm, attn_k_norm)
    config = _decoder_config(k, names)
    del config["rms_norm_eps"]
    return config | {
        "hidden_act": "silu",
        "layer_norm_eps": k.number("attention.layer_norm_epsilon", 1e-5),
        "logit_scale": k.number("logit_scale", 1.0),
        "use_qk_norm": _has(names, "attn_q_norm.weight"),
        "attention_bias": _has(names, "attn_q.bias"),
    }


def phi2_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    # Phi-2: LayerNorm before a parallel attention and MLP, a GELU MLP, partial RoPE, an output bias
    common, theta, fraction = _layernorm_partial_rope(k)
    return common | {
        "num_key_value_heads": k.integer("attention.head_count_kv", common["num_attention_heads"]),
        "hidden_act": "gelu_new",
        "partial_rotary_factor": fraction,
        "rope_theta": theta,
        "qk_layernorm": False,
    }


def gptneox_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    # Pythia: LayerNorms, a fused per-head query_key_value (llama.cpp reorders it into [q; k; v]),
    # partial RoPE, a parallel block unless use_parallel_residual says otherwise
    common, theta, fraction = _layernorm_partial_rope(k)
    return common | {
        "hidden_act": "gelu",
        "rotary_pct": fraction,
        "rotary_emb_base": theta,
        "rope_theta": theta,
        "use_parallel_residual": k.flag("use_parallel_residual", True),
        "attention_bias": _has(names, "attn_qkv.bias"),
    }


def _layernorm_partial_rope(k: Keys) -> tuple[dict[str, Any], float, float]:
    """What Phi-2 and GPT-NeoX files share: sizes, the LayerNorm epsilon, the context and partial
    RoPE; returned with the RoPE base and the rotary fraction, which each spells its own way."""
    hidden, heads = k.integer("embedding_length"), k.integer("attention.head_count")
    theta = k.number("rope.freq_base", 10000.0)
    fraction = _partial_rotary(k, hidden // heads)
    return {
        "hidden_size": hidden,
        "intermediate_size": k.integer("feed_forward_length"),
        "num_hidden_layers": k.integer("block_count"),
        "num_attention_heads": heads,
        "layer_norm_eps": k.number("attention.layer_norm_epsilon", 1e-5),
        "rope_parameters": _rope_parameters(k, theta) | {"partial_rotary_factor": fraction},
        "max_position_embeddings": k.integer("context_length", 2048),
    }, theta, fraction
