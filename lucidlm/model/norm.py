"""Normalisation layers. The normaliser (1/rms, 1/std) goes through ``rules.normalizer`` so that LRP
treats it as a constant (AttnLRP/CP-LRP); with explanations off that call is the identity.

:func:`rms_norm` and :func:`layer_norm` are the one rule-aware computation of each norm: lucidlm's
own modules below and the ``transformers`` norm patches (:mod:`lucidlm.hf.patches`) both call them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import rules


def _wide(dtype: torch.dtype) -> torch.dtype:
    """Norms compute in float32 at least (float64 models stay float64)."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, unit_offset: bool = False,
             cast_last: bool | None = None,
             normalizer: Callable[[torch.Tensor], torch.Tensor] = rules.normalizer) -> torch.Tensor:
    """RMSNorm in float32 at least, the normaliser 1/rms through ``normalizer`` (a constant for LRP).
    ``unit_offset``: Gemma's ``x·(1 + weight)``. ``cast_last``: multiply by the weight before casting
    back to the input dtype (Gemma, OLMo 2) rather than after (Llama); it only matters in half
    precision. Defaults to ``unit_offset``."""
    cast_last = unit_offset if cast_last is None else cast_last
    dtype, xs = x.dtype, x.to(_wide(x.dtype))
    normed = xs * normalizer(torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps))
    if weight is None:
        return normed.to(dtype)
    if unit_offset:
        weight = 1.0 + weight.to(xs.dtype)
    return (normed * weight).to(dtype) if cast_last else weight * normed.to(dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               dims: tuple[int, ...] = (-1,),
               normalizer: Callable[[torch.Tensor], torch.Tensor] = rules.normalizer) -> torch.Tensor:
    """LayerNorm over ``dims`` in float32 at least, the normaliser 1/std through ``normalizer``; the
    centring stays (it is linear)."""
    dtype, xs = x.dtype, x.to(_wide(x.dtype))
    centred = xs - xs.mean(dims, keepdim=True)
    out = centred * normalizer(torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + eps))
    if weight is not None:
        out = out * weight.to(out.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. ``unit_offset``: Gemma scales by (1 + weight)."""

    def __init__(self, size: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size) if unit_offset else torch.ones(size))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.unit_offset else self.weight.to(x.dtype)
        return rms_norm(x, weight, self.eps, self.unit_offset)


class LayerNorm(nn.Module):
    """LayerNorm with the normaliser exposed to the LRP rules. ``unit_offset``: Nemotron's
    LayerNorm1P, which scales by (1 + weight)."""

    def __init__(self, size: int, eps: float = 1e-5, bias: bool = True, weight: bool = True,
                 unit_offset: bool = False) -> None:
        super().__init__()
        init = torch.zeros(size) if unit_offset else torch.ones(size)
        self.weight = nn.Parameter(init) if weight else None  # OLMo: neither weight nor bias
        self.bias = nn.Parameter(torch.zeros(size)) if bias and weight else None
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1.0 if self.unit_offset else self.weight
        if rules.current() is None:  # fast fused kernel for plain inference
            if weight is None:  # OLMo normalises in float32
                return nn.functional.layer_norm(x.to(_wide(x.dtype)), x.shape[-1:], None, None, self.eps).to(x.dtype)
            return nn.functional.layer_norm(x, x.shape[-1:], weight, self.bias, self.eps)
        return layer_norm(x, weight, self.bias, self.eps)


class PerHeadNorm(nn.Module):
    """StableLM's q/k norm: a bias-free LayerNorm with its own weights for every head, applied to
    (batch, heads, tokens, head_size)."""

    def __init__(self, n_heads: int, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norms = nn.ModuleList(LayerNorm(size, eps, bias=False) for _ in range(n_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([norm(h) for norm, h in zip(self.norms, x.split(1, dim=1))], dim=1)


class HeadWeightsLayerNorm(nn.Module):
    """Cohere's q/k norm: a bias-free LayerNorm over head_size, in float32, with one (heads, head_size)
    weight, applied to (batch, heads, tokens, head_size)."""

    def __init__(self, n_heads: int, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_heads, size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight[:, None], None, self.eps)


def build_norm(config, size: int | None = None, eps: float | None = None) -> nn.Module:
    """The config's norm over ``size`` (default ``n_embd``) with ``eps`` (default ``norm_eps``)."""
    size, eps = size or config.n_embd, config.norm_eps if eps is None else eps
    if config.norm == "layernorm":
        return LayerNorm(size, eps, bias=config.norm_bias, weight=config.norm_affine,
                         unit_offset=config.norm_unit_offset)
    return RMSNorm(size, eps, config.norm_unit_offset)
