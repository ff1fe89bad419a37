"""DeepSeek-V2/V3 GGUF files (llama.cpp's ``deepseek2`` architecture, multi-head latent attention).

llama.cpp writes both DeepSeek generations as ``deepseek2``; the router tells them apart:
``expert_gating_func`` 2 (sigmoid, with an ``exp_probs_b`` correction bias per layer) is V3's
(``DeepseekV3ForCausalLM``), softmax or no key (files from before the key) is V2's.

What llama.cpp's converter changed, :func:`deepseek2_tensors` puts back after the renaming:

* it splits each layer's ``kv_b_proj`` (heads * (nope + v), kv_rank) into ``attn_k_b`` (heads, kv_rank,
  nope: transposed, for its absorbed MLA) and ``attn_v_b`` (heads, v, kv_rank); older files keep ``attn_kv_b``;
* V3's ``e_score_correction_bias`` became ``exp_probs_b.bias``;
* each layer's experts are stacked (the ``{}`` names unstack them).

The file writes MLA as llama.cpp runs it: one KV head (``head_count_kv`` 1), ``key_length`` and
``value_length`` of the latent; the per-head sizes are ``key_length_mla``/``value_length_mla`` (older
files: ``key_length``/``value_length``). DeepSeek's YaRN keeps ``0.1 * mscale_all_dim`` in
``rope.scaling.yarn_log_multiplier`` and not ``mscale``, which llama.cpp takes to equal it (as in every
published DeepSeek config).

Export (:func:`deepseek2_keys`, :func:`deepseek2_split`) writes what the converter writes, V3's sigmoid
gating function always (transformers 5 does not save ``scoring_func``), and refuses what this reader would
read back otherwise (V2 with renormalised weights or another routing, YaRN with mscale != mscale_all_dim).

>>> import torch
>>> k_b, v_b = torch.zeros(2, 5, 3), torch.ones(2, 4, 5)  # heads 2, kv_rank 5, nope 3, v 4
>>> fused = deepseek2_tensors({"m.self_attn.k_b_proj.weight": k_b, "m.self_attn.v_b_proj.weight": v_b})
>>> tuple(fused["m.self_attn.kv_b_proj.weight"].shape)
(14, 5)
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ExportError
from .reader import Keys
from .yarn import yarn_keys, yarn_parameters

SOFTMAX, SIGMOID = 1, 2  # llama.cpp's expert_gating_func values (0: unset, read as softmax)

DEEPSEEK2_BLOCKS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",  # V2-Lite: no low-rank q
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "attn_k_b": "self_attn.k_b_proj",  # fused with attn_v_b into kv_b_proj by deepseek2_tensors
    "attn_v_b": "self_attn.v_b_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",  # the leading dense layers
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "exp_probs_b": "mlp.gate.e_score_correction",
    "ffn_gate_exps": "mlp.experts.{}.gate_proj",
    "ffn_up_exps": "mlp.experts.{}.up_proj",
    "ffn_down_exps": "mlp.experts.{}.down_proj",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}


def deepseek2_config(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    """``config.json`` of ``DeepseekV2ForCausalLM`` (softmax routing) or ``DeepseekV3ForCausalLM``
    (sigmoid routing) from a ``deepseek2`` file's metadata.

    Raises:
        GGUFError: a key is missing or of the wrong type, or the file asks for what transformers'
            DeepSeek models do not compute (another gating function, V2 with renormalised weights,
            V3 without correction biases, attention temperature scaling, YaRN without its log multiplier).
    """
    heads, rope = k.integer("attention.head_count"), k.integer("rope.dimension_count")
    if (temperature := k.number("attention.temperature_scale", None)) is not None:
        raise k.error("attention.temperature_scale", temperature, "no attention temperature scaling")
    key = k.integer("attention.key_length_mla", None) or k.integer("attention.key_length")
    theta = k.number("rope.freq_base", 10000.0)
    return {
        "hidden_size": k.integer("embedding_length"),
        "intermediate_size": k.integer("feed_forward_length"),
        "moe_intermediate_size": k.integer("expert_feed_forward_length"),
        "num_hidden_layers": k.integer("block_count"),
        "first_k_dense_replace": k.integer("leading_dense_block_count", 0),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,  # llama.cpp's one KV head is MLA's latent: every head has its own K and V
        "q_lora_rank": k.integer("attention.q_lora_rank", None),
        "kv_lora_rank": k.integer("attention.kv_lora_rank"),
        "qk_nope_head_dim": key - rope,
        "qk_rope_head_dim": rope,
        "head_dim": rope,  # transformers' DeepSeek configs name the rotary size so
        "v_head_dim": k.integer("attention.value_length_mla", None) or k.integer("attention.value_length"),
        "rms_norm_eps": k.number("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": theta,
        "rope_parameters": _rope_parameters(k, theta),
        "max_position_embeddings": k.integer("context_length"),
        "attention_bias": any(n.endswith(".attn_kv_a_mqa.bias") for n in names),
        "hidden_act": "silu",
        "n_routed_experts": k.integer("expert_count"),
        "num_experts_per_tok": k.integer("expert_used_count"),
        "n_shared_experts": k.integer("expert_shared_count", 0),
        "routed_scaling_factor": k.number("expert_weights_scale", 1.0),
        **_routing(k, names),
    }


def _routing(k: Keys, names: frozenset[str]) -> dict[str, Any]:
    """V2's softmax router (greedy, or group-limited by the best expert of each group) or V3's sigmoid one."""
    gating = k.integer("expert_gating_func", 0)
    groups, used = k.integer("expert_group_count", None), k.integer("expert_group_used_count", None)
    normalised = k.flag("expert_weights_norm", False)
    if gating == SIGMOID:
        if not any(n.endswith(".exp_probs_b.bias") for n in names):
            raise k.error("expert_gating_func", gating, "softmax (1): a sigmoid router (DeepSeek-V3's) needs its "
                                                        "exp_probs_b correction biases, which the file lacks")
        return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "n_group": groups or 1,
                "topk_group": used or 1, "norm_topk_prob": normalised, "topk_method": "noaux_tc",
                "rope_interleave": True}
    if gating not in (0, SOFTMAX):
        raise k.error("expert_gating_func", gating, "softmax (1) or sigmoid (2)")
    if normalised:  # transformers' DeepseekV2 router never renormalises
        raise k.error("expert_weights_norm", normalised, "false with a softmax router (DeepSeek-V2's)")
    grouped = groups is not None and groups > 1
    return {"n_group": groups, "topk_group": used, "norm_topk_prob": False,
            "topk_method": "group_limited_greedy" if grouped else "greedy"}


def _rope_parameters(k: Keys, theta: float) -> dict[str, Any]:
    params = yarn_parameters(k, theta)  # transformers' and llama.cpp's YaRN both truncate DeepSeek's range
    if params["rope_type"] != "yarn":
        return params
    log_multiplier = k.number("rope.scaling.yarn_log_multiplier", None)
    if log_multiplier is None:
        raise k.error("rope.scaling.yarn_log_multiplier", None, "0.1 * mscale_all_dim, which llama.cpp's converter "
                                                                "writes for DeepSeek's YaRN")
    mscale = log_multiplier / 0.1
    return params | {"mscale": mscale, "mscale_all_dim": mscale}


def deepseek2_tensors(state: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Renamed GGUF tensors -> transformers' DeepSeek state dict: ``attn_k_b`` and ``attn_v_b`` fused back
    into ``kv_b_proj``, V3's correction bias under its own name."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.endswith(".self_attn.v_b_proj.weight"):
            continue  # fused with its k_b below
        if name.endswith(".self_attn.k_b_proj.weight"):
            v_b = state[name.replace(".k_b_proj.", ".v_b_proj.")]
            out[name.replace(".k_b_proj.", ".kv_b_proj.")] = _fuse_kv_b(value, v_b)
        elif name.endswith(".mlp.gate.e_score_correction.bias"):
            out[name.replace("e_score_correction.bias", "e_score_correction_bias")] = value
        else:
            out[name] = value
    return out


def _fuse_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """(heads, kv_rank, nope) and (heads, v, kv_rank) -> kv_b_proj's (heads * (nope + v), kv_rank)."""
    fused = torch.cat((k_b.transpose(1, 2), v_b), dim=1)
    return fused.reshape(-1, fused.shape[-1]).contiguous()


