"""KV caches: the dense cache and bounded policies that keep memory independent of the input length.

Policies by name (see :data:`POLICIES`): ``dense``, ``window``, ``sink``, ``h2o``, each optionally
with quantised buffers ``+int8`` / ``+int4`` (``int8`` alone means ``dense+int8``).
``cache_tokens`` is the number of slots each layer keeps between steps.

>>> import torch
>>> from lucidlm import Config
>>> config = Config.from_name("tiny-llama")
>>> cache = build_cache(config, batch=2, policy="h2o+int8", cache_tokens=64)
>>> cache.capacity, cache.layers[0].wants_scores
(64, True)
>>> try:
...     build_cache(config, batch=1, policy="lru")
... except CacheError as exc:
...     print(str(exc)[:70])
policy='lru' is not a KV-cache policy; valid: dense, window, sink, h2o
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ..cache_names import DEFAULT_CACHE_TOKENS, POLICY_NAMES, check_policy
from ..errors import CacheError
from .base import DenseLayerCache, KVCache, LayerCache, dense_cache
from .policies import DenseSlotLayerCache, H2OLayerCache, SinkLayerCache, SlotLayerCache, WindowLayerCache
from .prefill import check_context, prefill, stream
from .quant import STORES, FloatStore, Int4Store, Int8Store

_EVICTION: dict[str, type[SlotLayerCache]] = {"dense": DenseSlotLayerCache, "window": WindowLayerCache,
                                              "sink": SinkLayerCache, "h2o": H2OLayerCache}


def _build(eviction: str, quant: str | None, config, batch: int, cache_tokens: int | None,
           dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
    name = eviction + (f"+{quant}" if quant else "")
    if cache_tokens is None:
        cache_tokens = config.block_size if eviction == "dense" else DEFAULT_CACHE_TOKENS
    if not isinstance(cache_tokens, int) or cache_tokens < 1:
        raise CacheError(f"cache_tokens={cache_tokens!r} must be a positive number of tokens (policy {name!r})")
    if eviction == "dense" and quant is None:
        return dense_cache(config, batch, cache_tokens, dtype, device)
    store = STORES[quant] if quant else FloatStore
    cls = _EVICTION[eviction]
    return KVCache([cls(batch, config.n_query_groups, config.head_size, cache_tokens, dtype, device, store=store)
                    for _ in range(config.n_layer)])


def _registry() -> dict[str, Callable[..., KVCache]]:
    return {name: partial(_build, e, q) for name, (e, q) in POLICY_NAMES.items()}


#: policy name -> factory ``(config, batch, cache_tokens, dtype=..., device=...) -> KVCache``
POLICIES: dict[str, Callable[..., KVCache]] = _registry()


def build_cache(config, batch: int, policy: str = "dense", cache_tokens: int | None = None,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
    """A :class:`KVCache` for ``config`` with ``policy`` and ``cache_tokens`` slots per layer.

    ``cache_tokens`` None: the context length for ``dense``, :data:`DEFAULT_CACHE_TOKENS` otherwise.
    Raises :class:`CacheError` for an unknown policy or a budget too small for it.
    """
    if policy not in POLICIES:
        check_policy(policy)  # raises CacheError naming the valid policies
    return POLICIES[policy](config, batch, cache_tokens, dtype=dtype, device=device)


__all__ = ["POLICIES", "DEFAULT_CACHE_TOKENS", "KVCache", "LayerCache", "DenseLayerCache", "SlotLayerCache",
           "WindowLayerCache", "SinkLayerCache", "H2OLayerCache", "DenseSlotLayerCache", "FloatStore",
           "Int8Store", "Int4Store", "build_cache", "dense_cache", "prefill", "stream", "check_context"]
