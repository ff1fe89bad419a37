"""The KV-cache policy names, torch-free: a re-export of :mod:`lucidlm.cache.spec` (the one table and
parser), kept for the callers that import from here.

>>> check_policy("h2o+int4")
'h2o+int4'
>>> try:
...     check_policy("lru")
... except CacheError as exc:
...     print(str(exc)[:70])
policy='lru' is not a KV-cache policy; valid: dense, window, sink, h2o
"""

from __future__ import annotations

from .cache.spec import (
           DEFAULT_CACHE_TOKENS,
           EVICTIONS,
           POLICY_NAMES,
           QUANTS,
           check_policy,
           parse_policy,
)
from .errors import CacheError

__all__ = [
           "DEFAULT_CACHE_TOKENS",
           "EVICTIONS",
           "POLICY_NAMES",
           "QUANTS",
           "CacheError",
           "check_policy",
           "parse_policy",
]
