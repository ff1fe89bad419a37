"""Per-family readers: each maps the keys one family (or a few) spells its own way in ``config.json``
to :class:`~lucidlm.config.Config` fields. A :class:`~lucidlm.families.Family` lists its readers;
they run after the generic keys (:func:`lucidlm.families.fields.generic_fields`) and win over them.

>>> attention_bias({"attention_bias": True})
{'attn_bias': True, 'attn_out_bias': True}
>>> qwen_windows({"num_hidden_layers": 3, "use_sliding_window": True, "sliding_window": 8,
...               "max_window_layers": 2})["layer_types"]
['full_attention', 'full_attention', 'sliding_attention']
>>> cohere2({"num_hidden_layers": 4, "sliding_window": 8, "sliding_window_pattern": 4,
...          "logit_scale": 0.25})["rope_layers"]  # Command R7B: the full layer has no positions
(True, True, True, False)
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .fields import activation, first, n_layer, rope_fields


def attention_bias(hf: dict[str, Any]) -> dict[str, Any]:  # one flag for q, k, v and o
    return {"attn_bias": bool(hf.get("attention_bias")), "attn_out_bias": bool(hf.get("attention_bias"))}


def mlp_bias(hf: dict[str, Any]) -> dict[str, Any]:
    return {"mlp_bias": bool(hf.get("mlp_bias"))}


def window_everywhere(hf: dict[str, Any]) -> dict[str, Any]:
    # Mistral, Mixtral, Phi-3: the window, when set, applies to every layer (layer_types is ignored)
    return {"sliding_window": hf.get("sliding_window"), "layer_types": None}


def phi3_longrope(hf: dict[str, Any]) -> dict[str, Any]:
    # transformers' Phi3ForCausalLM.prepare_inputs_for_generation drops the cache of a generation that
    # reaches original_max_position_embeddings + 1 tokens and recomputes it all with the long factors
    scaling = rope_fields(hf)["rope_scaling"]
    if scaling is None or scaling["rope_type"] != "longrope":
        return {}
    return {"rope_scaling": {**scaling, "recompute_at_switch": True}}


def qwen_windows(hf: dict[str, Any]) -> dict[str, Any]:
    # the window only counts with use_sliding_window, and then for layers >= max_window_layers
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    first = hf.get("max_window_layers", 28)
    types = hf.get("layer_types") or ["sliding_attention" if window is not None and i >= first
                                      else "full_attention" for i in range(n_layer(hf))]
    return {"sliding_window": window, "layer_types": types}


def every_nth_full(n: int, pattern: int) -> list[str]:
    """``layer_types`` where every ``pattern``-th layer is full and the others slide (Gemma 2/3,
    gpt-oss, Cohere2, EXAONE 4, OLMo 3 when config.json lists no layer_types)."""
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def gemma(hf: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2/3: every ``sliding_window_pattern``-th layer is global (Gemma 2: every 2nd)."""
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=True is not supported (lucidlm is causal only)")
    types = hf.get("layer_types") or every_nth_full(n_layer(hf), hf["sliding_window_pattern"])
    return {"sliding_window": hf.get("sliding_window"), "layer_types": types,
            "attn_logit_softcapping": hf.get("attn_logit_softcapping"),
            "final_logit_softcapping": hf.get("final_logit_softcapping"),
            "attention_scale": float(hf["query_pre_attn_scalar"]) ** -0.5}


def gemma3_rope(hf: dict[str, Any]) -> dict[str, Any]:
    params = hf.get("rope_parameters") or {}
    local = params.get("sliding_attention", {}).get("rope_theta") if "sliding_attention" in params else None
    return {"rope_local_theta": float(local or hf["rope_local_base_freq"])}


def moe(hf: dict[str, Any]) -> dict[str, Any]:
    return {"n_expert": hf.get("num_local_experts"), "n_expert_per_token": hf.get("num_experts_per_tok")}


