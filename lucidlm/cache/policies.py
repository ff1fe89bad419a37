"""Bounded KV caches: a fixed number of slots per layer and a policy that decides which tokens stay.

:class:`SlotLayerCache` implements the extend/settle contract of :mod:`lucidlm.cache.base` once;
a policy only says which slots to keep (:meth:`SlotLayerCache.priority`: the ``capacity`` slots of
highest priority survive). Every slot carries its true position, so gaps left by eviction are
fine: keys were rotated at their true positions when they arrived and are never re-rotated.

* :class:`WindowLayerCache` — the most recent tokens.
* :class:`SinkLayerCache` — StreamingLLM: the first ``n_sink`` positions forever, plus the most recent.
* :class:`H2OLayerCache` — heavy hitters: the highest accumulated attention weight, plus a
  protected window of the most recent tokens; :class:`VLengthH2OLayerCache` (``h2o-vlen``) weighs
  the attention by the value norms, :class:`QuantH2OLayerCache` (``qh2o``) subtracts the
  quantisation error of the stored keys and values.
* :class:`SnapKVLayerCache` — SnapKV: the attention of the step's last ``window`` queries, pooled
  along the keys (``pyramidkv``: the same per layer, with budgets from :func:`pyramid_budgets`);
  :class:`TOVALayerCache` — the attention of the newest query alone.
* :class:`KNormLayerCache` — the keys of smallest L2 norm stay (needs no attention weights).
* :class:`DenseSlotLayerCache` — keeps everything (used for ``dense+int8``), fails when full.

Every policy composes with a quantised store (:mod:`lucidlm.cache.quant`): the tokens of the
current step are attended at full precision and quantised in ``settle``. Decisions are made per
sequence of the batch; a left-padded sequence evicts exactly as it would alone (padding slots go
first and count as nothing).

**Shared or per-head slots** (:mod:`lucidlm.cache.slots`). SnapKV, PyramidKV, key-norm and
keys_values' H2O variants score each KV head. The scored policies take ``heads``: ``shared``
(default) makes one decision per layer on the groups' mean score, and every group keeps the same
positions (batch, slots); ``each`` lets every KV group keep its own ``capacity`` best slots;
``adaptive`` shares the layer's ``groups * capacity`` slots out among the groups by score (AdaKV,
with its floor). Per-head positions are (batch, groups, slots); attention masks each group with
its own, :meth:`~lucidlm.cache.base.KVCache.kept_positions` reports the union over a layer's
heads and :meth:`~lucidlm.cache.base.KVCache.kept_by_head` each head's, and an explanation's
replay (:mod:`lucidlm.explain.cached`) restricts each head to what it saw.

>>> import torch
>>> layer = WindowLayerCache(batch=1, groups=1, head_size=4, capacity=3)
>>> for t in range(5):
...     k = v = torch.randn(1, 1, 1, 4)
...     _ = layer.extend(k, v, torch.tensor([[t]]))
...     layer.settle(None)
>>> layer.pos.tolist()
[[2, 3, 4]]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from functools import partial

import torch
from torch.nn import functional as F

from ..errors import CacheError
from .base import KVCache, LayerCache, dense_cache, layer_devices
from .duo import DuoLayerCache
from .kvzip import KVzipLayerCache
from .presses import ExpectedAttentionLayerCache, QuestionSnapKVLayerCache
from .quant import STORES, FloatStore
from .slots import SlotLayerCache, _minmax, _protected, grown
from .spec import POLICY_NAMES, PolicySpec, default_window, parse_policy


class WindowLayerCache(SlotLayerCache):
    """The ``capacity`` most recent tokens (a sliding window over the stream)."""


class SinkLayerCache(SlotLayerCache):
    """StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
    ICLR 2024): positions ``0 .. n_sink-1`` are never evicted; the rest is a recent window.

    >>> import torch
    >>> layer = SinkLayerCache(batch=1, groups=1, head_size=2, capacity=4, n_sink=2)
    >>> _ = layer.extend(torch.zeros(1, 1, 9, 2), torch.zeros(1, 1, 9, 2), torch.arange(9)[None])
    >>> layer.settle(None); layer.pos.tolist()
    [[0, 1, 7, 8]]
    """

    policy = "sink"

    def __init__(self, *args, n_sink: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.capacity <= n_sink:
            raise CacheError(f"cache_tokens={self.capacity} must exceed the {n_sink} sink tokens of policy 'sink'")
        self.n_sink = n_sink

    def priority(self, pos):
        sink = (pos >= 0) & (pos < self.n_sink)
        return pos.float() + sink.float() * 2.0 ** 40  # above any position a model can reach


class H2OLayerCache(SlotLayerCache):
    """Heavy-Hitter Oracle (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
    Inference of Large Language Models", NeurIPS 2023): keep the tokens with the highest attention
    weight accumulated over every query so far, plus the ``recent`` most recent tokens and the
    first ``n_sink`` positions (protected).

    ``scores`` from attention are (batch, groups, keys); a slot's score is their mean over groups.

    >>> import torch
    >>> layer = H2OLayerCache(batch=1, groups=1, head_size=2, capacity=3, recent=1)
    >>> kv = torch.zeros(1, 1, 4, 2)
    >>> _ = layer.extend(kv, kv, torch.arange(4)[None])
    >>> layer.settle(torch.tensor([[[0.5, 0.1, 0.3, 0.0]]]))  # slot 3 is recent, 0 and 2 are heavy
    >>> layer.pos.tolist()
    [[0, 2, 3]]
    """

    policy = "h2o"
    wants_scores = True
    slot_state = ("score",)

    def __init__(self, *args, recent: int | None = None, n_sink: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # at least the newest token: it has had no chance yet to collect attention
        self.recent = max(1, self.capacity // 2 if recent is None else recent)
        if self.capacity <= self.recent + n_sink:
            raise CacheError(f"cache_tokens={self.capacity} must exceed the protected recent window "
                             f"({self.recent}) plus sinks ({n_sink}) of policy {self.policy!r}")
        self.n_sink = n_sink
        self.score = self._empty_score()  # (batch, [groups,] slots) float32

    def observe(self, scores, k, v, pos):
        total = grown(self.score, k.shape[2])
        if scores is not None:  # NaN only from padding queries with nothing visible: worth nothing
            total = total + self.per_group(self.instant(torch.nan_to_num(scores.float(), nan=0.0), pos))
        self.score = total

    def instant(self, scores: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """This step's score per group and slot (batch, groups, slots), accumulated into ``score``."""
        return scores

    def protected(self, pos: torch.Tensor) -> torch.Tensor:
        return _protected(pos, self.recent, self.n_sink)

    def priority(self, pos):
        return self.score.masked_fill(self.protected(pos), torch.inf)


class VLengthH2OLayerCache(H2OLayerCache):
    """``h2o-vlen`` of keys_values (Amazon's KV-cache library on LitGPT, ``VLengthH2OKVCache``):
    H2O whose step score is the attention weight times the value norm, normalised per group to
    the step's number of queries: ``S_j = n_Q · m_j |v_j| / Σ_i m_i |v_i|`` with ``m_j`` the weight
    summed over the step's queries, accumulated like H2O. A token that receives attention but
    whose value is near zero adds little to any output, and scores little.

    >>> import torch
    >>> layer = VLengthH2OLayerCache(batch=1, groups=1, head_size=2, capacity=3, recent=1)
    >>> k = torch.zeros(1, 1, 4, 2); v = torch.tensor([[[[4., 0], [1, 0], [1, 0], [1, 0]]]])
    >>> _ = layer.extend(k, v, torch.arange(4)[None])
    >>> layer.settle(torch.tensor([[[0.2, 0.5, 0.3, 0.0]]]))  # H2O would keep 1, 2; |v| favours 0
    >>> layer.pos.tolist()
    [[0, 1, 3]]
    """

    policy = "h2o-vlen"
    slot_state = ("score", "v_norm")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.v_norm = self._empty_state(self.k[0].shape[1])  # (batch, groups, slots)

    def observe(self, scores, k, v, pos):
        self.v_norm = torch.cat([self.v_norm, v.detach().float().norm(dim=-1)], dim=2)
        super().observe(scores, k, v, pos)

    def instant(self, scores, pos):
        weighted = scores * self.v_norm
        total = weighted.sum(-1, keepdim=True)
        n_queries = (pos >= 0).sum(1).float()[:, None, None]  # this row's real queries
        return torch.where(total > 0, weighted * n_queries / total.clamp_min(1e-30), torch.zeros_like(weighted))


class QuantH2OLayerCache(H2OLayerCache):
    """``qh2o`` of keys_values (``QuantizedH2OKVCache``, after Q-Hitter: Zhang et al., "Q-Hitter: A
    Better Token Oracle for Efficient LLM Inference via Sparse-Quantized KV Cache", MLSys 2024):
    prefer tokens that are heavy hitters *and* quantise well. Priority
    ``w · mm(H2O score) − (1 − w)/2 · mm(error)``, ``mm`` a min-max scaling over the row's
    evictable slots, ``error`` = ‖k − deq(q(k))‖ + ‖v − deq(q(v))‖ measured once when the token is
    stored (keys_values scales each group's scores and evicts per group; here both are averaged
    over the groups first, as slots are shared). Without ``+int8``/``+int4`` every error is 0 and
    ``qh2o`` evicts exactly as ``h2o`` (for ``weight`` > 0).
    """

    policy = "qh2o"
    slot_state = ("score", "q_error")

    def __init__(self, *args, weight: float = 0.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight = weight
        self.q_error = self._empty_score()  # (batch, [groups,] slots)

    def observe(self, scores, k, v, pos):
        error = self.per_group(self.store.error(k.detach()) + self.value_store.error(v.detach()))
        self.q_error = torch.cat([self.q_error, error], dim=-1)
        super().observe(scores, k, v, pos)

    def priority(self, pos):
        protected = self.protected(pos)
        among = (pos >= 0) & ~protected
        mixed = self.weight * _minmax(self.score, among) - (1 - self.weight) / 2 * _minmax(self.q_error, among)
        return mixed.masked_fill(protected, torch.inf)


class SnapKVLayerCache(SlotLayerCache):
    """SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024):
    the keys that the observation window — the step's last ``window`` queries — attends to most,
    their weights pooled along the keys (``pool`` avg or max over ``kernel`` neighbouring slots)
    so that the tokens around a hit stay with it; the window's own tokens (the ``window`` newest)
    are protected. Scores come from this step alone (no accumulation): at a prefill chunk it is
    SnapKV's window, at a decode step the one new query. Pooling runs over neighbouring *kept*
    slots (in position order, gaps included) and over each group before the groups are averaged.

    >>> import torch
    >>> layer = SnapKVLayerCache(batch=1, groups=1, head_size=2, capacity=3, window=1, kernel=3)
    >>> kv = torch.zeros(1, 1, 7, 2)
    >>> _ = layer.extend(kv, kv, torch.arange(7)[None])
    >>> layer.settle(torch.tensor([[[0.0, 0.3, 0.9, 0.1, 0.0, 0.5, 0.0]]]))
    >>> layer.pos.tolist()  # 6 is the window; pooled, 1 (0.4) beats the isolated 5 (0.17)
    [[1, 2, 6]]
    """

    policy = "snapkv"
    wants_scores = True

    def __init__(self, *args, window: int | None = None, kernel: int = 5, pool: str = "avg", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.window = self.score_queries = default_window(self.capacity) if window is None else window
        if self.capacity <= self.window:
            raise CacheError(f"cache_tokens={self.capacity} must exceed the observation window "
                             f"({self.window}) of policy {self.policy!r}")
        if kernel < 1 or kernel % 2 == 0 or pool not in ("avg", "max"):
            raise CacheError(f"policy {self.policy!r}: kernel={kernel} must be odd >= 1 and pool={pool!r} avg or max")
        self.kernel, self.pool = kernel, pool
        self._step: torch.Tensor | None = None

    def observe(self, scores, k, v, pos):
        self._step = None if scores is None else torch.nan_to_num(scores.float(), nan=0.0)

    def priority(self, pos):
        if self._step is None:
            step = torch.zeros(pos.shape[0], pos.shape[1] if self.per_head else 1, pos.shape[-1], device=pos.device)
        else:  # padding and empty slots score nothing, as SnapKV's zero padding of the pooling
            step = self._step.masked_fill(pos < 0 if self.per_head else (pos < 0)[:, None, :], 0.0)
        pool = F.avg_pool1d if self.pool == "avg" else F.max_pool1d
        pooled = self.per_group(pool(step, self.kernel, stride=1, padding=self.kernel // 2))
        return pooled.masked_fill(_protected(pos, self.window), torch.inf)


class TOVALayerCache(SnapKVLayerCache):
    """TOVA (Oren et al., "Transformers are Multi-State RNNs", 2024): evict the tokens with the
    lowest attention weight from the newest query, averaged over all heads; nothing accumulates.
    The newest token itself is kept (as kvpress does; it usually holds a large weight anyway).

    >>> import torch
    >>> layer = TOVALayerCache(batch=1, groups=2, head_size=2, capacity=2)
    >>> kv = torch.zeros(1, 2, 3, 2)
    >>> _ = layer.extend(kv, kv, torch.arange(3)[None])
    >>> layer.settle(torch.tensor([[[0.6, 0.1, 0.3], [0.0, 0.4, 0.6]]]))  # means .3, .25, .45
    >>> layer.pos.tolist()
    [[0, 2]]
    """

    policy = "tova"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, window=1, kernel=1, **kwargs)


class KNormLayerCache(SlotLayerCache):
    """Key norm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression", EMNLP 2024): keys of low L2 norm draw high attention, so the slots whose keys
    have the largest norm (mean over the groups, measured before quantisation) are evicted.
    Needs no attention weights, so attention keeps its fused kernel.

    >>> import torch
    >>> layer = KNormLayerCache(batch=1, groups=1, head_size=2, capacity=2)
    >>> k = torch.tensor([[[[3., 0], [1, 0], [0, 2]]]])
    >>> _ = layer.extend(k, k, torch.arange(3)[None]); layer.settle(None)
    >>> layer.pos.tolist()
    [[1, 2]]
    """

    policy = "knorm"
    slot_state = ("k_norm",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.k_norm = self._empty_score()  # (batch, [groups,] slots)

    def observe(self, scores, k, v, pos):
        self.k_norm = torch.cat([self.k_norm, self.per_group(k.detach().float().norm(dim=-1))], dim=-1)

    def priority(self, pos):
        return -self.k_norm


class DenseSlotLayerCache(SlotLayerCache):
    """Keeps every token (for quantised dense caches); asking for more than ``capacity`` fails."""

    policy = "dense"

    def extend(self, k, v, pos):
        if self.pos.shape[-1] + pos.shape[-1] > self.capacity:
            raise CacheError(f"dense cache full: {self.pos.shape[-1] + pos.shape[-1]} tokens > "
                             f"cache_tokens={self.capacity}; use an evicting policy or a larger budget")
        return super().extend(k, v, pos)


def pyramid_budgets(cache_tokens: int, n_layer: int, window: int, beta: int = 20) -> list[int]:
    """PyramidKV's per-layer capacities (Cai et al., "PyramidKV: Dynamic KV Cache Compression based
    on Pyramidal Information Funneling", 2024; the arithmetic schedule of kvpress/KVCache-Factory):
    every layer keeps its ``window``; the rest, ``cache_tokens - window`` per layer on average,
    falls linearly from the first layer to the last, whose share is ``1/beta`` of the mean (at
    least 1). The sum is exactly ``cache_tokens * n_layer`` (rounding down, the remainder going to
    the lowest layers) and budgets never grow with depth.

    >>> pyramid_budgets(64, 4, window=8, beta=4)
    [106, 78, 50, 22]
    """
    spare = cache_tokens - window
    if spare < 1:
        raise CacheError(f"cache_tokens={cache_tokens} must exceed the observation window ({window}) of policy "
                         "'pyramidkv'")
    low = max(Fraction(1), Fraction(spare, beta))
    high = 2 * spare - low
    step = (high - low) / (n_layer - 1) if n_layer > 1 else Fraction(0)
    shares = [math.floor(high - i * step) for i in range(n_layer)] if n_layer > 1 else [spare]
    rest = n_layer * spare - sum(shares)
    return [window + share + (i < rest) for i, share in enumerate(shares)]


#: eviction name -> layer class (``pyramidkv``: SnapKV layers of different capacities)
EVICTION_CLASSES: dict[str, type[SlotLayerCache]] = {
    "dense": DenseSlotLayerCache, "window": WindowLayerCache, "sink": SinkLayerCache, "h2o": H2OLayerCache,
    "snapkv": SnapKVLayerCache, "tova": TOVALayerCache, "knorm": KNormLayerCache, "pyramidkv": SnapKVLayerCache,
    "h2o-vlen": VLengthH2OLayerCache, "qh2o": QuantH2OLayerCache,
    # presses: hold the prompt, compress at its end (presses.py, kvzip.py, duo.py)
    "expected-attention": ExpectedAttentionLayerCache, "kvzip": KVzipLayerCache, "snapkv-q": QuestionSnapKVLayerCache,
    "duo": DuoLayerCache,
}


def _capacities(spec: PolicySpec, n_layer: int, cache_tokens: int) -> tuple[list[int], dict]:
    """Each layer's capacity and the keyword arguments of its class."""
    params = dict(spec.params)
    if spec.eviction != "pyramidkv":
        return [cache_tokens] * n_layer, params
    params["window"] = params.get("window") or default_window(cache_tokens)
    budgets = pyramid_budgets(cache_tokens, n_layer, params["window"], params.pop("beta", spec.value("beta")))
    return budgets, params


def build_cache(config, batch: int, policy: str | PolicySpec = "dense", cache_tokens: int | None = None,
                dtype: torch.dtype = torch.float32, device: torch.device | str | list = "cpu") -> KVCache:
    """A :class:`KVCache` for ``config`` with ``policy`` (a name, a spec string such as
    ``"snapkv(window=8)+int8"``, or a :class:`PolicySpec`) and ``cache_tokens`` slots per layer
    (``pyramidkv``: on average).

    ``device``: one, or one per layer (:func:`~lucidlm.cache.base.layer_devices`).
    ``cache_tokens`` None: the context length for ``dense``, :data:`~lucidlm.cache.spec.DEFAULT_CACHE_TOKENS`
    otherwise (:meth:`PolicySpec.budget`).
    Raises :class:`CacheError` for an unknown policy or parameter, or a budget too small for it.
    """
    spec = parse_policy(policy)  # a spec passes through as it is
    cache_tokens = spec.budget(cache_tokens, config.block_size)
    if not isinstance(cache_tokens, int) or isinstance(cache_tokens, bool) or cache_tokens < 1:
        raise CacheError(f"cache_tokens={cache_tokens!r} must be a positive number of tokens (policy {str(spec)!r})")
    if spec.is_plain_dense:
        return dense_cache(config, batch, cache_tokens, dtype, device)
    store = STORES[spec.quant] if spec.quant else FloatStore
    capacities, params = _capacities(spec, config.n_layer, cache_tokens)
    cls = EVICTION_CLASSES[spec.eviction]
    groups, key_size, value_size = config.kv_slot_sizes()
    if value_size == 0 and cls is VLengthH2OLayerCache:
        raise CacheError(f"policy {str(spec)!r} ranks tokens by their values' norms, and this model's cache holds no "
                         "values (multi-head latent attention caches the latent); use h2o")
    devices = layer_devices(device, config.n_layer)
    # a class may set each layer's arguments itself (duo: its heads' scores from a file)
    layer_params = getattr(cls, "layer_params", None)
    per_layer = layer_params(config, params) if layer_params else [params] * config.n_layer
    return KVCache([cls(batch, groups, key_size, c, dtype, d, store=store, value_size=value_size, **p)
                    for c, d, p in zip(capacities, devices, per_layer)])


def _factory(spec: PolicySpec, config, batch: int, cache_tokens: int | None = None, **kwargs) -> KVCache:
    return build_cache(config, batch, spec, cache_tokens, **kwargs)


#: policy name -> factory ``(config, batch, cache_tokens, dtype=..., device=...) -> KVCache``
POLICIES: dict[str, Callable[..., KVCache]] = {name: partial(_factory, PolicySpec(e, q))
                                               for name, (e, q) in POLICY_NAMES.items()}
