"""DeepSeek-V2/V3: the ``config.json`` reader and the checks of multi-head latent attention's sizes
and of the grouped routing (:mod:`lucidlm.model.mla`, :class:`lucidlm.model.mlp.DeepSeekMoE`).

>>> fields = deepseek({"model_type": "deepseek_v2", "num_hidden_layers": 3, "first_k_dense_replace": 1,
...                    "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
...                    "hidden_size": 32, "num_attention_heads": 4, "n_routed_experts": 4,
...                    "num_experts_per_tok": 2})
>>> fields["head_size"], fields["moe_layers"], fields["moe_scoring"]
(12, (False, True, True), 'softmax')
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .fields import rope_fields


def deepseek(hf: dict[str, Any]) -> dict[str, Any]:
    """The MLA and MoE fields of a DeepSeek-V2 (``model_type`` ``deepseek_v2``) or V3 config.json.
    transformers' ``head_dim`` of these configs is the rotary size; q·kᵀ's per-head size is
    ``qk_nope_head_dim + qk_rope_head_dim``."""
    v3 = hf.get("model_type") == "deepseek_v3"
    nope, rope = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
    dense = hf.get("first_k_dense_replace") or 0
    layers = hf["num_hidden_layers"]
    if not (isinstance(dense, int) and 0 <= dense <= layers):
        raise ConfigError(f"first_k_dense_replace={dense!r}: expected an integer in 0..num_hidden_layers={layers}")
    experts = hf.get("n_routed_experts") or 0
    return {
        **rope_fields({**hf, "head_dim": rope}),
        "head_size": nope + rope, "n_query_groups": hf["num_attention_heads"],
        "attn_bias": bool(hf.get("attention_bias")), "attn_out_bias": bool(hf.get("attention_bias")),
        "q_lora_rank": hf.get("q_lora_rank"), "kv_lora_rank": hf["kv_lora_rank"], "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope, "v_head_dim": hf["v_head_dim"],
        "rope_interleaved": bool(hf.get("rope_interleave", True)) if v3 else True,  # V2: complex pairs
        "mlp": "deepseek_moe" if experts else "glu", "n_expert": experts,
        "n_expert_per_token": hf.get("num_experts_per_tok") or 0,
        "moe_intermediate_size": hf.get("moe_intermediate_size"),
        "moe_layers": tuple(i >= dense for i in range(layers)) if experts else None,
        "moe_scoring": "sigmoid" if v3 else "softmax",
        "topk_method": "group_limited_greedy" if v3 else (hf.get("topk_method") or "greedy"),
        "n_group": hf.get("n_group") or 1, "topk_group": hf.get("topk_group") or 1,
        "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)),
        "n_shared_experts": hf.get("n_shared_experts") or 0,
        # V2's router never renormalises (whatever norm_topk_prob says); V3's does where it is set
        "moe_norm_topk": bool(hf.get("norm_topk_prob")) and v3,
    }


def check_deepseek(c) -> None:
    """Raise :class:`ConfigError` naming the field when MLA's ranks and sizes or DeepSeek's routing
    groups do not fit the model (a no-op for a config that uses neither)."""
    if c.kv_lora_rank is not None:
        _check_mla(c)
    if c.mlp == "deepseek_moe":
        _check_routing(c)


def _check_mla(c) -> None:
    for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
        _positive(name, getattr(c, name))
    if c.q_lora_rank is not None:
        _positive("q_lora_rank", c.q_lora_rank)
    if isinstance(c.qk_nope_head_dim, bool) or not isinstance(c.qk_nope_head_dim, int) or c.qk_nope_head_dim < 0:
        raise ConfigError(f"qk_nope_head_dim={c.qk_nope_head_dim!r}: expected an integer >= 0")
    if c.qk_rope_head_dim % 2:
        raise ConfigError(f"qk_rope_head_dim={c.qk_rope_head_dim}: RoPE rotates pairs, expected an even size")
    for name in ("q_lora_rank", "kv_lora_rank"):
        rank = getattr(c, name)
        if rank is not None and rank > c.n_embd:
            raise ConfigError(f"{name}={rank} does not fit: a low rank is at most n_embd={c.n_embd}")
    if c.head_size != c.qk_nope_head_dim + c.qk_rope_head_dim:
        raise ConfigError(f"head_size={c.head_size}: multi-head latent attention's q·kᵀ size is qk_nope_head_dim + "
                          f"qk_rope_head_dim = {c.qk_nope_head_dim + c.qk_rope_head_dim}")
    if c.position_embedding != "rope":
        raise ConfigError("position_embedding must be 'rope' for multi-head latent attention (kv_lora_rank set)")


def _check_routing(c) -> None:
    per_group = c.n_expert // c.n_group if isinstance(c.n_group, int) and c.n_group > 0 else 0
    if not per_group or c.n_expert % c.n_group:
        raise ConfigError(f"n_group={c.n_group!r} must divide n_expert={c.n_expert}")
    if not (isinstance(c.topk_group, int) and 0 < c.topk_group <= c.n_group):
        raise ConfigError(f"topk_group={c.topk_group!r} must be in 1..n_group={c.n_group}")
    if c.n_expert_per_token > c.topk_group * per_group:
        raise ConfigError(f"n_expert_per_token={c.n_expert_per_token} exceeds the {c.topk_group * per_group} experts "
                          f"of topk_group={c.topk_group} groups")
    if c.moe_scoring == "sigmoid" and per_group < 2:
        raise ConfigError(f"n_group={c.n_group}: V3 ranks a group by its two best experts, expected at least 2 "
                          "experts per group")
    if c.moe_scoring not in ("softmax", "sigmoid"):
        raise ConfigError(f"moe_scoring={c.moe_scoring!r}: expected 'softmax' (V2) or 'sigmoid' (V3)")
    if c.topk_method not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"topk_method={c.topk_method!r}: expected 'greedy' or 'group_limited_greedy'")
    if isinstance(c.n_shared_experts, bool) or not isinstance(c.n_shared_experts, int) or c.n_shared_experts < 0:
        raise ConfigError(f"n_shared_experts={c.n_shared_experts!r}: expected an integer >= 0")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}: expected a positive integer")
