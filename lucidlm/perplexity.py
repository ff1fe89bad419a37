"""Perplexity of a text streamed through a KV cache (chunked prefill), under any cache policy.

Each token's next-token NLL is scored with the logits produced when its predecessor was processed,
so the numbers show what a policy costs: with ``dense`` (and room for the whole text) they equal one
full forward pass; with ``window``/``sink``/``h2o`` the model only sees what the cache kept.

>>> import torch
>>> from lucidlm import Config, GPT
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> ids = torch.randint(0, 256, (100,))
>>> full = perplexity(model, ids, chunk_size=100).perplexity
>>> small = perplexity(model, ids, kv_cache="h2o+int8", cache_tokens=32, chunk_size=16)
>>> abs(perplexity(model, ids, chunk_size=7).perplexity - full) < 1e-3 * full, small.n_tokens
(True, 99)
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch.nn import functional as F

from .cache import build_cache
from .cache.base import KVCache
from .cache.prefill import _model, check_context, stream
from .cache.spec import PolicySpec, parse_policy
from .errors import CacheError
from .model.pipeline import cache_devices


@dataclasses.dataclass
class PerplexityResult:
    perplexity: float  # exp(nll)
    nll: float  # mean next-token negative log-likelihood, nats
    n_tokens: int  # tokens scored (the text's length minus the first token)
    cache_memory_bytes: int  # peak bytes held by the cache's buffers between chunks
    tokens_per_second: float  # tokens streamed per second of wall time


def perplexity(model, token_ids: list[int] | torch.Tensor, kv_cache: str | PolicySpec = "dense",
               cache_tokens: int | str | None = None, chunk_size: int = 256, progress: bool = False) -> PerplexityResult:
    """Perplexity of ``token_ids`` under ``model`` (a GPT or an LLM) with cache policy ``kv_cache``
    (a spec's text or a parsed :class:`~lucidlm.cache.spec.PolicySpec`).

    ``cache_tokens``: slots per layer (``dense``: default the text's length; others: see
    :func:`lucidlm.cache.build_cache`). Raises :class:`CacheError` for a text longer than the model's
    context length (positions are never wrapped).
    """
    gpt = _model(model)
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] < 2:
        raise CacheError(f"token_ids has {ids.shape[1]} token(s): perplexity needs at least 2")
    check_context(gpt.config, torch.tensor([ids.shape[1] - 1]))
    spec = parse_policy(kv_cache)
    cache_tokens = spec.budget(cache_tokens, ids.shape[1])  # dense: room for exactly this text
    param = next(gpt.parameters())
    cache = build_cache(gpt.config, 1, spec, cache_tokens, dtype=param.dtype,
                        device=cache_devices(gpt, param.device))
    result, _ = score(gpt, ids.to(param.device), cache, chunk_size, progress)
    return result


@torch.no_grad()
def score(model, ids: torch.Tensor, cache: KVCache, chunk_size: int = 256,
          progress: bool = False, question: int | None = None) -> tuple[PerplexityResult, torch.Tensor]:
    """Stream ``ids`` (1, tokens) through an empty ``cache``; the result and the last logits (1, vocab).

    The cache stays filled, so a caller can go on decoding (``lucidlm bench kv`` times that).
    ``question``: how many trailing tokens are a question, for a cache that compresses knowing it
    (:func:`~lucidlm.cache.prefill.stream`).
    """
    total, peak, last = 0.0, 0, None
    bar = _progress(ids.shape[1], progress)
    start = time.perf_counter()
    offset = 0
    for logits in stream(model, ids, cache, chunk_size, question=question):
        n = logits.shape[1]
        # predecessors: the previous chunk's last logits, then this chunk's all but its last
        preds = logits[:, :-1] if last is None else torch.cat([last[:, None], logits[:, :-1]], dim=1)
        targets = ids[:, offset + (last is None):offset + n]
        total += F.cross_entropy(preds.reshape(-1, preds.shape[-1]).float(), targets.reshape(-1),
                                 reduction="sum").item()
        last, offset = logits[:, -1], offset + n
        peak = max(peak, cache.memory_bytes())
        bar.update(n)
    bar.close()
    elapsed = time.perf_counter() - start
    n_scored = ids.shape[1] - 1
    nll = total / n_scored
    return PerplexityResult(math.exp(nll), nll, n_scored, peak, ids.shape[1] / elapsed), last


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", desc="perplexity", disable=not enabled, leave=False)
