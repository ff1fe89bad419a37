"""DuoAttention's split of the KV heads (Xiao et al. 2025, "DuoAttention: Efficient Long-Context LLM
Inference with Retrieval and Streaming Heads"; kvpress ``DuoAttentionPress``): retrieval heads keep
the whole prompt, streaming heads keep the attention sinks plus a recent window.

Which heads retrieve comes from a head-score file written by ``lucidlm calibrate-heads MODEL --out
FILE`` (:mod:`lucidlm.cache.heads`), given as ``duo(heads_file=FILE)``. How many of them there are
follows from the budget: ``cache_tokens`` (tokens, or a share such as ``25%``) is the layer's
average per KV head, so a layer of ``g`` heads holds ``g * cache_tokens`` slots; at the prompt's
end, with ``L`` prompt tokens and ``S = n_sink + window``, its ``r = floor(g (cache_tokens - S) /
(L - S))`` best-scored heads keep all ``L`` and the others ``S`` (``r L + (g - r) S <= g
cache_tokens``); slots left over lengthen the streaming heads' windows. DuoAttention sets one
threshold over all layers; the budget here is per layer, so each layer takes its own best heads.
The slots are per head with the layer's budget shared out (``heads="adaptive"``, no floor).

Without ``heads_file`` each layer ranks its heads on the prompt itself, by the same signal the
calibration measures: the attention weight the prompt's last ``window`` queries put outside the
streaming heads' sinks and window (a head that looks far back is a retrieval head).
"""

from __future__ import annotations

import torch

from ..errors import CacheError
from .heads import read_head_scores
from .presses import PromptPressLayerCache, attention_weights
from .spec import default_window


class DuoLayerCache(PromptPressLayerCache):
    """One layer of ``duo`` (see the module doc); ``head_scores``: this layer's calibration score
    per KV head (higher: a retrieval head)."""

    policy = "duo"
    wants_queries = True  # without a head file: the heads are ranked on the prompt's last queries

    def __init__(self, *args, head_scores: list[float] | None = None, n_sink: int = 4, window: int | None = None,
                 **kwargs) -> None:
        kwargs.update(heads="adaptive", alpha=0.0)  # per head, the layer's budget shared out by the split
        super().__init__(*args, **kwargs)
        self.n_sink = n_sink
        self.window = default_window(self.capacity) if window is None else window
        if self.capacity <= self.n_sink + self.window:
            raise CacheError(f"cache_tokens={self.capacity} must exceed the streaming heads' {self.n_sink} sink "
                             f"tokens plus window ({self.window}) of policy 'duo'")
        self.head_scores = None if head_scores is None else torch.tensor(head_scores, dtype=torch.float)
        self.query_limit = self.window if head_scores is None else 0

    @classmethod
    def layer_params(cls, config, params: dict) -> list[dict]:
        """Each layer's keyword arguments: with ``heads_file``, the file's scores of its heads."""
        params = dict(params)
        path = params.pop("heads_file", None)
        if path is None:
            return [params] * config.n_layer
        return [{**params, "head_scores": row} for row in read_head_scores(path, config).scores]

    def head_ranks(self, end, keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Each head's rank in its row (batch, groups), 0 = the strongest retrieval head."""
        if self.head_scores is not None:
            scores = self.head_scores.to(pos.device)[None].expand(pos.shape[0], -1)
        elif self.queries is None:
            scores = torch.zeros(pos.shape[:2], device=pos.device)
        else:
            weights = attention_weights(self.queries, self.query_pos, keys, pos, end.attention.scale,
                                        end.attention.softcap)
            scores = (weights * ~self.streamed(pos)[:, :, None, None]).sum(-1).mean(dim=(2, 3))
        return scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)

    def streamed(self, pos: torch.Tensor) -> torch.Tensor:
        """(batch, groups, slots) bool: what a streaming head keeps (sinks and the recent window)."""
        newest = pos.amax(-1, keepdim=True)
        return ((pos >= 0) & (pos < self.n_sink)) | (pos > newest - self.window)

    def retrieval_heads(self, held: torch.Tensor) -> torch.Tensor:
        """How many heads of each row (batch,) keep everything, for ``held`` (batch,) prompt tokens."""
        streaming = self.n_sink + self.window
        room = self.groups * (self.capacity - streaming)
        share = torch.div(room, (held - streaming).clamp_min(1), rounding_mode="floor")
        return torch.where(held <= self.capacity, self.groups, share.clamp(0, self.groups))

    def prompt_scores(self, end):
        keys, _, pos = self.held()  # (batch, groups, slots)
        held = (pos >= 0).sum(-1).amax(-1)
        retrieval = self.head_ranks(end, keys, pos) < self.retrieval_heads(held)[:, None]  # (batch, groups)
        recency = (pos.float() + 1) / (pos.amax(-1, keepdim=True).float() + 2)  # in (0, 1): leftovers to the newest
        streaming = torch.where(self.streamed(pos), 2.0, recency)
        return torch.where(retrieval[..., None], 3.0 + recency, streaming)