def gpt2(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ConfigError("GPT2LMHeadModel with scale_attn_by_inverse_layer_idx=True is not supported")
    # GPT-2 reads neither head_dim nor intermediate_size (n_inner or 4 * n_embd)
    return {"head_size": None, "intermediate_size": hf.get("n_inner"),
            "attention_scale": None if hf.get("scale_attn_weights", True) else 1.0}


def gptj(hf: dict[str, Any]) -> dict[str, Any]:
    """GPT-J: ``rotary_dim`` dimensions of each head rotate (None: all of ``n_embd``, which only fits
    one head); neither head_dim nor intermediate_size is read (n_inner or 4 * n_embd)."""
    n_embd, n_head = first(hf, "n_embd", "hidden_size"), first(hf, "n_head", "num_attention_heads")
    head_size = n_embd // n_head
    rotary_dim = hf.get("rotary_dim") or n_embd
    if rotary_dim > head_size or rotary_dim % 2:
        raise ConfigError(f"GPTJForCausalLM with rotary_dim={rotary_dim} is not supported "
                          f"(expected an even number <= head size {head_size})")
    fraction = rotary_dim / head_size
    if int(head_size * fraction) != rotary_dim:
        raise ConfigError(f"GPTJForCausalLM: rotary_dim={rotary_dim} is not representable as a fraction of {head_size}")
    return {"head_size": None, "intermediate_size": hf.get("n_inner"), "rotary_fraction": fraction,
            "rope_theta": 10000.0, "rope_scaling": None}


def qwen_moe(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-/Qwen3-MoE: layer i is sparse unless it is in ``mlp_only_layers`` or
    ``(i + 1) % decoder_sparse_step``; experts of ``moe_intermediate_size``; Qwen2-MoE adds a gated
    shared expert (``shared_expert_intermediate_size``)."""
    n_expert = first(hf, "num_experts", "num_local_experts", default=0)  # Qwen3-MoE 5.x writes the latter
    dense = set(hf.get("mlp_only_layers") or ())
    step = hf["decoder_sparse_step"]
    sparse = [i not in dense and n_expert > 0 and (i + 1) % step == 0 for i in range(n_layer(hf))]
    if not any(sparse):
        return {"mlp": "glu", "n_expert": 0, "n_expert_per_token": 0}
    return {"n_expert": n_expert, "n_expert_per_token": hf["num_experts_per_tok"],
            "moe_intermediate_size": hf["moe_intermediate_size"], "moe_norm_topk": bool(hf["norm_topk_prob"]),
            "shared_expert_intermediate_size": hf.get("shared_expert_intermediate_size") or 0,
            "moe_layers": None if all(sparse) else tuple(sparse)}


def qwen2_moe_windows(hf: dict[str, Any]) -> dict[str, Any]:
    # Qwen2-MoE: with use_sliding_window, the even layers below max_window_layers slide
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    first = hf.get("max_window_layers", 28)
    types = hf.get("layer_types") or ["sliding_attention" if window and (i + 1) % 2 and i < first
                                      else "full_attention" for i in range(n_layer(hf))]
    return {"sliding_window": window or None, "layer_types": types}


def qwen3_moe_windows(hf: dict[str, Any]) -> dict[str, Any]:
    # Qwen3-MoE: the window, with use_sliding_window, applies to every layer
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    return {"sliding_window": window or None, "layer_types": None}


def neox(hf: dict[str, Any]) -> dict[str, Any]:
    return {"parallel_residual": bool(hf["use_parallel_residual"]), "head_size": None, **attention_bias(hf)}


def gemma1(hf: dict[str, Any]) -> dict[str, Any]:
    # GemmaConfig reads hidden_act only (not hidden_activation) and turns the legacy "gelu" into tanh
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=True is not supported (lucidlm is causal only)")
    act = hf.get("hidden_act") or "gelu_pytorch_tanh"
    return {"activation": activation({"hidden_act": "gelu_pytorch_tanh" if act == "gelu" else act})}


def stablelm(hf: dict[str, Any]) -> dict[str, Any]:
    # StableLM ignores head_dim; the shared input norm feeds both branches of the parallel block
    parallel = bool(hf.get("use_parallel_residual"))
    return {"head_size": None, "attn_bias": bool(hf.get("use_qkv_bias")), "parallel_residual": parallel,
            "shared_attention_norm": parallel, "qk_norm": "layernorm_per_head" if hf.get("qk_layernorm") else None}


def smollm3(hf: dict[str, Any]) -> dict[str, Any]:
    """SmolLM3: ``no_rope_layers`` (1 = the layer rotates; default every ``no_rope_layer_interval``-th
    layer does not); sliding windows only on layers without RoPE, and only with use_sliding_window."""
    n = n_layer(hf)
    interval = hf["no_rope_layer_interval"]
    rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    window = hf.get("sliding_window")
    types = hf.get("layer_types") or [
        "sliding_attention" if hf.get("use_sliding_window") and window is not None and not rope[i]
        else "full_attention" for i in range(n)]
    if "sliding_attention" not in types:
        window = None
    return {"rope_layers": tuple(bool(r) for r in rope[:n]), "sliding_window": window, "layer_types": types}


def olmo(hf: dict[str, Any]) -> dict[str, Any]:
    # OlmoLayerNorm has a fixed eps of 1e-5 and no parameters
    clip = hf.get("clip_qkv")
    return {"norm_eps": 1e-5, "clip_qkv": None if clip is None else float(clip), **attention_bias(hf)}


def granite(hf: dict[str, Any]) -> dict[str, Any]:
    return {"embedding_multiplier": float(hf["embedding_multiplier"]),
            "residual_multiplier": float(hf["residual_multiplier"]),
            "attention_scale": float(hf["attention_multiplier"]), "logit_scale": 1.0 / float(hf["logits_scaling"])}


def cohere(hf: dict[str, Any]) -> dict[str, Any]:
    return {"logit_scale": float(hf["logit_scale"]), **attention_bias(hf),
            "qk_norm": "layernorm_head_weights" if hf.get("use_qk_norm") else None}


def falcon(hf: dict[str, Any]) -> dict[str, Any]:
    """Falcon, as transformers' FalconDecoderLayer reads it: the old architecture (falcon-7b) is
    parallel with one shared ``input_layernorm`` (or sequential with ``parallel_attn=False``) and
    multi-query (one KV head) unless ``multi_query=False``; ``new_decoder_architecture`` (falcon-40b)
    has ``num_kv_heads`` groups and, with ``num_ln_in_parallel_attn`` 2 (its default), the norms
    ``ln_attn``/``ln_mlp`` (layout ``falcon_new``), with 1 one shared ``input_layernorm``."""
    if hf.get("alibi"):
        raise ConfigError("FalconForCausalLM with alibi=True is not supported (ALiBi positions)")
    n_head = hf["num_attention_heads"]
    kv = hf.get("num_kv_heads") or n_head
    parallel, n_ln = bool(hf.get("parallel_attn")), hf.get("num_ln_in_parallel_attn")
    layout = "falcon"
    if hf.get("new_decoder_architecture"):
        if not parallel:  # transformers builds input/post_attention norms and then calls ln_attn
            raise ConfigError("FalconForCausalLM with new_decoder_architecture=True and parallel_attn=False "
                              "is not supported (transformers cannot run it either)")
        if n_ln not in (None, 1, 2):
            raise ConfigError(f"FalconForCausalLM with num_ln_in_parallel_attn={n_ln} is not supported")
        groups, shared = kv, n_ln == 1
        layout = "falcon" if shared else "falcon_new"
    else:
        if parallel and n_ln == 2:  # transformers builds ln_attn/ln_mlp and then calls input_layernorm
            raise ConfigError("FalconForCausalLM with num_ln_in_parallel_attn=2 needs new_decoder_architecture")
        if not hf.get("multi_query") and kv != n_head:
            raise ConfigError(f"FalconForCausalLM with multi_query=False needs num_kv_heads={n_head}, got {kv}")
        groups, shared = (1 if hf.get("multi_query") else n_head), parallel
    bias = bool(hf.get("bias"))
    n_embd = first(hf, "n_embed", "hidden_size")  # FalconConfig: the legacy n_embed wins
    return {"family": layout, "n_embd": n_embd, "n_query_groups": groups, "head_size": None,
            "intermediate_size": hf.get("ffn_hidden_size") or 4 * n_embd, "parallel_residual": parallel,
            "shared_attention_norm": shared, "attn_bias": bias, "attn_out_bias": bias, "mlp_bias": bias,
            "activation": activation({"hidden_act": hf["activation"]})}


def starcoder2(hf: dict[str, Any]) -> dict[str, Any]:
    # one use_bias for q, k, v, o and both MLP projections; LayerNorm eps under its own key
    bias = bool(hf["use_bias"])
    return {"norm_eps": float(hf["norm_epsilon"]), "attn_bias": bias, "attn_out_bias": bias, "mlp_bias": bias}


def persimmon(hf: dict[str, Any]) -> dict[str, Any]:
    # Persimmon reads neither head_dim nor num_key_value_heads; a shared q/k LayerNorm over head_size
    return {"head_size": None, "n_query_groups": hf["num_attention_heads"],
            "qk_norm": "layernorm_head" if hf.get("qk_layernorm") else None}


def qkv_bias(hf: dict[str, Any]) -> dict[str, Any]:  # GLM: attention_bias on q, k, v; o_proj has none
    return {"attn_bias": bool(hf.get("attention_bias")), "attn_out_bias": False}


def nemotron(hf: dict[str, Any]) -> dict[str, Any]:
    # LayerNorm1P's eps under its own key; the head size is head_dim or hidden / heads: NemotronConfig
    # ignores the kv_channels that Nemotron-Mini-4B's config.json carries (NeMo's name; JetMoE's reads it)
    head_size = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    return {"norm_eps": float(hf["norm_eps"]), "head_size": head_size}


def phi(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("qk_layernorm"):
        raise ConfigError("PhiForCausalLM with qk_layernorm=True is not supported")
    return {}


def gpt_oss(hf: dict[str, Any]) -> dict[str, Any]:
    """gpt-oss: sinks and biases in every attention, ``layer_types`` (default: even layers slide),
    and every MLP an MoE of ``num_local_experts`` clamped-SwiGLU experts of ``intermediate_size``."""
    types = hf.get("layer_types") or every_nth_full(n_layer(hf), 2)
    return {"n_expert": hf["num_local_experts"], "n_expert_per_token": hf["num_experts_per_tok"],
            "moe_intermediate_size": hf["intermediate_size"], "swiglu_alpha": float(hf["swiglu_alpha"]),
            "swiglu_limit": float(hf["swiglu_limit"]), "sliding_window": hf.get("sliding_window"),
            "layer_types": types, **attention_bias(hf)}


def cohere2(hf: dict[str, Any]) -> dict[str, Any]:
    """Cohere2 (Command R7B / A): Cohere's parallel block without q/k norm; ``layer_types`` (default:
    every ``sliding_window_pattern``-th layer full). Only the sliding layers rotate (all of head_dim:
    Cohere2RotaryEmbedding reads no partial factor); full layers have no positions, and with
    ``sliding_window`` None no layer rotates."""
    window = hf.get("sliding_window")
    types = hf.get("layer_types") or every_nth_full(n_layer(hf), hf["sliding_window_pattern"])
    return {"logit_scale": float(hf["logit_scale"]), **attention_bias(hf), "qk_norm": None, "rotary_fraction": 1.0,
            "sliding_window": window, "layer_types": types,
            "rope_layers": tuple(window is not None and t == "sliding_attention" for t in types)}


def exaone4(hf: dict[str, Any]) -> dict[str, Any]:
    """EXAONE 4: ``layer_types`` (default: every ``sliding_window_pattern``-th layer full). With a
    ``sliding_window`` the full layers use no positions ("global NoPE"); without one every layer
    rotates and none slides."""
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if types is None:
        pattern = hf.get("sliding_window_pattern") if window is not None else None
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
            # transformers' Exaone4Config fails here too (a modulo by the pattern, 0 without a window)
            raise ConfigError(f"sliding_window_pattern={pattern!r} (sliding_window={window!r}) without layer_types: "
                              "expected layer_types, or a sliding_window and a positive integer pattern")
        types = every_nth_full(n_layer(hf), pattern)
    return {"sliding_window": window, "layer_types": types,
            "rope_layers": tuple(window is None or t == "sliding_attention" for t in types)}


#: Olmo3Config's ``default_theta``: the sliding layers' base unless rope_parameters names another
_OLMO3_THETA = 500000.0


def olmo3(hf: dict[str, Any]) -> dict[str, Any]:
    """OLMo 3: OLMo 2 with ``layer_types`` (default: every 4th layer full). RoPE per layer type: the
    full layers take ``rope_scaling`` (YaRN in the published configs) and ``rope_theta``; the sliding
    layers plain RoPE at ``rope_parameters.sliding_attention.rope_theta``, else 500000 (transformers'
    Olmo3Config hands a top-level ``rope_theta`` to the full layers only)."""
    types = hf.get("layer_types") or every_nth_full(n_layer(hf), 4)
    params = hf.get("rope_parameters") or {}
    local = params.get("sliding_attention") or {}
    local_type = local.get("rope_type", local.get("type", "default"))
    if local_type != "default":
        raise ConfigError(f"rope_parameters.sliding_attention.rope_type={local_type!r} is not supported for OLMo 3's "
                          "sliding layers (expected 'default')")
    return {"sliding_window": hf.get("sliding_window"), "layer_types": types,
            "rope_local_theta": float(local.get("rope_theta", _OLMO3_THETA)), **attention_bias(hf)}


def olmoe(hf: dict[str, Any]) -> dict[str, Any]:
    """OLMoE: every layer an MoE of ``num_experts`` experts of ``intermediate_size``; q/k RMSNorm over
    the whole projections (sized from hidden_size, so head_dim must be hidden_size / heads)."""
    heads, head_dim = hf["num_attention_heads"], hf.get("head_dim")
    if head_dim is not None and head_dim * heads != hf["hidden_size"]:
        raise ConfigError(f"OlmoeForCausalLM: head_dim={head_dim} * num_attention_heads={heads} must equal "
                          f"hidden_size={hf['hidden_size']} (its q_norm spans hidden_size)")
    clip = hf.get("clip_qkv")
    return {"n_expert": first(hf, "num_experts", "num_local_experts"), "n_expert_per_token": hf["num_experts_per_tok"],
            "moe_intermediate_size": hf["intermediate_size"], "moe_norm_topk": bool(hf["norm_topk_prob"]),
            "clip_qkv": None if clip is None else float(clip), **attention_bias(hf)}


def granitemoe(hf: dict[str, Any]) -> dict[str, Any]:
    # Granite's multipliers; every layer an MoE of num_local_experts experts of intermediate_size
    return {**granite(hf), **moe(hf), "moe_intermediate_size": hf["intermediate_size"], **attention_bias(hf)}


def phimoe(hf: dict[str, Any]) -> dict[str, Any]:
    """PhiMoE (Phi-3.5-MoE): biases where ``attention_bias``/``lm_head_bias`` say, sparsemixer top-2
    (``num_experts_per_tok`` is not read: transformers always picks two) and, for ``longrope``, the
    scaling of transformers 5.25's PhimoeRotaryEmbedding: the frequencies of ``short_factor`` at every
    length (it never passes the length), cos and sin times ``short_mscale``, or ``long_mscale`` where
    the forward runs past ``original_max_position_embeddings`` (where ``generate`` recomputes)."""
    scaling = rope_fields(hf)["rope_scaling"]
    if scaling is not None:
        if scaling["rope_type"] != "longrope":
            raise ConfigError(f"PhimoeForCausalLM: rope_scaling.rope_type {scaling['rope_type']!r} is not "
                              "supported (transformers reads its long_mscale/short_mscale, a longrope setting)")
        for key in ("short_mscale", "long_mscale"):
            if isinstance(scaling.get(key), bool) or not isinstance(scaling.get(key), (int, float)):
                raise ConfigError(f"rope_scaling.{key}={scaling.get(key)!r}: expected a number")
        scaling = {**scaling, "long_factor": scaling["short_factor"], "attention_factor": float(scaling["short_mscale"]),
                   "long_attention_factor": float(scaling["long_mscale"]), "recompute_at_switch": True}
    return {"n_expert": hf["num_local_experts"], "n_expert_per_token": 2,
            "moe_intermediate_size": hf["intermediate_size"], "moe_jitter_eps": float(hf["router_jitter_noise"]),
            "lm_head_bias": bool(hf["lm_head_bias"]), "rope_scaling": scaling, **attention_bias(hf)}
