"""KVzip: query-agnostic compression by context reconstruction (Kim et al. 2025, "KVzip:
Query-Agnostic KV Cache Compression with Context Reconstruction"; kvpress ``KVzipPress``).

When the prompt has been read, the model reads it a second time, teacher-forced, over the held
cache — as if asked to repeat it — with the repeated tokens placed right after the prompt. Each
held KV pair's score, per KV head, is the largest attention weight it receives from any query of
that pass (over the group's query heads); the pass's own keys and values are attended (the
softmax runs over the held cache plus the repeated tokens so far, causally) but never stored.
Long prompts are repeated in chunks of ``chunk`` tokens, each over the held cache plus itself (as
KVzip's chunked scoring), so the pass's attention holds (chunk, prompt + chunk) weights per head.
Prefill costs about 2x. KVzip puts an instruction ("Repeat the previous context:") before the
repetition; a cache has no tokenizer, so here the prompt's tokens alone are repeated.

>>> import torch
>>> from lucidlm import Config, GPT
>>> from lucidlm.cache import build_cache, prefill
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> cache = build_cache(model.config, batch=1, policy="kvzip(chunk=16)+int8", cache_tokens=12)
>>> _ = prefill(model, torch.randint(0, 256, (1, 40)), cache)
>>> cache.layers[0].positions().shape[-1], int(cache.next_position[0])  # the pass leaves no trace
(12, 40)
"""

from __future__ import annotations

import torch

from ..errors import CacheError
from .base import KVCache
from .presses import PromptPressLayerCache, attention_weights


def _row_chunks(input_ids: torch.Tensor, positions: torch.Tensor, chunk: int):
    """(ids, positions) of each row's real tokens ``chunk`` at a time, counted from the row's own
    first token (so a left-padded row is cut as it would be alone), right-padded with position -1.

    >>> ids = torch.tensor([[0, 0, 7, 8, 9], [1, 2, 3, 4, 5]]); pos = torch.tensor([[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]])
    >>> [p.tolist() for _, p in _row_chunks(ids, pos, 2)]
    [[[0, 1], [0, 1]], [[2, -1], [2, 3]], [[-1], [4]]]
    """
    real = positions >= 0
    rank = real.long().cumsum(1) - 1
    for start in range(0, int(real.sum(1).max()), chunk):
        take = real & (rank >= start) & (rank < start + chunk)
        width = int(take.sum(1).max())
        rows, cols = take.nonzero(as_tuple=True)
        ids = torch.zeros(input_ids.shape[0], width, dtype=input_ids.dtype, device=input_ids.device)
        pos = torch.full((input_ids.shape[0], width), -1, dtype=positions.dtype, device=positions.device)
        ids[rows, rank[rows, cols] - start] = input_ids[rows, cols]
        pos[rows, rank[rows, cols] - start] = positions[rows, cols]
        yield ids, pos


class KVzipLayerCache(PromptPressLayerCache):
    """One layer of ``kvzip`` (see the module doc); :meth:`prompt_pass` runs the reconstruction
    for all layers at once, :meth:`prompt_scores` hands over what each layer measured."""

    policy = "kvzip"
    wants_queries = True  # during the reconstruction pass only
    query_limit = 0

    def __init__(self, *args, chunk: int = 512, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chunk = chunk
        self.attention = None  # this layer's attention module while reconstructing, else None
        self._step: tuple[torch.Tensor, torch.Tensor] | None = None  # keys and positions of a pass step
        self.max_weight: torch.Tensor | None = None  # (batch, groups, held slots)

    # ---- the reconstruction pass: attend over the held cache, store nothing -------------------
    def extend(self, k, v, pos):
        if self.attention is None:
            return super().extend(k, v, pos)
        held = self.pos
        keys = torch.cat([self.store.decode(self.k), k.to(self.store.dtype)], dim=2)
        values = torch.cat([self.value_store.decode(self.v), v.to(self.value_store.dtype)], dim=2)
        new = pos if held.dim() == 2 else pos[:, None].expand(-1, held.shape[1], -1)
        key_pos = torch.cat([held, new], dim=-1)
        self._step = (keys, key_pos)
        return keys, values, key_pos

    def see_queries(self, q, pos):
        if self.attention is None:
            return
        keys, key_pos = self._step
        weights = attention_weights(q, pos, keys, key_pos, self.attention.scale, self.attention.softcap)
        best = weights[..., :self.pos.shape[-1]].amax(dim=(2, 3))  # over the group's heads and the queries
        self.max_weight = best if self.max_weight is None else torch.maximum(self.max_weight, best)

    def settle(self, scores):
        if self.attention is None:
            return super().settle(scores)
        self._step = None

    @staticmethod
    @torch.no_grad()
    def prompt_pass(cache, model, input_ids: torch.Tensor, positions: torch.Tensor, question) -> None:
        """Repeat the prompt chunk ``input_ids`` at ``positions`` (batch, tokens; -1 padding) over
        ``cache``, teacher-forced, each repeated token right after the prompt; every kvzip layer
        records the largest weight each held slot receives."""
        real = positions >= 0
        first = positions.masked_fill(~real, torch.iinfo(torch.long).max).amin(1, keepdim=True)
        after = positions.amax(1, keepdim=True) + 1
        repeat = torch.where(real, positions - first + after, -1)
        if int(repeat.max()) >= model.config.block_size:
            raise CacheError(f"policy 'kvzip' repeats the prompt after itself: position {int(repeat.max())} is beyond "
                             f"the context length block_size={model.config.block_size} of {model.config.name}; "
                             "use a prompt of at most half the context length, or another policy")
        # the policy's own layers (an explanation's recording wraps each as ``inner``): the pass is
        # not part of the stream, so it neither counts positions nor is recorded
        policy = KVCache([getattr(layer, "inner", layer) for layer in cache.layers])
        layers = [(i, layer) for i, layer in enumerate(policy.layers) if isinstance(layer, KVzipLayerCache)]
        for i, layer in layers:
            layer.attention, layer.max_weight = model.layers[i].attn, None
        try:
            chunk = min(layer.chunk for _, layer in layers)
            for ids, pos in _row_chunks(input_ids, repeat, chunk):
                model(ids, positions=pos, cache=policy, last_only=True)
        finally:
            for _, layer in layers:
                layer.attention, layer._step = None, None

    def prompt_scores(self, end):
        scores, self.max_weight = self.max_weight, None
        if scores is None:  # no pass ran (nothing to score)
            return torch.zeros(self.held()[2].shape, device=self.pos.device)
        return scores
