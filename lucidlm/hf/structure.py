"""Patches found from what a module *is*, not from its class name: how every ``transformers``
decoder family is covered by one table row (:mod:`lucidlm.hf.models.transformers_lm`).

:func:`structural_patch` looks at one module of a model registered with ``structural=True``:

* an attention module whose forward dispatches through ``ALL_ATTENTION_FUNCTIONS``:
  :func:`~lucidlm.hf.patches.attention`;
* an experts module (``@use_experts_implementation``): :func:`~lucidlm.hf.patches.experts`;
* a gated MLP (``gate_proj``/``up_proj``/``down_proj``, or a fused ``gate_up_proj``, and an
  activation attribute): :func:`~lucidlm.hf.patches.glu_mlp` / ``fused_glu_mlp``;
* a norm (a leaf module with ``Norm`` in its class name and a weight or a ``normalized_shape``):
  RMSNorm or LayerNorm, with or without the unit offset ``1 + weight``, weight or bias;
* a ``transformers.activations`` class: the identity rule;
* a shared expert's gate (``shared_expert_gate``): a constant, as routing weights are;
* OLMo's clipped q/k/v projections (``config.clip_qkv``; DBRX's fused ``Wqkv``): the clamp's
  identity rule (OLMoE's on the outputs of its q/k norms).

A guess about a norm or an MLP is *verified*: the candidate patch runs on a random probe input
and must reproduce the module's own forward; when no candidate does, the module stays unpatched
(and :class:`~lucidlm.hf.patch.UnpatchedModuleWarning` names it) rather than be approximated.

>>> import torch
>>> from torch import nn
>>> class ShiftedNorm(nn.Module):   # a Gemma-style RMSNorm under a name no table knows
...     def __init__(self):
...         super().__init__(); self.weight = nn.Parameter(torch.randn(8)); self.eps = 1e-6
...     def forward(self, x):
...         return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)
>>> structural_patch(ShiftedNorm(), "norm", nn.Module()).__qualname__
'rms_norm.<locals>.factory'
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from . import patches
from .experts import is_experts
from .patches import PatchFactory, Rules

_ACTIVATIONS = ("act_fn", "activation_fn", "act")
#: the projections an attention with ``config.clip_qkv`` clamps -> the norm that may follow each (OLMoE)
_CLIPPED = {"q_proj": "q_norm", "k_proj": "k_norm", "v_proj": None, "Wqkv": None}
_CLIPPED_NORMS = ("q_norm", "k_norm")


def structural_patch(module: nn.Module, name: str, model: nn.Module) -> PatchFactory | None:
    """The patch factory that ``module`` (called ``name`` inside ``model``) needs, found by its
    structure, or ``None``."""
    for find in (_experts, _attention, _router_gate, _clipped, _gated_mlp, _norm, _activation):
        factory = find(module, name, model)
        if factory is not None:
            return factory
    return None


# ----------------------------------------------------------------------------- by structure


def _experts(module: nn.Module, name: str, model: nn.Module) -> PatchFactory | None:
    return patches.experts if is_experts(module) else None


def _attention(module: nn.Module, name: str, model: nn.Module) -> PatchFactory | None:
    config = module.__dict__.get("config")
    if config is None or not hasattr(config, "_attn_implementation_internal"):
        return None
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return patches.attention if code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names else None


def _router_gate(module: nn.Module, name: str, model: nn.Module) -> PatchFactory | None:
    return patches.constant_output if isinstance(module, nn.Linear) and name.endswith("shared_expert_gate") else None


def _clipped(module: nn.Module, name: str, model: nn.Module) -> PatchFactory | None:
    """The module whose output the attention clamps: q/k/v's projection (DBRX: the fused ``Wqkv``),
    or (OLMoE) the q/k norm that follows the projection, its own patch then clamped."""
    parent_name, _, attr = name.rpartition(".")
    if (attr not in _CLIPPED and attr not in _CLIPPED_NORMS) or not parent_name:
        return None
    parent = model.get_submodule(parent_name)
    clip = getattr(parent, "clip_qkv", None)  # DBRX keeps it on the attention (its config nests it)
    if clip is None:
        clip = getattr(getattr(parent, "config", None), "clip_qkv", None)
    if clip is None:
        return None
    if attr in _CLIPPED_NORMS:
        inner = _norm(module, name, model)
        return patches.clipped_projection(float(clip), inner) if inner is not None else None
    norm = _CLIPPED[attr]
    if not isinstance(module, nn.Linear) or (norm is not None and getattr(parent, norm, None) is not None):
        return None  # the clamp follows the norm
    return patches.clipped_projection(float(clip))


def _activation(module: nn.Module, name: str, model: nn.Module) -> PatchFactory | None:
    return patches.activation if type(module).__module__ == "transformers.activations" else None


def _gated_mlp(module: nn.Module, name: str, model: nn.Module) -> PatchFactory | None:
    act = next((a for a in _ACTIVATIONS if getattr(module, a, None) is not None), None)
    down = getattr(module, "down_proj", None)
    if act is None or not isinstance(down, nn.Linear):
        return None
    if isinstance(getattr(module, "gate_proj", None), nn.Linear) and isinstance(getattr(module, "up_proj", None),
                                                                               nn.Linear):
        candidate = patches.glu_mlp(act=act)
        size = module.gate_proj.in_features
    elif isinstance(getattr(module, "gate_up_proj", None), nn.Linear):
        candidate = patches.fused_glu_mlp(act=act)
        size = module.gate_up_proj.in_features
    else:
        return None
    return _verified(module, [candidate], (size,))


def _norm(module: nn.Module, name: str, model: nn.Module) -> PatchFactory | None:
    if "Norm" not in type(module).__name__ or any(True for _ in module.children()):
        return None
    weight = getattr(module, "weight", None)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else getattr(module, "normalized_shape", None)
    if not shape:
        return None
    rms_eps = ln_eps = None
    if not any(getattr(module, a, None) is not None for a in ("variance_epsilon", "eps", "epsilon")):
        rms_eps, ln_eps = _estimated_eps(module, tuple(shape))  # an epsilon written into its forward (OLMo)
    candidates = [patches.rms_norm(unit_offset=u, cast_last=c, eps=rms_eps) for u in (False, True) for c in (False, True)]
    candidates += [patches.layer_norm_like(unit_offset=u, eps=ln_eps) for u in (False, True)]
    return _verified(module, candidates, tuple(shape))


def _estimated_eps(module: nn.Module, shape: tuple[int, ...]) -> tuple[float | None, float | None]:
    """The epsilon of an RMSNorm and of a LayerNorm that would explain the module's outputs on one
    input at two scales, s and 10³·s (the weight cancels in the ratio; a bias spoils it, and the
    verification then rejects the estimate). y(s)/y(10³s) = 10⁻³·√((m₂ + ε)/(m₁ + ε)) with m the
    mean square (RMSNorm) or the variance (LayerNorm) of each input."""
    base = _probe(module, shape).double()
    small, large = base * 1e-3, base
    try:
        with torch.no_grad():
            ratio = module(small.to(_dtype(module))).double() / module(large.to(_dtype(module))).double()
    except (RuntimeError, TypeError, ValueError):
        return None, None
    q = (ratio / 1e-3).square().flatten(1).median(dim=1).values
    estimates = []
    for m1 in (small.square().mean(-1), (small - small.mean(-1, keepdim=True)).square().mean(-1)):
        m1 = m1.flatten(1)[:, 0]
        eps = (1e6 * m1 - q * m1) / (q - 1)
        estimates.append(float(eps.median()) if torch.isfinite(eps).all() and bool((eps > 0).all()) else None)
    return estimates[0], estimates[1]


# ----------------------------------------------------------------------------- verification


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def _verified(module: nn.Module, candidates: list[PatchFactory], shape: tuple[int, ...]) -> PatchFactory | None:
    """The candidate whose forward reproduces ``module``'s on a random probe input (the closest
    one, within the dtype's rounding), or ``None``."""
    if _device(module).type == "meta":
        return None
    probe = _probe(module, shape)
    probe = torch.cat([probe, probe * 1e-3]).to(_dtype(module))  # at the small scale a norm's epsilon shows
    try:
        with torch.no_grad():
            expected = module(probe).float()
            errors = [_error(factory(module, Rules("attnlrp")), probe, expected) for factory in candidates]
    except (RuntimeError, TypeError, ValueError):  # not the module we took it for
        return None
    best = min(range(len(candidates)), key=errors.__getitem__)
    return candidates[best] if errors[best] <= _tolerance(_dtype(module)) else None


def _dtype(module: nn.Module) -> torch.dtype:
    param = next(module.parameters(), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.float32


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _probe(module: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """A random input (2, 3, *shape) on the module's device, in float32; the same every time."""
    return torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(0)).to(_device(module))


def _error(forward: Callable[..., torch.Tensor] | None, probe: torch.Tensor, expected: torch.Tensor) -> float:
    if forward is None:
        return float("inf")
    got = forward(probe).float()
    if got.shape != expected.shape:
        return float("inf")
    return float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-12))
