"""Bounded KV caches: a fixed number of slots per layer and a policy that decides which tokens stay.

:class:`SlotLayerCache` implements the extend/settle contract of :mod:`lucidlm.cache.base` once;
a policy only says which slots to keep (:meth:`SlotLayerCache.priority`: the ``capacity`` slots of
highest priority survive). Every slot carries its true position, so gaps left by eviction are
fine: keys were rotated at their true positions when they arrived and are never re-rotated.

* :class:`WindowLayerCache` — the most recent tokens.
* :class:`SinkLayerCache` — StreamingLLM: the first ``n_sink`` positions forever, plus the most recent.
* :class:`H2OLayerCache` — heavy hitters: the highest accumulated attention weight, plus a
  protected window of the most recent tokens; decided per sequence of the batch (one decision per
  layer shared by its KV groups, since a slot's position is shared by the groups).
* :class:`DenseSlotLayerCache` — keeps everything (used for ``dense+int8``), fails when full.

Every policy composes with a quantised store (:mod:`lucidlm.cache.quant`): the tokens of the
current step are attended at full precision and quantised in ``settle``.

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

import torch

from ..errors import CacheError
from .base import LayerCache
from .quant import FloatStore


class SlotLayerCache(LayerCache):
    """Keeps at most ``capacity`` slots between steps; subclasses rank the slots."""

    def __init__(self, batch: int, groups: int, head_size: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 store: type[FloatStore] = FloatStore) -> None:
        self.capacity = capacity
        self.store = store(head_size, dtype)
        empty = torch.zeros(batch, groups, 0, head_size, dtype=dtype, device=device)
        self.k, self.v = self.store.encode(empty), self.store.encode(empty)  # lists of parts
        self.pos = torch.full((batch, 0), -1, dtype=torch.long, device=device)
        self._new: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ---- the contract ------------------------------------------------------------------------
    def extend(self, k, v, pos):
        self._new = (k, v, pos)
        keys = torch.cat([self.store.decode(self.k), k.to(self.store.dtype)], dim=2)
        values = torch.cat([self.store.decode(self.v), v.to(self.store.dtype)], dim=2)
        return keys, values, torch.cat([self.pos, pos], dim=1)

    def settle(self, scores):
        if self._new is None:
            raise CacheError("settle() called without a preceding extend()")
        k, v, pos = self._new
        self._new = None
        if bool((pos < 0).any()):  # padding may hold NaN (a query with no visible key): store zeros
            pad = (pos < 0)[:, None, :, None]
            k, v = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
        all_pos = torch.cat([self.pos, pos], dim=1)
        self.observe(scores, pos.shape[1])
        keep = self.select(all_pos) if all_pos.shape[1] > self.capacity else None
        self.k = self._merge(self.k, self.store.encode(k), keep)
        self.v = self._merge(self.v, self.store.encode(v), keep)
        self.pos = all_pos if keep is None else all_pos.gather(1, keep)
        self.kept(keep)

    def buffers(self):
        return [*self.k, *self.v, self.pos]

    # ---- policy hooks ------------------------------------------------------------------------
    def priority(self, pos: torch.Tensor) -> torch.Tensor:
        """(batch, slots) float: the ``capacity`` highest survive. Default: the most recent."""
        return pos.float()

    def observe(self, scores: torch.Tensor | None, n_new: int) -> None:
        """See the attention scores of this step (only policies with ``wants_scores`` get any)."""

    def kept(self, keep: torch.Tensor | None) -> None:
        """After eviction: ``keep`` (batch, capacity) indexes the slots before eviction."""

    # ---- helpers -----------------------------------------------------------------------------
    def select(self, all_pos: torch.Tensor) -> torch.Tensor:
        """Indices (batch, capacity) of the slots to keep, in their old order."""
        rank = self.priority(all_pos).masked_fill(all_pos < 0, -torch.inf)  # empty slots go first
        return rank.topk(self.capacity, dim=1).indices.sort(dim=1).values

    @staticmethod
    def _merge(old: list[torch.Tensor], new: list[torch.Tensor], keep: torch.Tensor | None) -> list[torch.Tensor]:
        parts = [torch.cat([o, n], dim=2) for o, n in zip(old, new)]
        if keep is None:
            return parts
        return [p.gather(2, keep[:, None, :, None].expand(p.shape[0], p.shape[1], -1, p.shape[3]))
                for p in parts]


class WindowLayerCache(SlotLayerCache):
    """The ``capacity`` most recent tokens (a sliding window over the stream)."""


class SinkLayerCache(SlotLayerCache):
    """StreamingLLM: positions ``0 .. n_sink-1`` are never evicted; the rest is a recent window.

    >>> import torch
    >>> layer = SinkLayerCache(batch=1, groups=1, head_size=2, capacity=4, n_sink=2)
    >>> _ = layer.extend(torch.zeros(1, 1, 9, 2), torch.zeros(1, 1, 9, 2), torch.arange(9)[None])
    >>> layer.settle(None); layer.pos.tolist()
    [[0, 1, 7, 8]]
    """

    def __init__(self, *args, n_sink: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.capacity <= n_sink:
            raise CacheError(f"cache_tokens={self.capacity} must exceed the {n_sink} sink tokens of policy 'sink'")
        self.n_sink = n_sink

    def priority(self, pos):
        sink = (pos >= 0) & (pos < self.n_sink)
        return pos.float() + sink.float() * 2.0 ** 40  # above any position a model can reach


class H2OLayerCache(SlotLayerCache):
    """Heavy-Hitter Oracle (Zhang et al., 2023): keep the tokens with the highest attention weight
    accumulated over every query so far, plus the ``recent`` most recent tokens (protected).

    ``scores`` from attention are (batch, groups, keys); a slot's score is their mean over groups.

    >>> import torch
    >>> layer = H2OLayerCache(batch=1, groups=1, head_size=2, capacity=3, recent=1)
    >>> kv = torch.zeros(1, 1, 4, 2)
    >>> _ = layer.extend(kv, kv, torch.arange(4)[None])
    >>> layer.settle(torch.tensor([[[0.5, 0.1, 0.3, 0.0]]]))  # slot 3 is recent, 0 and 2 are heavy
    >>> layer.pos.tolist()
    [[0, 2, 3]]
    """

    wants_scores = True

    def __init__(self, *args, recent: int | None = None, n_sink: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # at least the newest token: it has had no chance yet to collect attention
        self.recent = max(1, self.capacity // 2 if recent is None else recent)
        if self.capacity <= self.recent + n_sink:
            raise CacheError(f"cache_tokens={self.capacity} must exceed the protected recent window "
                             f"({self.recent}) plus sinks ({n_sink}) of policy 'h2o'")
        self.n_sink = n_sink
        self.score = torch.zeros(self.pos.shape[0], 0, device=self.pos.device)  # (batch, slots) float32
        self._all_score: torch.Tensor | None = None

    def observe(self, scores, n_new):
        new = torch.zeros(self.score.shape[0], n_new, device=self.score.device)
        total = torch.cat([self.score, new], dim=1)
        if scores is not None:  # NaN only from padding queries with nothing visible: worth nothing
            total = total + torch.nan_to_num(scores.float().mean(1), nan=0.0)
        self._all_score = total

    def priority(self, pos):
        protected = (pos >= 0) & (pos < self.n_sink)
        if self.recent:
            newest = pos.topk(min(self.recent, pos.shape[1]), dim=1).values[:, -1:]
            protected |= (pos >= newest) & (pos >= 0)
        return self._all_score.masked_fill(protected, torch.inf)

    def kept(self, keep):
        self.score = self._all_score if keep is None else self._all_score.gather(1, keep)
        self._all_score = None

    def buffers(self):
        return [*super().buffers(), self.score]


class DenseSlotLayerCache(SlotLayerCache):
    """Keeps every token (for quantised dense caches); asking for more than ``capacity`` fails."""

    def extend(self, k, v, pos):
        if self.pos.shape[1] + pos.shape[1] > self.capacity:
            raise CacheError(f"dense cache full: {self.pos.shape[1] + pos.shape[1]} tokens > "
                             f"cache_tokens={self.capacity}; use an evicting policy or a larger budget")
        return super().extend(k, v, pos)
