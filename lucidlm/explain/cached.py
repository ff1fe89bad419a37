"""Explanations under a KV-cache policy: replay what each query could see, explain to the inputs.

With an eviction policy the last prediction is made through the cache: the prompt except its last
token is prefilled in chunks (the policy evicts between chunks), then the last token runs one
decode step over the slots left. We explain exactly that prediction, in two passes:

1. **The cached run** (no gradient): the policy runs as in generation, and every layer records
   which key positions each query position was shown (the slots kept at that moment, plus the
   chunk itself) — per KV group when the policy evicts per head (``heads="each"``/``"adaptive"``).
2. **The replay**: one forward over the whole prompt from the input embeddings, under the LRP
   rules, in which every layer's attention (every head, under a per-head policy) sees exactly the keys
   recorded in step 1 (a :class:`~lucidlm.cache.base.VisibleKeys` layer restricts the causal mask;
   nothing is evicted). Its logits
   equal the cached run's (to float rounding; with ``+int8``/``+int4`` buffers, within the
   quantisation error of the stored keys and values, which the replay does not apply). The
   target is back-propagated to the embeddings, as in a dense explanation.

So relevance is always the relevance of the *input tokens*: when nothing was evicted the replay
is the dense forward and the explanation equals the dense one; when tokens were evicted, they
can still be relevant through the tokens that saw them before they went. ``evicted`` marks the
tokens no head of any layer still held for the last prediction (renderings grey them out);
``kept_heads`` (layers, groups, tokens) says what each head held.

>>> import torch
>>> from lucidlm import Config, GPT
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> e = explain_cached(model, None, list(range(1, 13)), kv_cache="window", cache_tokens=4)
>>> int(e.evicted.sum())  # the window keeps the 4 tokens before the last one
7
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from ..cache import build_cache, prefill
from ..cache.base import KVCache, LayerCache, VisibleKeys
from ..cache.spec import parse_policy
from ..errors import ExplainError
from ..methods import METHODS
from ..model.pipeline import cache_devices
from .core import Prompt, check_explainable, explain_prompts
from .explanation import Explanation
from .targets import Target


class Recording(LayerCache):
    """Wraps one layer's policy cache during the cached run and records, for every query
    position, the key positions ``extend`` handed to attention (sequence 0 of the batch):
    ``seen[query, key]``, or ``seen[group, query, key]`` when the policy's KV groups keep their
    own slots (per-head eviction)."""

    def __init__(self, inner: LayerCache, n_tokens: int) -> None:
        self.inner = inner
        self.wants_scores, self.wants_queries = inner.wants_scores, inner.wants_queries
        self.score_queries = inner.score_queries  # SnapKV's observation window (None for the rest)
        self.capacity, self.groups = inner.capacity, inner.groups
        # a press (cache.presses) holds the prompt and compresses at its end, after a pass of its own
        self.holds_prompt, self.prompt_pass = inner.holds_prompt, getattr(inner, "prompt_pass", None)
        self.seen = torch.zeros(n_tokens, n_tokens, dtype=torch.bool)  # seen[query, key]

    def extend(self, k, v, pos):
        keys, values, key_pos = self.inner.extend(k, v, pos)
        queries, shown = pos[0].cpu(), key_pos[0].cpu()
        queries = queries[queries >= 0][:, None]
        if shown.dim() == 2:  # per head: (groups, keys), each group its own
            if self.seen.dim() == 2:
                self.seen = self.seen.expand(shown.shape[0], -1, -1).clone()
            for group, keys_shown in enumerate(shown):
                self.seen[group, queries, keys_shown[keys_shown >= 0][None, :]] = True
        else:
            self.seen[queries, shown[shown >= 0][None, :]] = True
        return keys, values, key_pos

    def see_queries(self, q, pos):
        self.inner.see_queries(q, pos)

    def settle(self, scores):
        self.inner.settle(scores)

    def end_prompt(self, end):
        self.inner.end_prompt(end)


def explain_cached(model: nn.Module, tokenizer, prompt: str | Sequence[int], target: Target = None,
                   method: str = "attnlrp", kv_cache: str = "dense", cache_tokens: int | str | None = None,
                   chunk_size: int = 256, layers: str | Sequence[int] | None = None) -> Explanation:
    """Explain the next-token prediction made through a ``kv_cache`` policy of ``cache_tokens``
    slots (``chunk_size``: the prefill's chunk, between which the policy evicts)."""
    check_explainable(method, METHODS)
    request = Prompt.resolve(model, tokenizer, prompt, target)
    if request.spec.continuation:
        raise ExplainError("a multi-token continuation target cannot be explained under a KV-cache policy "
                           "(it would need one explained step per token): pass kv_cache=None")
    seen, _ = cached_run(model, request.ids, kv_cache, cache_tokens, chunk_size)
    kept_heads = held_by_head(seen, model.config.kv_slot_sizes()[0])
    replay = KVCache([VisibleKeys(s) for s in seen])
    (explanation,) = explain_prompts(model, tokenizer, [request], method, "logit", cache=replay, layers=layers,
                                     evicted=~kept_heads.flatten(0, 1).any(0))  # held by no head of any layer
    return explanation if parse_policy(kv_cache).is_dense else replace(explanation, kept_heads=kept_heads)


def held_by_head(seen: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """(layers, groups, tokens) bool: the keys each head of each layer showed the last query, from
    the cached run's ``seen`` ((query, key) per layer, or (group, query, key) for a per-head policy;
    layers may sit on several devices: device_map).

    >>> seen = [torch.eye(3, dtype=torch.bool), torch.ones(2, 3, 3, dtype=torch.bool).tril()]
    >>> held_by_head(seen, 2).int().tolist()
    [[[0, 0, 1], [0, 0, 1]], [[1, 1, 1], [1, 1, 1]]]
    """
    last = [s[..., -1, :].cpu() for s in seen]
    return torch.stack([held if held.dim() == 2 else held.expand(groups, -1) for held in last])


def cached_run(model: nn.Module, ids: list[int], kv_cache: str, cache_tokens: int | None,
               chunk_size: int = 256) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The prediction for ``ids`` made through the policy (all but the last token prefilled in
    chunks, then the last one as a decode step): per layer ``seen[query, key]``, and the last
    prediction's logits (vocab,), which the replay reproduces."""
    param = next(model.parameters())
    budget = len(ids) if cache_tokens is None else parse_policy(kv_cache).budget(cache_tokens, len(ids))
    cache = build_cache(model.config, 1, kv_cache, budget, dtype=param.dtype,
                        device=cache_devices(model, param.device))
    recording = KVCache([Recording(layer, len(ids)) for layer in cache.layers])
    x = torch.tensor([ids], device=param.device)
    with torch.no_grad():
        if len(ids) > 1:
            prefill(model, x[:, :-1], recording, chunk_size=chunk_size)
        logits = model(x[:, -1:], cache=recording, last_only=True)[0, -1]
    return [layer.seen for layer in recording.layers], logits
