"""Mixture-of-experts layers of ``transformers`` 5.x with the LRP rules, through its experts registry.

``transformers`` 5 stores a MoE layer's experts as stacked 3-D weights in one module whose forward
is picked from ``ALL_EXPERTS_FUNCTIONS`` (an ``ExpertsInterface``) by
``module.config._experts_implementation``, exactly as attention is picked from
``ALL_ATTENTION_FUNCTIONS``. :func:`lrp_experts_function` joins that registry under
:data:`EXPERTS_KEY`, and the patch gives each experts module a config copy naming it
(:func:`lrp_experts_config`). The rules are lucidlm's native MoE's (:mod:`lucidlm.model.mlp`):

* each expert's gated product ``act(gate)·up`` as :class:`lucidlm.model.mlp.GLU` (uniform rule;
  CP-LRP's constant gate), gpt-oss's clamped SwiGLU as :func:`lucidlm.model.mlp.clamped_swiglu`;
* the routing weights are constants for both methods (``rules.router_weights``): all relevance
  flows through what the experts compute, none through which expert was chosen.

The method is the one in force (:func:`lucidlm.model.rules.current`), set by the patched forward.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import PatchError
from ..model import rules
from ..model.mlp import clamped_swiglu

#: the key of :func:`lrp_experts_function` in ``transformers``' ``ExpertsInterface``
EXPERTS_KEY = "lucidlm_lrp"


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` experts module (``@use_experts_implementation``)."""
    return all(hasattr(module, a) for a in ("is_concatenated", "is_transposed", "has_gate", "config"))


def register_experts() -> None:
    """Put :func:`lrp_experts_function` into ``transformers``' ``ExpertsInterface`` (once)."""
    from transformers.integrations.moe import ExpertsInterface

    if ExpertsInterface._global_mapping.get(EXPERTS_KEY) is not lrp_experts_function:
        ExpertsInterface.register(EXPERTS_KEY, lrp_experts_function)


def lrp_experts_config(module: nn.Module) -> Any:
    """A shallow copy of the experts module's config that picks :data:`EXPERTS_KEY`; a
    :class:`PatchError` naming the module when its gate has no rule here."""
    gated_product(module)  # fail at patch time, not in the middle of a forward
    register_experts()
    clone = copy.copy(module.config)
    clone.__dict__["_experts_implementation_internal"] = EXPERTS_KEY
    return clone


def gated_product(module: nn.Module):
    """``fn(gate_up) -> hidden``: the module's gated non-linearity with the rules, or a
    :class:`PatchError` where it is one we have no rule for."""
    from transformers.integrations.moe import _default_apply_gate

    name = type(module).__name__
    if getattr(module, "has_post_expert_norm", False):
        raise PatchError(f"{name}: experts with a norm after each expert are not supported by lucidlm.hf")
    if not module.has_gate:
        return lambda up: _activation(module, up)
    if getattr(type(module), "_apply_gate", _default_apply_gate) is _default_apply_gate:
        return lambda gate_up: rules.product(_activation(module, rules.gate(_gate(module, gate_up))), _up(module, gate_up))
    if hasattr(module, "alpha") and hasattr(module, "limit"):  # gpt-oss: clamped SwiGLU
        return lambda gate_up: clamped_swiglu(_gate(module, gate_up), _up(module, gate_up), module.alpha, module.limit)
    raise PatchError(f"{name}: its _apply_gate has no LRP rule in lucidlm.hf (default act(gate)*up and "
                     "gpt-oss's clamped SwiGLU are known)")


def _gate(module: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    return gate_up.chunk(2, dim=-1)[0] if module.is_concatenated else gate_up[..., ::2]


def _up(module: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    return gate_up.chunk(2, dim=-1)[1] if module.is_concatenated else gate_up[..., 1::2]


def _activation(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    act = module.act_fn  # an activation module carries its own patch; a function gets the identity rule
    return act(x) if isinstance(act, nn.Module) else rules.activation(act, x)


def _project(module: nn.Module, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
    weight = getattr(module, name)[expert]
    bias = getattr(module, f"{name}_bias")[expert] if module.has_bias else None
    return x @ weight + (0 if bias is None else bias) if module.is_transposed else F.linear(x, weight, bias)


def lrp_experts_function(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """``transformers``' experts-function contract: Σ over each token's chosen experts of the
    (constant) routing weight times the expert's output, with the rules of the method in force.

    hidden_states (tokens, hidden); top_k_index, top_k_weights (tokens, k).
    """
    gated = gated_product(module)
    weights = rules.router_weights(top_k_weights)
    first = "gate_up_proj" if module.has_gate else "up_proj"
    out = torch.zeros_like(hidden_states)
    for expert in torch.unique(top_k_index).tolist():
        if not 0 <= expert < module.num_experts:
            continue  # expert parallelism's "not on this rank" slot
        token, slot = torch.where(top_k_index == expert)
        hidden = gated(_project(module, hidden_states[token], first, expert))
        expert_out = _project(module, hidden, "down_proj", expert) * weights[token, slot, None]
        out = out.index_add(0, token, expert_out.to(out.dtype))
    return out
