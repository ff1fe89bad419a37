"""Explanations under a KV-cache policy: attribute to what the model still sees.

With an eviction policy the last prediction is computed from the keys and values left in the
cache, not from the whole prompt. So we explain exactly that step:

1. the prompt except its last token is prefilled into the policy's cache (chunked, no gradient);
2. the kept slots of every layer are handed to attention as leaf tensors that require grad;
3. the last token runs one decode step under the LRP rules and the target is back-propagated.

The relevance of a token is the relevance that reaches its cached keys and values, summed over
layers (plus, for the last token, the relevance at its embedding). Treating the cached keys and
values as the step's inputs keeps the decomposition exact: under CP-LRP on a bias-free model the
relevances still sum to the explained logit. Tokens no layer keeps get no relevance and are marked
``evicted`` in the :class:`~lucidlm.explain.explanation.Explanation` (heatmaps grey them out).

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
from ..cache.base import KVCache, LayerCache
from ..errors import ExplainError
from .explainer import Target, _check_method, _explain_mode, prompt_ids, resolve_target, token_strings
from .explanation import Explanation


class SlotLeaves(LayerCache):
    """Wraps one layer's cache for the explained step: the slots kept so far come back as leaf
    tensors (``self.k``, ``self.v``, positions ``self.pos``) whose gradients we read afterwards."""

    def __init__(self, inner: LayerCache) -> None:
        self.inner = inner
        self.wants_scores = inner.wants_scores
        self.k = self.v = self.pos = None

    def extend(self, k, v, pos):
        # the policy's buffers never join the autograd graph: it sees detached copies
        keys, values, key_pos = self.inner.extend(k.detach(), v.detach(), pos)
        n_old = keys.shape[2] - k.shape[2]
        self.k = keys[:, :, :n_old].detach().clone().requires_grad_(True)
        self.v = values[:, :, :n_old].detach().clone().requires_grad_(True)
        self.pos = key_pos[:, :n_old]
        return torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2), key_pos

    def settle(self, scores):
        self.inner.settle(None if scores is None else scores.detach())


def explain_cached(model: nn.Module, tokenizer, prompt: str | Sequence[int], target: Target = None,
                   method: str = "attnlrp", kv_cache: str = "dense", cache_tokens: int | None = None,
                   chunk_size: int = 256) -> Explanation:
    """Explain the next-token prediction made through a ``kv_cache`` policy of ``cache_tokens`` slots."""
    _check_method(method)
    ids = prompt_ids(tokenizer, prompt)
    spec = resolve_target(tokenizer, target, model.config.vocab_size)
    if spec.continuation:
        raise ExplainError("a multi-token continuation target cannot be explained under a KV-cache policy "
                           "(it would need one explained step per token): pass kv_cache=None")
    param = next(model.parameters())
    budget = cache_tokens if cache_tokens is not None else len(ids)
    cache = build_cache(model.config, 1, kv_cache, budget, dtype=param.dtype, device=param.device)
    if len(ids) > 1:
        with torch.no_grad():
            prefill(model, torch.tensor([ids[:-1]], device=param.device), cache, chunk_size=chunk_size)
    step = KVCache([SlotLeaves(layer) for layer in cache.layers])
    position = torch.tensor([[len(ids) - 1]], device=param.device)
    h0 = model.embed_tokens(torch.tensor([[ids[-1]]], device=param.device), position).detach().requires_grad_(True)
    with _explain_mode(method):
        logits = model(inputs_embeds=h0, positions=position, cache=step, last_only=True)
        score, target_ids = spec.score(logits[0], "logit")
        leaves = [t for layer in step.layers for t in (layer.k, layer.v)]
        grads = torch.autograd.grad(score, [h0, *leaves], allow_unused=True)
    relevance, kept = _slot_relevance(len(ids), step.layers, grads[1:])
    relevance[-1] += (h0.detach().float() * grads[0].float()).sum()
    kept[-1] = True
    return Explanation(tokens=token_strings(tokenizer, ids), token_ids=ids, relevance=relevance,
                       target=spec.label(tokenizer, target_ids), target_ids=target_ids,
                       target_logit=float(score.detach()), method=method, evicted=~kept,
                       prompt=prompt if isinstance(prompt, str) else None)


def _slot_relevance(n_tokens: int, layers: list[SlotLeaves], grads) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token relevance summed over every layer's cached keys and values, and which tokens any
    layer still holds."""
    relevance = torch.zeros(n_tokens, dtype=torch.float64)
    kept = torch.zeros(n_tokens, dtype=torch.bool)
    for layer, grad_k, grad_v in zip(layers, grads[0::2], grads[1::2]):
        per_slot = torch.zeros(layer.pos.shape[1], dtype=torch.float64)
        for leaf, grad in ((layer.k, grad_k), (layer.v, grad_v)):
            if grad is not None:  # keys get no gradient under CP-LRP (the softmax is detached)
                per_slot += (leaf.detach().double() * grad.double()).sum(dim=(1, 3))[0].cpu()
        pos = layer.pos[0].cpu()
        filled = pos >= 0
        relevance.index_add_(0, pos[filled], per_slot[filled])
        kept[pos[filled]] = True
    return relevance.float(), kept
