"""Attention with the LRP rules, and the scoped interception that routes a module's attention to it.

``transformers`` 5.x attention modules compute q, k, v themselves and hand them to an attention
*function* picked from the global ``ALL_ATTENTION_FUNCTIONS`` registry by
``module.config._attn_implementation``. Changing that registry (as LXT does for 4.x) would change
every model in the process. We leave it alone and instead:

1. give the one patched attention module its own shallow copy of the config that says ``"sdpa"``,
   so its attention (whatever the model was loaded with: eager, sdpa, ...) ends in a call to
   ``torch.nn.functional.scaled_dot_product_attention``;
2. run that module's forward under :class:`LRPAttentionMode`, a ``TorchFunctionMode`` that
   replaces exactly that call by :func:`lrp_attention` (explicit softmax, so that CP-LRP can detach
   it, and the uniform rule on q·kᵀ and A·V for AttnLRP). A torch function mode is scoped to the
   ``with`` block of the current thread: nothing outside that one forward call sees it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ..model import rules

SDPA = F.scaled_dot_product_attention


def lrp_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                  *, method: str) -> torch.Tensor:
    """Drop-in for ``F.scaled_dot_product_attention`` whose backward follows ``method``'s rules.

    The forward equals SDPA's up to rounding (softmax taken in at least float32, as
    ``transformers``' eager path does).

    >>> q = torch.randn(1, 2, 4, 8)
    >>> torch.allclose(lrp_attention(q, q, q, is_causal=True, method="cp-lrp"),
    ...                SDPA(q, q, q, is_causal=True), atol=1e-6)
    True
    """
    with rules.explaining(method):
        q, k = rules.bilinear(query), rules.bilinear(key)
        v = value
        if enable_gqa and k.shape[-3] != q.shape[-3]:  # grouped-query heads share keys and values
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        logits = (q * scale) @ k.transpose(-1, -2)
        logits = _apply_mask(logits, attn_mask, is_causal)
        # float32 softmax for half precision (as transformers' eager path); float64 stays float64
        weights = F.softmax(logits, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = rules.attention_weights(weights) @ v
        return rules.bilinear(out)


def _apply_mask(logits: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """SDPA's mask semantics: bool masks say *may attend*, float masks are added; ``is_causal`` is
    aligned top-left like SDPA's. A masked logit becomes the dtype's minimum rather than -inf, so a
    row with no visible key gives uniform weights instead of NaN."""
    low = torch.finfo(logits.dtype).min
    if is_causal:
        n_q, n_k = logits.shape[-2:]
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=logits.device).tril()
        logits = logits.masked_fill(~causal, low)
    if mask is None:
        return logits
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, low)
    return logits + mask


class LRPAttentionMode(TorchFunctionMode):
    """Inside this mode, ``F.scaled_dot_product_attention`` is :func:`lrp_attention` for ``method``.

    Every other torch call passes through unchanged.
    """

    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA:
            return lrp_attention(*args, **kwargs, method=self.method)
        return func(*args, **kwargs)


def sdpa_config(config: Any) -> Any:
    """A shallow copy of a ``transformers`` config that routes attention to SDPA, or ``config``
    itself when it already does (or is no ``transformers`` config at all).

    The private field is written directly: the public ``_attn_implementation`` setter also rewrites
    the sub-configs, which the shallow copy shares with the original.
    """
    if config is None or not hasattr(config, "_attn_implementation_internal"):
        return config
    if config._attn_implementation == "sdpa":
        return config
    clone = copy.copy(config)
    clone.__dict__["_attn_implementation_internal"] = "sdpa"
    return clone


@contextlib.contextmanager
def swapped(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name = value`` for the ``with`` block, then put the original object back."""
    if value is None or name not in obj.__dict__ or obj.__dict__[name] is value:
        yield
        return
    saved = obj.__dict__[name]
    obj.__dict__[name] = value
    try:
        yield
    finally:
        obj.__dict__[name] = saved
