"""DuoAttention's split of the KV heads (Xiao et al. 2025, "DuoAttention: Efficient Long-Context LLM
Inference with Retrieval and Streaming Heads"; kvpress ``DuoAttentionPress``): retrieval heads keep
the whole prompt, streaming heads keep the attention sinks plus a recent window.

Which heads retrieve comes from a head-score file written by ``lucidlm calibrate-heads MODEL --out
FILE`` (:mod:`lucidlm.cache.heads`), given as ``duo(heads_file=FILE)``. How many of them there are
follows from the budget: ``cache_tokens`` (tokens, or a share such as ``25%``) is what a KV head
keeps on average, so the model's ``H`` KV heads hold ``H * cache_tokens`` slots; at the prompt's end,
with ``L`` prompt tokens and ``S = n_sink + window``, the ``R = floor(H (cache_tokens - S) / (L - S))``
best-scored heads of the whole model keep all ``L`` tokens and the others exactly ``S``
(``R L + (H - R) S <= H cache_tokens``), as DuoAttention's one threshold over all layers; each
layer's bound becomes what its heads then hold (a layer of streaming heads holds less than the
budget, one of retrieval heads more; in a batch, the longest row's). The slots are per head with a
layer's bound shared out among its heads (``heads="adaptive"``, no floor).

Without ``heads_file`` each layer ranks its own heads on the prompt, by the signal the calibration
measures: the attention weight the prompt's last ``window`` queries put outside the sinks and the
window (a head that looks far back is a retrieval head); then the split is per layer, ``floor(g
(cache_tokens - S) / (L - S))`` of its ``g`` heads retrieving, and the layer's bound stays
``cache_tokens`` per head.

>>> import torch
>>> from lucidlm import Config, GPT
>>> from lucidlm.cache import build_cache, prefill
>>> model = GPT(Config.from_name("tiny-llama")).eval()  # 2 KV heads per layer
>>> cache = build_cache(model.config, 1, "duo(n_sink=2,window=6)", cache_tokens=24)
>>> _ = prefill(model, torch.randint(0, 256, (1, 40)), cache)
>>> sorted(len(kept) for kept in cache.kept_by_head(0)[0])  # 2 (24 - 8) // (40 - 8) = 1 retrieval head
[8, 40]
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
        self.window = default_window(self.capacity - n_sink) if window is None else window
        if self.capacity < self.n_sink + self.window:
            raise CacheError(f"cache_tokens={self.capacity} must hold the streaming heads' {self.n_sink} sink "
                             f"tokens plus window ({self.window}) of policy 'duo'")
        self.head_scores = None if head_scores is None else torch.tensor(head_scores, dtype=torch.float)
        self.query_limit = self.window if head_scores is None else 0
        self.budget = self.capacity  # per head on average; with a head file the layer's bound moves
        self.retrieval: torch.Tensor | None = None  # (batch, groups): set for the prompt's end

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

    def retrieval_heads(self, held: torch.Tensor, heads: int) -> torch.Tensor:
        """How many of ``heads`` KV heads keep everything (batch,), for ``held`` (batch,) prompt tokens
        and this budget: ``floor(heads (budget - S) / (L - S))``, all of them when the prompt fits."""
        streaming = self.n_sink + self.window
        share = torch.div(heads * (self.budget - streaming), (held - streaming).clamp_min(1), rounding_mode="floor")
        return torch.where(held <= self.budget, heads, share.clamp(0, heads))

    @staticmethod
    def prompt_pass(cache, model, input_ids, positions, question) -> None:
        """With head files: choose the retrieval heads of the whole model (the best-scored ones the
        budget pays for) and set each layer's bound to what its heads will hold."""
        layers = [getattr(layer, "inner", layer) for layer in cache.layers]  # an explanation wraps them
        duo = [layer for layer in layers if isinstance(layer, DuoLayerCache)]
        if not duo or any(layer.head_scores is None for layer in duo):
            return
        pos = duo[0].held()[2]
        groups, streaming = pos.shape[1], duo[0].n_sink + duo[0].window
        held = (pos >= 0).sum(-1).amax(-1)  # (batch,) prompt tokens of each row
        scores = torch.cat([layer.head_scores for layer in duo]).to(pos.device)
        rank = scores.argsort(descending=True, stable=True).argsort()  # over every head of the model
        retrieval = rank[None] < duo[0].retrieval_heads(held, len(scores))[:, None]  # (batch, heads)
        for i, layer in enumerate(duo):
            chosen = retrieval[:, i * groups:(i + 1) * groups]
            need = chosen.sum(1) * held + (~chosen).sum(1) * torch.clamp(held, max=streaming)
            layer.retrieval, layer.capacity = chosen, max(1, -(-int(need.max()) // groups))

    def prompt_scores(self, end):
        keys, _, pos = self.held()  # (batch, groups, slots)
        retrieval, self.retrieval = self.retrieval, None
        if retrieval is None:  # no head file: this layer's own split
            held = (pos >= 0).sum(-1).amax(-1)
            retrieval = self.head_ranks(end, keys, pos) < self.retrieval_heads(held, self.groups)[:, None]
        recency = (pos.float() + 1) / (pos.amax(-1, keepdim=True).float() + 2)  # in (0, 1): the oldest go first
        streaming = torch.where(self.streamed(pos), 2.0 + recency, -torch.inf)  # the rest: evicted at once
        return torch.where(retrieval[..., None], 3.0 + recency, streaming)