# ----------------------------------------------------------------------------- export


def deepseek2_keys(hf: dict[str, Any]) -> dict[str, Any]:
    """``deepseek2.*`` keys of a DeepSeek-V2/V3 config, as llama.cpp's converter writes them (what
    :func:`deepseek2_config` reads back).

    Raises:
        ExportError: a setting the file cannot carry or lucidlm would read back otherwise.
    """
    v3, heads, rope = hf["model_type"] == "deepseek_v3", hf["num_attention_heads"], hf["qk_rope_head_dim"]
    kv_rank, nope = hf["kv_lora_rank"], hf["qk_nope_head_dim"]
    keys = {
        "block_count": hf["num_hidden_layers"], "context_length": hf["max_position_embeddings"],
        "embedding_length": hf["hidden_size"], "feed_forward_length": hf["intermediate_size"],
        "attention.head_count": heads, "attention.head_count_kv": 1,  # MLA as llama.cpp runs it: one latent
        **_rope_keys(hf), "attention.layer_norm_rms_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "expert_count": hf["n_routed_experts"], "expert_used_count": hf["num_experts_per_tok"],
        **_routing_keys(hf, v3),
        "attention.key_length": kv_rank + rope, "attention.value_length": kv_rank,
        "leading_dense_block_count": hf.get("first_k_dense_replace") or 0, "vocab_size": hf["vocab_size"],
        **({"attention.q_lora_rank": hf["q_lora_rank"]} if hf.get("q_lora_rank") is not None else {}),
        "attention.kv_lora_rank": kv_rank, "attention.key_length_mla": nope + rope,
        "attention.value_length_mla": hf["v_head_dim"], "expert_feed_forward_length": hf["moe_intermediate_size"],
        "expert_shared_count": hf.get("n_shared_experts") or 0,
        "expert_weights_scale": float(hf.get("routed_scaling_factor", 1.0)),
        **({"expert_weights_norm": True} if hf.get("norm_topk_prob") else {}),
        "rope.dimension_count": rope,
    }
    params = _rope(hf)
    if params.get("mscale_all_dim") is not None:
        keys["rope.scaling.yarn_log_multiplier"] = 0.1 * float(params["mscale_all_dim"])
    return keys


