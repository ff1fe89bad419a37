"""Rotary position embeddings (RoPE), applied at explicit positions.

Convention for partial rotary (GPT-NeoX ``rotary_pct``, Phi ``partial_rotary_factor``): with
``dim = int(head_size * fraction)``, the inverse frequencies are ``base ** -(arange(0, dim, 2) / dim)``
(``ceil(dim / 2)`` of them) and the first ``2 * ceil(dim / 2)`` dimensions of each head are rotated
with the "rotate half" layout. For an odd ``dim`` that is the next even number of dimensions, with the
frequencies still divided by the odd ``dim``: exactly what transformers does today (older releases
of several models sliced ``dim`` dimensions but built ``dim + 1`` cos/sin entries, a shape bug).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def inverse_frequencies(head_size: int, fraction: float, theta: float,
                        scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """The ``ceil(dim / 2)`` inverse frequencies of RoPE, in float32, with optional scaling."""
    dim = int(head_size * fraction)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_scaling(inv_freq, scaling)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling: long wavelengths divided by ``factor``, short kept,
    a smooth interpolation between (Meta's reference implementation)."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, interleaved: bool = False):
    """cos/sin of shape (batch, 1, tokens, 2 * len(inv_freq)) for integer ``positions`` (batch, tokens);
    ``interleaved`` (Cohere, GPT-J): each frequency repeated in place (f0, f0, f1, f1 ...)."""
    freqs = positions.clamp(min=0)[..., None].float() * inv_freq.to(positions.device)
    emb = (freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1))[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x`` (batch, heads, tokens, head_size): as two halves,
    or (``interleaved``: Cohere, GPT-J) as adjacent pairs."""
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    half = n // 2
    if interleaved:
        rotated = torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out
