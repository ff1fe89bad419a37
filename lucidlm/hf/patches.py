"""Patch factories: each turns one module *instance* into its explainable twin.

A factory has the signature ``factory(module, rules) -> forward | None``. It returns the function
that replaces that instance's ``forward`` (same arguments, same result up to rounding, only the
backward pass changes), or ``None`` when the module needs no change for this method. It never
touches the module's class.

``rules`` is a :class:`Rules`: the chosen method plus the helpers of
:mod:`lucidlm.rules` bound to it, so a patch reads exactly like lucidlm's own model code
(``rules.activation(fn, x)``, ``rules.product(a, b)``, ``rules.normalizer(inv_rms)`` ...).

>>> import torch
>>> from torch import nn
>>> act = nn.SiLU()
>>> forward = activation(act, Rules("attnlrp"))
>>> x = torch.tensor([-1.0, 2.0], requires_grad=True)
>>> y = forward(x); y.sum().backward()
>>> torch.allclose(x * x.grad, y)  # identity rule: relevance passes through unchanged
True
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..methods import check_method
from ..model import norm as norms
from ..model import rules as lrp
from .attention import LRPAttentionMode, lrp_attention, lrp_config, swapped
from .experts import lrp_experts_config

Forward = Callable[..., Any]
PatchFactory = Callable[[nn.Module, "Rules"], Forward | None]

TEXT_METHODS = lrp.METHODS
IMAGE_METHODS = (*lrp.METHODS, "gamma")  # LRP-γ for convolutions and linear layers of vision models


@dataclass(frozen=True)
class Rules:
    """The explanation method a patched model runs with, and the LRP helpers bound to it.

    ``method="gamma"`` (images) is CP-LRP plus the LRP-γ rule on linear and convolution layers,
    the pairing LXT uses for ViTs; ``gamma_conv``/``gamma_linear`` are its γ values.
    """

    method: str
    gamma_conv: float = 0.25
    gamma_linear: float = 0.05

    def __post_init__(self) -> None:
        check_method(self.method, IMAGE_METHODS)

    @property
    def base(self) -> str:
        """The :mod:`lucidlm.rules` method behind ``method``."""
        return "cp-lrp" if self.method == "gamma" else self.method

    @property
    def gamma(self) -> bool:
        return self.method == "gamma"

    def activation(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with lrp.explaining(self.base):
            return lrp.activation(fn, x)

    def product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with lrp.explaining(self.base):
            return lrp.product(a, b)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        with lrp.explaining(self.base):
            return lrp.gate(x)

    def bilinear(self, x: torch.Tensor) -> torch.Tensor:
        with lrp.explaining(self.base):
            return lrp.bilinear(x)

    def normalizer(self, x: torch.Tensor) -> torch.Tensor:
        with lrp.explaining(self.base):
            return lrp.normalizer(x)

    def attention_weights(self, weights: torch.Tensor) -> torch.Tensor:
        with lrp.explaining(self.base):
            return lrp.attention_weights(weights)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **sdpa_kwargs: Any) -> torch.Tensor:
        """``F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)`` with this method's rules."""
        return lrp_attention(q, k, v, **sdpa_kwargs, method=self.base)


# ----------------------------------------------------------------------------- element-wise


def activation(module: nn.Module, rules: Rules) -> Forward:
    """Identity rule around the module's own forward (SiLU, GELU, GELU-tanh, tanh ...)."""
    original = module.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fn = (lambda t: original(t, *args, **kwargs)) if args or kwargs else original
        return rules.activation(fn, x)

    return forward


def unchanged(module: nn.Module, rules: Rules) -> None:
    """For modules whose plain gradient already is the LRP rule (ReLU, Identity): nothing to do."""


# ----------------------------------------------------------------------------- norms


def _eps(module: nn.Module, x: torch.Tensor, given: float | None = None) -> float:
    if given is not None:
        return given
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if value is not None:
            return float(value)
    return torch.finfo(x.dtype).eps  # torch.nn.RMSNorm(eps=None)


