"""The KV-cache policy names, torch-free: the command line checks ``--kv-cache`` before loading anything.

:mod:`lucidlm.cache` builds its :data:`~lucidlm.cache.POLICIES` from these names (one list). A
policy is an eviction (``dense``, ``window``, ``sink``, ``h2o``), optionally with quantised buffers
(``+int8`` / ``+int4``; ``int8`` alone means ``dense+int8``).

>>> check_policy("h2o+int4")
'h2o+int4'
>>> try:
...     check_policy("lru")
... except CacheError as exc:
...     print(str(exc)[:70])
policy='lru' is not a KV-cache policy; valid: dense, window, sink, h2o
"""

from __future__ import annotations

from .errors import CacheError

#: eviction policies: how a bounded cache chooses which keys to drop
EVICTIONS = ("dense", "window", "sink", "h2o")
#: quantised key/value buffers
QUANTS = ("int8", "int4")
#: every policy name -> (eviction, quantisation or None), in the order error messages list them
POLICY_NAMES: dict[str, tuple[str, str | None]] = {
    **{e: (e, None) for e in EVICTIONS},
    **{q: ("dense", q) for q in QUANTS},
    **{f"{e}+{q}": (e, q) for e in EVICTIONS for q in QUANTS},
}
#: budget of an evicting policy when ``cache_tokens`` is not given (``dense``: the context length)
DEFAULT_CACHE_TOKENS = 512


def check_policy(name: str) -> str:
    """``name`` when it is a KV-cache policy; else :class:`CacheError` listing the valid names."""
    if name not in POLICY_NAMES:
        raise CacheError(f"policy={name!r} is not a KV-cache policy; valid: {', '.join(POLICY_NAMES)}")
    return name
