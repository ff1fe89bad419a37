"""Attention with the LRP rules, and the scoped interception that routes a module's attention to it.

``transformers`` 5.x attention modules compute q, k, v themselves and hand them to an attention
*function* picked from the global ``ALL_ATTENTION_FUNCTIONS`` registry by
``module.config._attn_implementation``. Changing that registry (as LXT does for 4.x) would change
every model in the process. We leave it alone and instead:

1. give the one patched attention module its own shallow copy of the config that says ``"sdpa"``,
   so its attention (whatever the model was loaded with: eager, sdpa, ...) ends in a call to
   ``torch.nn.functional.scaled_dot_product_attention``;
2. run that module's forward under :class:`LRPAttentionMode`, a ``TorchFunctionMode`` that
   replaces exactly that call by :func:`lrp_attention` (SDPA with the rules on its inputs and
   output: q, k detached for CP-LRP, the uniform rule on q·kᵀ and A·V for AttnLRP). A torch
   function mode is scoped to the ``with`` block of the current thread: nothing outside that one
   forward call sees it.
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
from ..model.kernels import position_mask

SDPA = F.scaled_dot_product_attention


def lrp_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                  *, method: str) -> torch.Tensor:
    """Drop-in for ``F.scaled_dot_product_attention`` whose backward follows ``method``'s rules.

    The forward is SDPA itself, so it equals the unpatched model's. The rules act on its inputs and
    output, as in lucidlm's own model: AttnLRP's uniform rule on q·kᵀ and A·V (the softmax's own
    gradient × input is AttnLRP's softmax rule); CP-LRP holds the softmax constant, so q and k,
    which reach the output only through it, are detached. Either way the backward keeps no
    (queries × keys) matrix: memory grows linearly with the prompt. ``lucidlm.model.kernels``'
    explicit kernel defines the same relevances (``tests/test_hf_patch.py`` compares with the native
    model, ``tests/test_attention_paths.py`` the native model's two kernels).

    >>> q = torch.randn(1, 2, 4, 8)
    >>> torch.allclose(lrp_attention(q, q, q, is_causal=True, method="cp-lrp"),
    ...                SDPA(q, q, q, is_causal=True), atol=1e-6)
    True
    """
    if is_causal and attn_mask is not None:  # SDPA takes one or the other: its top-left causal mask on top
        causal = position_mask(torch.arange(query.shape[-2], device=query.device)[None],
                               torch.arange(key.shape[-2], device=query.device)[None])[0, 0]
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & causal
        else:
            attn_mask = attn_mask.masked_fill(~causal, torch.finfo(attn_mask.dtype).min)
        is_causal = False
    with rules.explaining(method):
        q, k = (rules.query_key(rules.bilinear(t)) for t in (query, key))
        out = SDPA(q, k, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                   enable_gqa=enable_gqa)
        return rules.bilinear(out)


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