def rms_norm(unit_offset: bool = False, cast_last: bool | None = None, eps: float | None = None) -> PatchFactory:
    """RMSNorm with the normaliser 1/rms detached (:func:`lucidlm.model.norm.rms_norm`).
    ``unit_offset``: Gemma's ``x·(1 + weight)``. ``cast_last``: multiply by the weight before
    casting back to the input dtype (Gemma, OLMo 2) rather than after (Llama); it only matters in
    half precision. Defaults to ``unit_offset``. ``eps``: for a module that keeps its epsilon in
    its code rather than in an attribute (``variance_epsilon``, ``eps``, ``epsilon``)."""

    def factory(module: nn.Module, rules: Rules) -> Forward:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return norms.rms_norm(x, getattr(module, "weight", None), _eps(module, x, eps), unit_offset, cast_last,
                                  normalizer=rules.normalizer)

        return forward

    return factory


def layer_norm(module: nn.Module, rules: Rules) -> Forward:
    """``nn.LayerNorm`` with the normaliser 1/std detached; the centring stays (it is linear)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(module.normalized_shape), 0))
        return norms.layer_norm(x, module.weight, module.bias, module.eps, dims, normalizer=rules.normalizer)

    return forward


def layer_norm_like(unit_offset: bool = False, eps: float | None = None) -> PatchFactory:
    """A LayerNorm written by a family itself (OLMo's without affine, Cohere's without bias, per
    head, Nemotron's LayerNorm1P with ``unit_offset``: ``x̂·(1 + weight)``): normalised over the
    last dimension (or ``normalized_shape``), weight and bias where the module has them; ``eps``
    as for :func:`rms_norm`."""

    def factory(module: nn.Module, rules: Rules) -> Forward:
        def forward(x: torch.Tensor) -> torch.Tensor:
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if unit_offset and weight is not None:
                weight = 1.0 + weight.float()
            shape = getattr(module, "normalized_shape", None)
            dims = tuple(range(-len(shape), 0)) if isinstance(shape, tuple | list) and shape else (-1,)
            return norms.layer_norm(x, weight, bias, _eps(module, x, eps), dims, normalizer=rules.normalizer)

        return forward

    return factory


# ----------------------------------------------------------------------------- feed-forward


def _call_act(act: Any, rules: Rules, x: torch.Tensor) -> torch.Tensor:
    # an activation *module* carries its own patch; a bare function gets the identity rule here
    return act(x) if isinstance(act, nn.Module) else rules.activation(act, x)


def _glu(act: Any, rules: Rules, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``act(gate) * up`` with the rules of lucidlm's :class:`~lucidlm.model.mlp.GLU`."""
    return rules.product(_call_act(act, rules, rules.gate(gate)), up)


def glu_mlp(gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj",
            act: str = "act_fn") -> PatchFactory:
    """``down(act(gate(x)) * up(x))`` (Llama family): AttnLRP's uniform rule on the gated product,
    CP-LRP's constant gate (``rules.gate``, LXT's ``cp_gated_mlp_forward``). The arguments name
    the module's attributes."""

    def factory(module: nn.Module, rules: Rules) -> Forward:
        def forward(x: torch.Tensor) -> torch.Tensor:
            hidden = _glu(getattr(module, act), rules, getattr(module, gate)(x), getattr(module, up)(x))
            return getattr(module, down)(hidden)

        return forward

    return factory


def fused_glu_mlp(gate_up: str = "gate_up_proj", down: str = "down_proj",
                  act: str = "activation_fn") -> PatchFactory:
    """GLU whose gate and up projections are one matrix, gate half first (Phi-3)."""

    def factory(module: nn.Module, rules: Rules) -> Forward:
        def forward(x: torch.Tensor) -> torch.Tensor:
            gate_states, up_states = getattr(module, gate_up)(x).chunk(2, dim=-1)
            return getattr(module, down)(_glu(getattr(module, act), rules, gate_states, up_states))

        return forward

    return factory


# ----------------------------------------------------------------------------- attention


def sdpa_attention(module: nn.Module, rules: Rules) -> Forward:
    """Any attention module: a ``transformers`` 5.x one (it has a ``config``) is routed through
    ``transformers``' attention registry to :func:`lucidlm.hf.attention.lrp_attention_function`,
    whatever implementation it was loaded with; any other module that ends in
    ``F.scaled_dot_product_attention`` gets that call replaced (see :mod:`lucidlm.hf.attention`).
    The method reaches the kernel through the rules' context variable, set for this call only."""
    original = module.forward
    config = lrp_config(module.__dict__.get("config"))

    if config is None:
        def forward(*args: Any, **kwargs: Any) -> Any:
            with LRPAttentionMode(rules.base):
                return original(*args, **kwargs)
    else:
        def forward(*args: Any, **kwargs: Any) -> Any:
            with swapped(module, "config", config), lrp.explaining(rules.base):
                return original(*args, **kwargs)

    return forward


#: the same factory under the name that says what it covers
attention = sdpa_attention


def experts(module: nn.Module, rules: Rules) -> Forward:
    """A ``transformers`` experts module (stacked expert weights): routed to
    :func:`lucidlm.hf.experts.lrp_experts_function` through ``transformers``' experts registry."""
    original = module.forward
    config = lrp_experts_config(module)

    def forward(*args: Any, **kwargs: Any) -> Any:
        with swapped(module, "config", config), lrp.explaining(rules.base):
            return original(*args, **kwargs)

    return forward


def constant_output(module: nn.Module, rules: Rules) -> Forward:
    """A router (Qwen2-MoE's ``shared_expert_gate``, DBRX's router, JetMoE's top-k gating): its
    output decides how experts are weighted, a constant for LRP as in lucidlm's native MoE
    (``rules.router_weights``). Every floating-point tensor of a tuple output is held constant;
    router logits held constant make the weights computed from them constant too."""
    original = module.forward

    def constant(value: Any) -> Any:
        return lrp.router_weights(value) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def forward(*args: Any, **kwargs: Any) -> Any:
        with lrp.explaining(rules.base):
            out = original(*args, **kwargs)
            return tuple(map(constant, out)) if isinstance(out, tuple) else constant(out)

    return forward


def dbrx_expert_glu(module: nn.Module, rules: Rules) -> Forward:
    """DBRX's ``DbrxExpertGLU.forward(x, w1, v1, w2)``, one expert's ``act(x·w1ᵀ)·(x·v1ᵀ)·w2``
    computed inside the module: the gated product gets the GLU rule. (The routing weights that
    ``DbrxExperts`` multiplies by are constant through ``DbrxRouter``'s :func:`constant_output`.)"""

    def forward(x: torch.Tensor, expert_w1: torch.Tensor, expert_v1: torch.Tensor,
                expert_w2: torch.Tensor) -> torch.Tensor:
        return _glu(module.activation_fn, rules, x.matmul(expert_w1.T), x.matmul(expert_v1.T)).matmul(expert_w2)

    return forward


def jetmoe_moe(module: nn.Module, rules: Rules) -> Forward:
    """JetMoE's ``JetMoeMoE``, which computes its experts' gated products inside its own forward:
    the same computation (tokens grouped by expert through ``JetMoeParallelExperts``, ``act(gate)
    · up`` from the two halves of ``input_linear``, the routing-weighted sum, ``bias``) with the
    GLU rule on the product; the routing weights are constant through the router's
    :func:`constant_output`. (The mixture of attention heads, ``JetMoeMoA``, is linear apart from
    its routing weights, so the router's patch is all it needs.)"""

    def forward(layer_input: torch.Tensor) -> torch.Tensor:
        batch, length, width = layer_input.size()
        flat = layer_input.reshape(-1, width)
        _, batch_index, batch_gates, expert_size, _ = module.router(flat)
        gate, up = module.input_linear(flat[batch_index], expert_size).chunk(2, dim=-1)
        hidden = _glu(module.activation, rules, gate, up)
        expert_outputs = module.output_linear(hidden, expert_size) * batch_gates[:, None]
        out = expert_outputs.new_zeros(batch * length, module.input_size).index_add(0, batch_index, expert_outputs)
        return out.view(batch, length, module.input_size) + module.bias

    return forward


def clipped_projection(clip: float, inner: PatchFactory | None = None) -> PatchFactory:
    """OLMo's ``clip_qkv``: the q/k/v projection's output clamped to ±``clip`` with the identity
    rule (as lucidlm's native attention). The attention's own in-place clamp that follows is then
    the identity with a unit gradient (clamp passes the gradient at its bounds). ``inner``: the
    module's own patch, clamped after (OLMoE clamps the output of its q/k norms)."""

    def factory(module: nn.Module, rules: Rules) -> Forward:
        original = (inner(module, rules) if inner is not None else None) or module.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            # a copy: the attention clamps it in place, which the identity rule's saved output must not see
            return rules.activation(lambda t: t.clamp(-clip, clip), original(x)).clone()

        return forward

    return factory


# ----------------------------------------------------------------------------- model level


def _map_logits(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if hasattr(out, "logits"):
        out.logits = fn(out.logits)
        return out
    return (fn(out[0]), *out[1:])


def softcapped_logits(attr: str = "final_logit_softcapping") -> PatchFactory:
    """Final-logit soft-capping ``cap·tanh(z/cap)`` (Gemma) with the identity rule. It lives inside
    the model's own forward, so we run that forward with a config copy that has no cap and apply
    the cap ourselves. With ``labels`` (a loss) the original path runs unchanged."""

    def factory(model: nn.Module, rules: Rules) -> Forward | None:
        cap = getattr(model.config, attr, None)
        if cap is None:
            return None
        original = model.forward
        uncapped = copy.copy(model.config)
        uncapped.__dict__[attr] = None

        def forward(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("labels") is not None:
                return original(*args, **kwargs)
            with swapped(model, "config", uncapped):
                out = original(*args, **kwargs)
            return _map_logits(out, lambda z: rules.activation(lambda t: torch.tanh(t / cap) * cap, z))

        return forward

    return factory


# ----------------------------------------------------------------------------- LRP-gamma


def _stabilize(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return z + ((z == 0).to(z.dtype) + z.sign()) * eps


def gamma_rule(fn: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """``fn(x, weight, bias)`` (a linear map) whose backward is the LRP-γ rule.

    Montavon et al. 2019, "Layer-Wise Relevance Propagation: An Overview", Sec. 10.2.2, in the
    sign-aware form of zennit's ``Gamma``: positive outputs are explained by the contributions
    ``x⁺·(w + γw⁺) + x⁻·(w + γw⁻)``, negative ones by ``x⁺·(w + γw⁻) + x⁻·(w + γw⁺)``. The
    forward value is exactly ``fn(x, weight, bias)``: ``y + (a − a.detach())`` adds an exact zero
    whose gradient is the rule's.
    """
    y = fn(x, weight, bias)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = weight + gamma * weight.clamp(min=0), weight + gamma * weight.clamp(max=0)
    bp = None if bias is None else bias + gamma * bias.clamp(min=0)
    bn = None if bias is None else bias + gamma * bias.clamp(max=0)
    z_pos = fn(xp, wp, bp) + fn(xn, wn, None)
    z_neg = fn(xp, wn, bn) + fn(xn, wp, None)
    z = torch.where(y > 0, z_pos, torch.where(y < 0, z_neg, torch.zeros_like(y)))
    ratio = (y / _stabilize(z)).detach()
    modified = z * ratio
    return y.detach() + (modified - modified.detach())


def gamma_linear(module: nn.Module, rules: Rules) -> Forward | None:
    """LRP-γ on ``nn.Linear`` (γ = ``rules.gamma_linear``) when the method is ``"gamma"``."""
    if not rules.gamma:
        return None
    return lambda x: gamma_rule(F.linear, x, module.weight, module.bias, rules.gamma_linear)


def gamma_conv(module: nn.Module, rules: Rules) -> Forward | None:
    """LRP-γ on ``nn.Conv1d/2d/3d`` (γ = ``rules.gamma_conv``) when the method is ``"gamma"``."""
    if not rules.gamma:
        return None
    return lambda x: gamma_rule(module._conv_forward, x, module.weight, module.bias, rules.gamma_conv)
