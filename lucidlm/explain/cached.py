"""Explanations under a KV-cache policy: replay what each query could see, explain to the inputs.

With an eviction policy the last prediction is made through the cache: the prompt except its last
token is prefilled in chunks (the policy evicts between chunks), then the last token runs one
decode step over the slots left. We explain exactly that prediction, in two passes:

1. **The cached run** (no gradient): the policy runs as in generation, and every layer records
   which key positions each query position was shown (the slots kept at that moment, plus the
   chunk itself).
2. **The replay**: one forward over the whole prompt from the input embeddings, under the LRP
   rules, in which every layer's attention sees exactly the keys recorded in step 1 (a
   :class:`~lucidlm.cache.base.VisibleKeys` layer restricts the causal mask; nothing is evicted). Its logits
   equal the cached run's (to float rounding; with ``+int8``/``+int4`` buffers, within the
   quantisation error of the stored keys and values, which the replay does not apply). The
   target is back-propagated to the embeddings, as in a dense explanation.

So relevance is always the relevance of the *input tokens*: when nothing was evicted the replay
is the dense forward and the explanation equals the dense one; when tokens were evicted, they
can still be relevant through the tokens that saw them before they went. ``evicted`` marks the
tokens no layer still held for the last prediction (renderings grey them out).

>>> import torch
>>> from lucidlm import Config, GPT
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> e = explain_cached(model, None, list(range(1, 13)), kv_cache="window", cache_tokens=4)
>>> int(e.evicted.sum())  # the window keeps the 4 tokens before the last one
7
"""

from __future__ import annotations

from collections.abc import Sequence

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
    position, the key positions ``extend`` handed to attention (sequence 0 of the batch)."""

    def __init__(self, inner: LayerCache, n_tokens: int) -> None:
        self.inner = inner
        self.wants_scores = inner.wants_scores
        self.score_queries = inner.score_queries  # SnapKV's observation window (None for the rest)
        self.seen = torch.zeros(n_tokens, n_tokens, dtype=torch.bool)  # seen[query, key]

    def extend(self, k, v, pos):
        keys, values, key_pos = self.inner.extend(k, v, pos)
        queries, shown = pos[0].cpu(), key_pos[0].cpu()
        queries, shown = queries[queries >= 0], shown[shown >= 0]
        self.seen[queries[:, None], shown[None, :]] = True
        return keys, values, key_pos

    def settle(self, scores):
        self.inner.settle(scores)


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
    kept = torch.stack([s[-1].cpu() for s in seen]).any(0)  # held by some layer for the last query (layers may
    # sit on several devices: device_map)
    replay = KVCache([VisibleKeys(s) for s in seen])
    (explanation,) = explain_prompts(model, tokenizer, [request], method, "logit", cache=replay, layers=layers,
                                     evicted=~kept)
    return explanation


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
