"""KV caches: the dense cache and bounded policies that keep memory independent of the input length.

A policy is a spec (:mod:`lucidlm.cache.spec`, the one table and parser): an eviction name with
optional parameters and quantised buffers, ``NAME[(key=value, ...)][+int8|+int4]`` — ``dense``,
``window``, ``sink``, ``h2o``, ``snapkv``, ``tova``, ``knorm``, ``pyramidkv``, ``h2o-vlen``,
``qh2o``, and the presses that compress once at the prompt's end (:mod:`lucidlm.cache.presses`):
``expected-attention``, ``kvzip``, ``snapkv-q``, ``duo``; ``int8`` alone means ``dense+int8``.
``cache_tokens`` is the number of slots each layer keeps between steps (``pyramidkv``: on average
over the layers). The scored policies take ``heads=shared|each|adaptive``: one decision per layer,
one per KV head, or per head with the layer's budget shared out by score (AdaKV;
:mod:`lucidlm.cache.slots`); the presses decide per head by default. A user's text is parsed once, where
it enters (:meth:`LLM.generate <lucidlm.api.LLM.generate>`, :func:`~lucidlm.generate.generate_ids`,
:func:`~lucidlm.perplexity.perplexity`, the server, chunked training), into a :class:`PolicySpec`
that is passed down: every function here takes the text or the spec, and a spec is never parsed again.

Importing this package does not import torch (the command line parses ``--kv-cache`` with
:mod:`lucidlm.cache.spec` before loading anything); the caches load on first use.

>>> import torch
>>> from lucidlm import Config
>>> config = Config.from_name("tiny-llama")
>>> cache = build_cache(config, batch=2, policy="h2o+int8", cache_tokens=64)
>>> cache.capacity, cache.layers[0].wants_scores
(64, True)
>>> build_cache(config, batch=1, policy="snapkv(window=8, kernel=3)", cache_tokens=32).layers[0].window
8
>>> try:
...     build_cache(config, batch=1, policy="lru")
... except CacheError as exc:
...     print(str(exc)[:70])
policy='lru' is not a KV-cache policy; valid: dense, window, sink, h2o
"""

from __future__ import annotations

import importlib
import sys

from ..errors import CacheError
from .spec import DEFAULT_CACHE_TOKENS, POLICY_NAMES, PolicySpec, check_policy, parse_policy

#: name -> (submodule, attribute) of what loads with torch on first use
_LAZY: dict[str, tuple[str, str]] = {
    **{name: ("base", name) for name in ("KVCache", "LayerCache", "DenseLayerCache", "dense_cache")},
    **{name: ("policies", name) for name in (
        "POLICIES", "build_cache", "SlotLayerCache", "WindowLayerCache", "SinkLayerCache", "H2OLayerCache",
        "VLengthH2OLayerCache", "QuantH2OLayerCache", "SnapKVLayerCache", "TOVALayerCache", "KNormLayerCache",
        "DenseSlotLayerCache", "pyramid_budgets")},
    "_EVICTION": ("policies", "EVICTION_CLASSES"),
    **{name: ("presses", name) for name in ("ExpectedAttentionLayerCache", "QuestionSnapKVLayerCache")},
    "KVzipLayerCache": ("kvzip", "KVzipLayerCache"),
    "DuoLayerCache": ("duo", "DuoLayerCache"),
    **{name: ("prefill", name) for name in ("prefill", "stream", "check_context")},
    **{name: ("quant", name) for name in ("FloatStore", "Int8Store", "Int4Store")},
}


def _load() -> None:
    # All at once, and each name bound after its submodule is imported: importing the submodule
    # ``prefill`` binds the package attribute ``prefill`` to the module, which the function replaces.
    for name, (module, attribute) in _LAZY.items():
        globals()[name] = getattr(importlib.import_module(f".{module}", __name__), attribute)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _load()
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if "torch" in sys.modules:  # torch is there already: load now, exactly as an eager package would
    _load()

__all__ = [
    "DEFAULT_CACHE_TOKENS",
    "POLICIES",
    "POLICY_NAMES",
    "CacheError",
    "DenseLayerCache",
    "DenseSlotLayerCache",
    "DuoLayerCache",
    "ExpectedAttentionLayerCache",
    "FloatStore",
    "H2OLayerCache",
    "Int4Store",
    "Int8Store",
    "KNormLayerCache",
    "KVCache",
    "KVzipLayerCache",
    "LayerCache",
    "PolicySpec",
    "QuantH2OLayerCache",
    "QuestionSnapKVLayerCache",
    "SinkLayerCache",
    "SlotLayerCache",
    "SnapKVLayerCache",
    "TOVALayerCache",
    "VLengthH2OLayerCache",
    "WindowLayerCache",
    "build_cache",
    "check_context",
    "check_policy",
    "dense_cache",
    "parse_policy",
    "prefill",
    "pyramid_budgets",
    "stream",
]
