"""Normalisation layers. The normaliser (1/rms, 1/std) goes through ``rules.normalizer`` so that LRP
treats it as a constant (AttnLRP/CP-LRP); with explanations off that call is the identity."""

from __future__ import annotations

import torch
from torch import nn

from . import rules


def _wide(dtype: torch.dtype) -> torch.dtype:
    """Norms compute in float32 at least (float64 models stay float64)."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. ``unit_offset``: Gemma scales by (1 + weight)."""

    def __init__(self, size: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size) if unit_offset else torch.ones(size))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(_wide(dtype))
        inv_rms = rules.normalizer(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        weight = self.weight.to(x.dtype) + 1.0 if self.unit_offset else self.weight.to(x.dtype)
        if self.unit_offset:  # Gemma multiplies in float32, then casts
            return (x * inv_rms * weight).to(dtype)
        return weight.to(dtype) * (x * inv_rms).to(dtype)


class LayerNorm(nn.Module):
    """LayerNorm with the normaliser exposed to the LRP rules."""

    def __init__(self, size: int, eps: float = 1e-5, bias: bool = True, weight: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size)) if weight else None  # OLMo: neither weight nor bias
        self.bias = nn.Parameter(torch.zeros(size)) if bias and weight else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if rules.current() is None:  # fast fused kernel for plain inference
            if self.weight is None:  # OLMo normalises in float32
                return nn.functional.layer_norm(x.to(_wide(x.dtype)), x.shape[-1:], None, None, self.eps).to(x.dtype)
            return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        dtype = x.dtype
        x = x.to(_wide(dtype))
        centred = x - x.mean(-1, keepdim=True)
        inv_std = rules.normalizer(torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps))
        out = centred * inv_std
        if self.weight is not None:
            out = out * self.weight.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.to(dtype)


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
        dtype = x.dtype
        x = x.to(_wide(dtype))
        centred = x - x.mean(-1, keepdim=True)
        inv_std = rules.normalizer(torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps))
        return (self.weight.to(x.dtype)[:, None] * (centred * inv_std)).to(dtype)


def build_norm(config, size: int | None = None) -> nn.Module:
    size = size or config.n_embd
    if config.norm == "layernorm":
        return LayerNorm(size, config.norm_eps, bias=config.norm_bias, weight=config.norm_affine)
    return RMSNorm(size, config.norm_eps, config.norm_unit_offset)
