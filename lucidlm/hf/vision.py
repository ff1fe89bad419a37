"""torchvision's ViT: the ``nn.MultiheadAttention`` patch, and pixel relevances.

Nothing here imports torchvision: ``VisionTransformer`` is made of plain torch modules
(``Conv2d`` patchifier, ``LayerNorm``, ``MultiheadAttention``, ``Linear``/``GELU`` MLPs), so the
patches are plain torch and lucidlm works without torchvision installed.

``nn.MultiheadAttention`` calls ``F.multi_head_attention_forward``, which takes its weights as
tensors, so nothing inside it can be patched as a module. The patch recomputes the same attention
from the module's own parameters, with :func:`lucidlm.hf.attention.lrp_attention` in the middle
and the projections routed through LRP-γ when the method is ``"gamma"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ExplainError, PatchError
from .patches import Forward, Rules, gamma_rule


def _project(rules: Rules, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if rules.gamma:
        return gamma_rule(F.linear, x, weight, bias, rules.gamma_linear)
    return F.linear(x, weight, bias)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # MultiheadAttention's bool masks mean *blocked* (SDPA's mean *allowed*): go through floats
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def _mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, heads: int,
          dtype: torch.dtype) -> torch.Tensor | None:
    """MultiheadAttention's ``attn_mask`` ((L, S) or (batch·heads, L, S)) and ``key_padding_mask``
    ((batch, S)) as one additive mask broadcastable to (batch, heads, L, S)."""
    total = None
    if attn_mask is not None:
        total = _additive(attn_mask, dtype)
        if total.dim() == 3:
            total = total.view(-1, heads, *total.shape[-2:])
    if key_padding_mask is not None:
        padding = _additive(key_padding_mask, dtype)[:, None, None, :]
        total = padding if total is None else total + padding
    return total


def multihead_attention(module: nn.Module, rules: Rules) -> Forward:
    """Patch for ``nn.MultiheadAttention`` (self- or cross-attention, batch-first or not)."""
    if module.bias_k is not None or module.add_zero_attn:
        raise PatchError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")

    def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        q_in, k_in, v_in = (t.unsqueeze(1) if unbatched else t for t in (query, key, value))
        if module.batch_first and not unbatched:
            q_in, k_in, v_in = (t.transpose(0, 1) for t in (q_in, k_in, v_in))
        # from here on (sequence, batch, embed), like F.multi_head_attention_forward
        if module._qkv_same_embed_dim:
            w_q, w_k, w_v = module.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
        b_q, b_k, b_v = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.chunk(3)
        heads = module.num_heads

        def split(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            y = _project(rules, x, w, b)  # (seq, batch, embed) -> (batch, heads, seq, head_dim)
            return y.view(y.shape[0], y.shape[1], heads, -1).permute(1, 2, 0, 3)

        q, k, v = split(q_in, w_q, b_q), split(k_in, w_k, b_k), split(v_in, w_v, b_v)
        mask = _mask(attn_mask, key_padding_mask, heads, q.dtype)
        dropout = module.dropout if module.training else 0.0
        out = rules.attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                              is_causal=is_causal and mask is None)
        seq, batch = out.shape[2], out.shape[0]
        out = module.out_proj(out.permute(2, 0, 1, 3).reshape(seq, batch, -1))
        if module.batch_first and not unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        weights = _weights(q, k, mask, average_attn_weights, unbatched) if need_weights else None
        return out, weights

    return forward


def _weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, average: bool,
             unbatched: bool) -> torch.Tensor:
    """The attention weights MultiheadAttention returns with ``need_weights=True`` (no gradient:
    they are reported, not explained)."""
    with torch.no_grad():
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        if mask is not None:
            logits = logits + mask
        w = logits.softmax(-1)
        w = w.mean(1) if average else w
        return w.squeeze(0) if unbatched else w


def pixel_batch(image: Any, model: nn.Module) -> torch.Tensor:
    """``image`` ((3, H, W) or (1, 3, H, W)) as a fresh leaf batch on the model's device/dtype."""
    x = torch.as_tensor(image)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ExplainError(f"image: expected (C, H, W) or (1, C, H, W), got shape {tuple(x.shape)}")
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(param.device, param.dtype)
    return x.detach().clone().requires_grad_(True)


def display_image(pixels: torch.Tensor) -> torch.Tensor:
    """(C, H, W) in [0, 1] for the overlay: the model input rescaled per image (a normalised input
    is no picture)."""
    x = pixels.detach().float()[0]
    low, high = x.min(), x.max()
    return (x - low) / (high - low) if high > low else torch.zeros_like(x)