def _refuse(hf: dict[str, Any], setting: str, why: str) -> ExportError:
    return ExportError(f"a {hf['model_type']!r} model with {setting} cannot be exported to GGUF: {why}")


def _routing_keys(hf: dict[str, Any], v3: bool) -> dict[str, Any]:
    """Routing groups and the gating function; V3's is always written (sigmoid), so that the file reads back as V3
    even where config.json lost ``scoring_func`` (transformers 5 does not save it)."""
    groups, used, method = hf.get("n_group"), hf.get("topk_group"), hf.get("topk_method")
    keys = {**({"expert_group_count": groups} if groups is not None else {}),
            **({"expert_group_used_count": used} if used is not None else {})}
    if v3:
        if not hf.get("rope_interleave", True) or method not in (None, "noaux_tc"):
            raise _refuse(hf, f"rope_interleave={hf.get('rope_interleave')}, topk_method={method!r}",
                          "llama.cpp runs DeepSeek-V3 with interleaved RoPE and noaux_tc routing")
        return keys | {"expert_gating_func": SIGMOID}
    grouped = groups is not None and groups > 1
    if hf.get("norm_topk_prob") or hf.get("scoring_func", "softmax") != "softmax" or (
            method or "greedy") != ("group_limited_greedy" if grouped else "greedy"):
        raise _refuse(hf, f"norm_topk_prob={hf.get('norm_topk_prob')}, scoring_func={hf.get('scoring_func')!r}, "
                          f"topk_method={method!r}, n_group={groups}",
                      "a DeepSeek-V2 file is read back as softmax routing without renormalisation, greedy or "
                      "group-limited (n_group > 1)")
    return keys | ({"expert_gating_func": SOFTMAX} if "scoring_func" in hf else {})


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})


def _rope_keys(hf: dict[str, Any]) -> dict[str, Any]:
    params = _rope(hf)
    base = {"rope.freq_base": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return base
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    if kind != "yarn" or not params.get("truncate", True) or mscale_all is None or mscale != mscale_all:
        raise _refuse(hf, f"{kind!r} RoPE scaling (mscale={mscale}, mscale_all_dim={mscale_all})",
                      "lucidlm reads back DeepSeek's YaRN only with mscale = mscale_all_dim, truncated, as llama.cpp")
    return yarn_keys(params) | base


def deepseek2_split(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """transformers' DeepSeek state dict -> the names and layouts llama.cpp's converter writes (before GGUF
    naming): ``kv_b_proj`` split into ``k_b`` (transposed) and ``v_b``; the inverse of :func:`deepseek2_tensors`."""
    heads, nope = config["num_attention_heads"], config["qk_nope_head_dim"]
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.endswith(".self_attn.kv_b_proj.weight"):
            per_head = value.reshape(heads, -1, value.shape[-1])  # (heads, nope + v, kv_rank)
            out[name.replace(".kv_b_proj.", ".k_b_proj.")] = per_head[:, :nope].transpose(1, 2).contiguous()
            out[name.replace(".kv_b_proj.", ".v_b_proj.")] = per_head[:, nope:].contiguous()
        elif name.endswith(".mlp.gate.e_score_correction_bias"):
            out[name.replace("e_score_correction_bias", "e_score_correction.bias")] = value
        else:
            out[name] = value
    return out
