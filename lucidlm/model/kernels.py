"""The one explicit softmax-attention kernel, used by lucidlm's own attention
(:mod:`lucidlm.model.attention`) wherever attention weights are needed (decode steps on the CPU,
KV policies' scores, soft-capping, attention rollout), and the one position mask, also used by the
``transformers`` patch layer (:mod:`lucidlm.hf.attention`).

The kernel applies the LRP rules that act *inside* attention (identity rule on logit soft-capping,
stop-gradient on the softmax for CP-LRP) through :mod:`lucidlm.model.rules`, so it follows whatever
method is in force (``with rules.explaining(...)``). The uniform rule on q·kᵀ and A·V is left to the
callers: lucidlm's model applies it around both of its kernels (fused and explicit).

>>> q = torch.randn(1, 4, 3, 8); kv = torch.randn(1, 2, 3, 8)  # 4 query heads, 2 KV groups
>>> pos = torch.arange(3)[None]
>>> out, weights = explicit_attention(q, kv, kv, position_mask(pos, pos), scale=8 ** -0.5)
>>> out.shape, weights.shape  # weights: (batch, groups, heads per group, queries, keys)
(torch.Size([1, 4, 3, 8]), torch.Size([1, 2, 2, 3, 3]))
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from . import rules


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(batch, 1, queries, keys) bool, SDPA's *may attend*: the key is filled (position >= 0), not
    in the future, and inside the sliding ``window``. With ``arange`` positions it is SDPA's
    top-left aligned ``is_causal`` mask. ``k_pos`` (batch, groups, keys), the keys of a per-head
    KV cache (each group its own positions), gives one mask per group: (batch, groups, queries, keys)
    (:func:`heads_mask` repeats it for the query heads)."""
    if k_pos.dim() == 3:
        qp, kp = q_pos[:, None, :, None], k_pos[:, :, None, :]
    else:
        qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    allowed = (kp <= qp) & (kp >= 0)
    if window is not None:
        allowed &= qp - kp < window
    # padding queries (position -1) see every filled key: their output is never used, and a
    # row with no allowed key would turn into NaN inside softmax
    allowed |= (qp < 0) & (kp >= 0)
    return allowed if k_pos.dim() == 3 else allowed[:, None]


def heads_mask(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """A mask (batch, 1 | groups | heads, queries, keys) broadcastable to (batch, heads, queries, keys):
    a per-group one repeated for each group's query heads (a group's heads are consecutive, the
    layout of :func:`explicit_attention`).

    >>> heads_mask(torch.tensor([True, False]).view(1, 2, 1, 1), 4).flatten().tolist()
    [True, True, False, False]
    """
    groups = mask.shape[-3]
    if groups in (1, heads):
        return mask
    return mask.repeat_interleave(heads // groups, dim=-3)


def _grouped(mask: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """A mask broadcastable to (..., heads, queries, keys) as one broadcastable to
    (..., groups, heads // groups, queries, keys)."""
    if groups != heads and mask.dim() >= 3 and mask.shape[-3] == heads:
        return mask.unflatten(-3, (groups, heads // groups))
    return mask.unsqueeze(-3)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float, softcap: float | None = None, dropout_p: float = 0.0,
                       sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention written out, with the LRP rules of the method in force.

    q: (..., heads, queries, head_size); k, v: (..., groups, keys, head_size), ``groups`` dividing
    ``heads`` (grouped-query heads share their group's keys without copies). ``mask`` has SDPA's
    semantics: bool says *may attend*, a float mask is added; a masked logit becomes the dtype's
    minimum rather than -inf, so a row with no visible key gives uniform weights instead of NaN.
    The softmax is taken in at least float32 (as ``transformers``' eager path; float64 stays
    float64). ``sinks`` (heads,): gpt-oss's learned per-head logit, one more column of every row's
    softmax that takes probability mass and carries no value (the weights returned leave it out, so
    a row sums to less than 1). Returns the output (..., heads, queries, head_size) and the weights
    (..., groups, heads // groups, queries, keys).
    """
    heads, groups = q.shape[-3], k.shape[-3]
    per_group, n_q = heads // groups, q.shape[-2]
    # a group's heads stacked along the query axis: one matmul per group against its keys, with
    # no broadcast copy of the keys or values per head (the decode step's main memory traffic)
    qg = (q * scale).unflatten(-3, (groups, per_group)).flatten(-3, -2)  # (..., groups, heads/g * queries, d)
    logits = (qg @ k.transpose(-1, -2)).unflatten(-2, (per_group, n_q))  # (..., groups, heads/g, queries, keys)
    if softcap is not None:
        logits = rules.activation(lambda s: torch.tanh(s / softcap) * softcap, logits)
    if mask is not None:
        mask = _grouped(mask, heads, groups)
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        else:
            logits = logits + mask
    dtype = torch.promote_types(q.dtype, torch.float32)
    if sinks is None:
        weights = F.softmax(logits, dim=-1, dtype=dtype).to(q.dtype)
    else:
        weights = _sink_softmax(logits, sinks, groups, dtype).to(q.dtype)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = rules.attention_weights(weights).flatten(-3, -2) @ v  # (..., groups, heads/g * queries, d)
    return out.unflatten(-2, (per_group, n_q)).flatten(-4, -3), weights


def _sink_softmax(logits: torch.Tensor, sinks: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """softmax over [logits, sink] per row, the sink's column dropped (``transformers``' gpt-oss
    eager attention): w_j = exp(l_j) / (Σ_k exp(l_k) + exp(s_h))."""
    column = sinks.to(logits.dtype).reshape(groups, -1, 1, 1).expand(*logits.shape[:-1], 1)
    return F.softmax(torch.cat([logits, column], dim=-1), dim=-1, dtype=dtype)[..., :-1]
