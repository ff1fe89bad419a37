"""DBRX and JetMoE: the ``config.json`` readers of two MoE families whose keys are their own.

DBRX nests its attention and MoE settings (``attn_config``, ``ffn_config``) and names the sizes
``d_model``/``n_heads``/``n_layers``/``max_seq_len`` (read by the generic keys). JetMoE's query
heads are ``num_key_value_heads * num_experts_per_tok``: each token's router picks
``num_experts_per_tok`` query/output projection experts, each a group of heads over the shared
keys and values (:mod:`lucidlm.model.moa`).

>>> fields = dbrx({"d_model": 64, "n_heads": 4, "attn_config": {"kv_n_heads": 2, "clip_qkv": 8},
...                "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}})
>>> fields["n_query_groups"], fields["clip_qkv"], fields["n_expert"], fields["moe_norm_p"]
(2, 8.0, 4, 1.0)
>>> fields = jetmoe({"num_key_value_heads": 2, "num_experts_per_tok": 2, "num_local_experts": 4,
...                  "kv_channels": 24, "intermediate_size": 32, "activation_function": "silu"})
>>> fields["n_head"], fields["n_query_groups"], fields["head_size"], fields["moa"]
(4, 2, 24, True)
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .fields import activation

#: transformers' DbrxAttentionConfig / DbrxFFNConfig defaults
_DBRX_ATTN = dict(clip_qkv=None, kv_n_heads=1)
_DBRX_FFN = dict(ffn_act_fn={"name": "silu"}, ffn_hidden_size=3584, moe_num_experts=4, moe_top_k=1,
                 moe_normalize_expert_weights=1.0)


def dbrx(hf: dict[str, Any]) -> dict[str, Any]:
    """DBRX: a fused, clamped ``Wqkv`` (``attn_config.clip_qkv``), bias-free LayerNorms (eps 1e-5,
    transformers' ``nn.LayerNorm`` default) and an MoE of ``ffn_config.moe_num_experts`` GLU experts,
    the top-k of the router's softmax divided by their p-norm (``moe_normalize_expert_weights``; None:
    not at all). transformers 5 reads RoPE's base from the top level only (``rope_theta`` /
    ``rope_parameters``): ``attn_config.rope_theta`` is ignored there, and so here."""
    if hf.get("tie_word_embeddings"):
        raise ConfigError("tie_word_embeddings=True: DBRX has an untied lm_head (transformers refuses it too)")
    attn = {**_DBRX_ATTN, **_sub_config(hf, "attn_config")}
    ffn = {**_DBRX_FFN, **_sub_config(hf, "ffn_config")}
    clip, p = attn["clip_qkv"], ffn["moe_normalize_expert_weights"]
    _number_or_none("attn_config.clip_qkv", clip)
    _number_or_none("ffn_config.moe_normalize_expert_weights", p)
    act = ffn["ffn_act_fn"].get("name", "silu") if isinstance(ffn["ffn_act_fn"], dict) else ffn["ffn_act_fn"]
    return {"n_query_groups": attn["kv_n_heads"], "head_size": None, "norm_eps": 1e-5,
            "clip_qkv": None if clip is None else float(clip), "intermediate_size": ffn["ffn_hidden_size"],
            "moe_intermediate_size": ffn["ffn_hidden_size"], "n_expert": ffn["moe_num_experts"],
            "n_expert_per_token": ffn["moe_top_k"], "moe_norm_topk": p is not None,
            "moe_norm_p": 1.0 if p is None else float(p), "activation": activation({"hidden_act": act})}


def jetmoe(hf: dict[str, Any]) -> dict[str, Any]:
    """JetMoE: ``num_local_experts`` attention experts and as many MLP experts, ``num_experts_per_tok``
    of each chosen per token; ``kv_channels`` is the head size; the blocks' RMSNorms have eps 1e-6
    (transformers builds them with its default), the final norm ``rms_norm_eps``."""
    experts, k = hf["num_local_experts"], hf["num_experts_per_tok"]
    if isinstance(k, bool) or not isinstance(k, int) or not isinstance(experts, int) or not 0 < k <= experts:
        raise ConfigError(f"num_experts_per_tok={k!r}: expected an integer in 1..num_local_experts={experts!r}")
    return {"n_head": hf["num_key_value_heads"] * k, "n_query_groups": hf["num_key_value_heads"],
            "head_size": hf["kv_channels"], "moa": True, "n_expert": experts, "n_expert_per_token": k,
            "moe_intermediate_size": hf["intermediate_size"], "block_norm_eps": 1e-6,
            "activation": activation({"hidden_act": hf["activation_function"]})}


def _sub_config(hf: dict[str, Any], key: str) -> dict[str, Any]:
    value = hf.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a dict of DBRX {key.split('_')[0]} settings, got {type(value).__name__}")
    return value


def _number_or_none(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise ConfigError(f"{name}={value!r}: expected a number > 0 or null")
