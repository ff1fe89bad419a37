"""Attention with the LRP rules, and the two ways a module's attention reaches them.

``transformers`` 5.x attention modules compute q, k, v themselves and hand them to an attention
*function* picked from its ``AttentionInterface`` registry (``ALL_ATTENTION_FUNCTIONS``) by
``module.config._attn_implementation``. We add one key to that registry, :data:`ATTENTION_KEY`
(:func:`register_attention`, idempotent; a new key changes no model that does not name it), and
give each patched attention module its own shallow copy of the config that names it
(:func:`lrp_config`). :func:`lrp_attention_function` then reads the method from
:func:`lucidlm.model.rules.current`, the context variable the patched forward sets for the
duration of that one call: no module-level state, and another instance (or thread) sharing the
original config keeps its own attention. It supports what the families pass: grouped-query
heads, additive or boolean masks (sliding windows are already in them), ``scaling``, soft-capping
(Gemma 2), gpt-oss's sinks (``s_aux``), dropout.

A module that calls ``torch.nn.functional.scaled_dot_product_attention`` itself (a model of your
own) has no registry to go through: it runs under :class:`LRPAttentionMode`, a
``TorchFunctionMode`` that replaces exactly that call by :func:`lrp_attention` (SDPA with the rules
on its inputs and output), scoped to the ``with`` block of the current thread.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ..errors import PatchError
from ..model import rules
from ..model.kernels import explicit_attention, position_mask

SDPA = F.scaled_dot_product_attention
#: the key of :func:`lrp_attention_function` in ``transformers``' ``AttentionInterface``
ATTENTION_KEY = "lucidlm_lrp"


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


def lrp_config(config: Any) -> Any:
    """A shallow copy of a ``transformers`` config whose attention is :data:`ATTENTION_KEY`, or
    ``None`` when ``config`` is no ``transformers`` config (then :class:`LRPAttentionMode` applies).

    The private field is written directly: the public ``_attn_implementation`` setter also rewrites
    the sub-configs, which the shallow copy shares with the original.
    """
    if config is None or not hasattr(config, "_attn_implementation_internal"):
        return None
    register_attention()
    clone = copy.copy(config)
    clone.__dict__["_attn_implementation_internal"] = ATTENTION_KEY
    return clone


def register_attention() -> None:
    """Put :func:`lrp_attention_function` into ``transformers``' ``AttentionInterface`` under
    :data:`ATTENTION_KEY` (once; only configs that name the key select it)."""
    from transformers import AttentionInterface

    if AttentionInterface._global_mapping.get(ATTENTION_KEY) is not lrp_attention_function:
        AttentionInterface.register(ATTENTION_KEY, lrp_attention_function)


def lrp_attention_function(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None,
                           dropout: float = 0.0, sliding_window: int | None = None,
                           softcap: float | None = None, s_aux: torch.Tensor | None = None,
                           **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``transformers``' attention-function contract with the rules of the method in force
    (:func:`lucidlm.model.rules.current`; plain attention when none is).

    query (batch, heads, queries, d), key/value (batch, groups, keys, d): grouped heads share their
    group's keys without copies. The rules are lucidlm's own attention's: the uniform rule on q·kᵀ
    and A·V for AttnLRP (``rules.bilinear``), a constant softmax for CP-LRP; soft-capping's identity
    rule and the sinks' rule (``rules.sink_logits``) live in :func:`explicit_attention`, which runs
    when either is present; otherwise SDPA, which keeps no (queries × keys) matrix for the backward.
    Returns the output (batch, queries, heads, d) and the weights (``None`` from SDPA).

    >>> q = torch.randn(1, 4, 3, 8); kv = torch.randn(1, 2, 3, 8)
    >>> class Module: is_causal = True
    >>> out, _ = lrp_attention_function(Module(), q, kv, kv, None, scaling=8 ** -0.5)
    >>> expected = SDPA(q, kv, kv, is_causal=True, enable_gqa=True).transpose(1, 2)
    >>> out.shape, torch.allclose(out, expected, atol=1e-6)
    (torch.Size([1, 3, 4, 8]), True)
    """
    mask = _visible(module, attention_mask, query, key, sliding_window)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q, k = rules.bilinear(query), rules.bilinear(key)
    if softcap is None and s_aux is None:
        q, k = rules.query_key(q), rules.query_key(k)
        out = SDPA(q, k, value, attn_mask=mask, dropout_p=dropout, scale=scale,
                   enable_gqa=query.shape[1] != key.shape[1])
        weights = None
    else:
        sinks = None if s_aux is None else rules.sink_logits(s_aux)
        out, grouped = explicit_attention(q, k, value, mask, scale, softcap, dropout, sinks)
        weights = grouped.flatten(1, 2)
    return rules.bilinear(out).transpose(1, 2).contiguous(), weights


def _visible(module: Any, mask: Any, query: torch.Tensor, key: torch.Tensor,
             window: int | None) -> torch.Tensor | None:
    """The mask in SDPA's form: the model's own (additive or boolean), cut to the keys, or, where
    the model left it out (SDPA's causal shortcut), the causal mask aligned to the last key."""
    n_q, n_k = query.shape[-2], key.shape[-2]
    if isinstance(mask, torch.Tensor):
        return mask[..., :n_k]
    if mask is not None:
        raise PatchError(f"{type(module).__name__}: attention mask of type {type(mask).__name__} "
                         "(flex attention?); load the model with attn_implementation='eager' or 'sdpa'")
    if not getattr(module, "is_causal", True):
        return None
    positions = torch.arange(n_k, device=query.device)
    return position_mask(positions[n_k - n_q:][None], positions[None], window)


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
