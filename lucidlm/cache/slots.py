"""The slot machinery every bounded policy shares: :class:`SlotLayerCache`, shared or per-head slots.

A policy only ranks slots (:meth:`SlotLayerCache.priority`); this module keeps the ``capacity``
best, with their keys, values (quantised or not) and per-slot state, per sequence of the batch.
Where the decision is made is the layer's ``heads``:

* ``"shared"`` — one decision per layer: positions are (batch, slots) and every KV group holds the
  same tokens; a per-group score is averaged over the groups (:meth:`SlotLayerCache.per_group`).
* ``"each"`` — every KV group (head) keeps its own ``capacity`` best slots: positions are
  (batch, groups, slots), slot j of group g holds the token at ``pos[b, g, j]``. Attention masks
  each group with its own positions (:mod:`lucidlm.model.attention`).
* ``"adaptive"`` — AdaKV (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
  Allocation for Efficient LLM Inference", 2024): the layer's ``groups * capacity`` slots go to the
  best scores of all groups together, so a head whose attention is flat (scores spread evenly,
  none high) gives slots to a peaked one; each group keeps at least its ``floor(alpha * capacity)``
  best (AdaKV's safeguard, ``alpha`` = 0.2). Groups then hold different numbers of tokens: the
  buffers are as wide as the largest group, the rest padded with position -1 (zero keys and values).

A left-padded sequence decides exactly as it would alone: padding has position -1 and ranks below
every token, and every decision (top-k per group, AdaKV's top-k over the groups) is per row.
Under tensor parallelism (:mod:`lucidlm.model.parallel`) a shared layer decides on the mean of every
process's groups (``gather_groups``); a per-head layer needs no gather: each process decides for its
own groups, and ``adaptive`` shares the budget among the groups of its own process (so the
allocation can differ from one process's: the floor and total per process are the same).

>>> import torch
>>> layer = SlotLayerCache(batch=1, groups=2, head_size=2, capacity=2, heads="each")
>>> _ = layer.extend(torch.zeros(1, 2, 3, 2), torch.zeros(1, 2, 3, 2), torch.arange(3)[None])
>>> layer.settle(None); layer.pos.tolist()  # the default priority is recency, the same in both groups
[[[1, 2], [1, 2]]]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import CacheError
from .base import LayerCache
from .quant import FloatStore
from .spec import HEADS


def _take(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``t`` (batch, ..., slots) at the slots ``keep``: (batch, kept) for every group alike, or
    (batch, groups, kept) per group (then ``t`` is (batch, groups, slots))."""
    if keep.dim() == 3:
        return t.gather(-1, keep)
    index = keep.view(keep.shape[0], *[1] * (t.dim() - 2), keep.shape[1])
    return t.gather(-1, index.expand(*t.shape[:-1], keep.shape[1]))


def _protected(pos: torch.Tensor, recent: int, n_sink: int = 0) -> torch.Tensor:
    """(batch, [groups,] slots) bool: the ``recent`` newest positions of each row (and group) and
    positions below ``n_sink``."""
    protected = (pos >= 0) & (pos < n_sink)
    if recent:
        newest = pos.topk(min(recent, pos.shape[-1]), dim=-1).values[..., -1:]
        protected |= (pos >= newest) & (pos >= 0)
    return protected


def _minmax(x: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """``x`` (batch, [groups,] slots) scaled to [0, 1] by the min and max over the slots ``among``
    of each row (0 where the row's range is empty or zero)."""
    low = x.masked_fill(~among, torch.inf).amin(-1, keepdim=True)
    span = x.masked_fill(~among, -torch.inf).amax(-1, keepdim=True) - low
    return torch.where(span > 0, (x - low) / span, torch.zeros_like(x))


def adaptive_keep(rank: torch.Tensor, capacity: int, floor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaKV's allocation: ``rank`` (batch, groups, slots) (-inf: empty) -> the kept slots of each
    group in their old order (batch, groups, width) and which of them are padding (bool, same
    shape). Per row, the ``groups * capacity`` best slots of all groups together stay, each group's
    ``floor`` best among them; ``width`` is the most any group keeps.

    >>> rank = torch.tensor([[[9., 8, 7, 6], [2, 1, 1, 1]]])  # a peaked group and a flat one
    >>> keep, pad = adaptive_keep(rank, capacity=2, floor=1)
    >>> keep.masked_fill(pad, -1).tolist()
    [[[0, 1, 2], [0, -1, -1]]]
    """
    batch, groups, slots = rank.shape
    real = rank > -torch.inf
    guaranteed = torch.zeros_like(real)
    if floor:
        guaranteed.scatter_(-1, rank.topk(min(floor, slots), dim=-1).indices, True)
    boosted = rank.masked_fill(guaranteed & real, torch.inf)
    top = boosted.flatten(1).topk(min(groups * capacity, groups * slots), dim=1).indices
    chosen = torch.zeros(batch, groups * slots, dtype=torch.bool, device=rank.device).scatter_(1, top, True)
    chosen = chosen.view(batch, groups, slots) & real
    width = int(chosen.sum(-1).max())
    index = torch.arange(slots, device=rank.device).expand(batch, groups, slots)
    order = torch.where(chosen, index, index + slots).sort(dim=-1).values[..., :width]  # kept first, in order
    pad = order >= slots
    return order.masked_fill(pad, 0), pad


class SlotLayerCache(LayerCache):
    """Keeps at most ``capacity`` slots between steps (per group with ``heads="each"``, on average
    per group with ``"adaptive"``); subclasses rank the slots.

    ``slot_state`` names per-slot tensors (batch, [groups,] slots) that follow the slots through
    eviction: :meth:`observe` extends them to every slot of the step, ``settle`` keeps the
    survivors (per group, for a per-head layer, whose states all have the groups axis).
    """

    policy = "window"  # the name error messages give
    slot_state: tuple[str, ...] = ()
    #: under tensor parallelism (:mod:`lucidlm.model.parallel`) each process holds some of the KV
    #: groups: this joins every process's groups (batch, groups, ...) so that the layer's one
    #: decision, made on their mean, is the same on every process; None: all groups are here.
    #: Per-head layers never use it (each process decides for its own groups).
    gather_groups: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self, batch: int, groups: int, head_size: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 store: type[FloatStore] = FloatStore, value_size: int | None = None,
                 heads: str = "shared", alpha: float = 0.2) -> None:
        if heads not in HEADS:
            raise CacheError(f"policy {self.policy!r}: heads={heads!r} is not one of: {', '.join(HEADS)}")
        if not 0 <= alpha <= 1:
            raise CacheError(f"policy {self.policy!r}: alpha={alpha} (AdaKV's floor) must be in [0, 1]")
        self.capacity, self.heads, self.alpha, self.groups = capacity, heads, alpha, groups
        value_size = head_size if value_size is None else value_size
        self.store = store(head_size, dtype)
        # no values (0: a layer that caches keys only, MLA's latent) are nothing to quantise
        self.value_store = store(value_size, dtype) if value_size else FloatStore(0, dtype)
        self.k = self.store.encode(torch.zeros(batch, groups, 0, head_size, dtype=dtype, device=device))
        self.v = self.value_store.encode(torch.zeros(batch, groups, 0, value_size, dtype=dtype, device=device))
        self.pos = torch.full((batch, *self._group_axis(), 0), -1, dtype=torch.long, device=device)
        self._new: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def per_head(self) -> bool:
        """Whether each KV group keeps its own slots (positions (batch, groups, slots))."""
        return self.heads != "shared"

    # ---- the contract ------------------------------------------------------------------------
    def extend(self, k, v, pos):
        self._new = (k, v, pos)
        keys = torch.cat([self.store.decode(self.k), k.to(self.store.dtype)], dim=2)
        values = torch.cat([self.value_store.decode(self.v), v.to(self.value_store.dtype)], dim=2)
        return keys, values, torch.cat([self.pos, self._step_positions(pos, k.shape[1])], dim=-1)

    def settle(self, scores):
        if self._new is None:
            raise CacheError("settle() called without a preceding extend()")
        k, v, pos = self._new
        self._new = None
        if bool((pos < 0).any()):  # padding may hold NaN (a query with no visible key): store zeros
            pad = (pos < 0)[:, None, :, None]
            k, v = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
        all_pos = torch.cat([self.pos, self._step_positions(pos, k.shape[1])], dim=-1)
        self.observe(scores, k, v, pos)
        keep, empty = self.select(all_pos) if all_pos.shape[-1] > self.capacity else (None, None)
        self.k = self._merge(self.k, self.store.encode(k), keep, empty)
        self.v = self._merge(self.v, self.value_store.encode(v), keep, empty)
        self.pos = all_pos if keep is None else _emptied(_take(all_pos, keep), empty, -1)
        if keep is not None:
            for name in self.slot_state:
                setattr(self, name, _emptied(_take(getattr(self, name), keep), empty, 0))

    def buffers(self):
        return [*self.k, *self.v, self.pos, *(getattr(self, name) for name in self.slot_state)]

    # ---- policy hooks ------------------------------------------------------------------------
    def priority(self, pos: torch.Tensor) -> torch.Tensor:
        """The ``capacity`` highest survive: (batch, slots) float for positions ``pos`` (batch, slots),
        (batch, groups, slots) for a per-head layer's (batch, groups, slots). Default: the most recent."""
        return pos.float()

    def observe(self, scores: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """See this step: attention ``scores`` (policies with ``wants_scores`` only; else None) and
        the new tokens' keys, values (padding zeroed) and positions (batch, tokens). Extends ``slot_state``."""

    # ---- helpers -----------------------------------------------------------------------------
    def group_mean(self, x: torch.Tensor) -> torch.Tensor:
        """A per-group score (batch, groups, slots) averaged over every KV group of the layer."""
        return (x if self.gather_groups is None else self.gather_groups(x)).mean(1)

    def per_group(self, x: torch.Tensor) -> torch.Tensor:
        """A per-group score (batch, groups, slots) as the layer decides on it: as it is for a
        per-head layer, averaged over the groups (:meth:`group_mean`) for a shared one."""
        return x if self.per_head else self.group_mean(x)

    def select(self, all_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Indices of the slots to keep, in their old order — (batch, capacity), or per group
        (batch, groups, width) — and which of them are padding (``adaptive`` only; else None)."""
        rank = self.priority(all_pos).masked_fill(all_pos < 0, -torch.inf)  # empty slots go first
        if self.heads == "adaptive":
            return adaptive_keep(rank, self.capacity, int(self.alpha * self.capacity))
        return rank.topk(self.capacity, dim=-1).indices.sort(dim=-1).values, None

    def _group_axis(self) -> tuple[int, ...]:
        return (self.groups,) if self.per_head else ()

    def _step_positions(self, pos: torch.Tensor, groups: int) -> torch.Tensor:
        """The step's positions (batch, tokens) as this layer's slots hold them."""
        return pos[:, None, :].expand(-1, groups, -1) if self.per_head else pos

    @staticmethod
    def _merge(old: list[torch.Tensor], new: list[torch.Tensor], keep: torch.Tensor | None,
               empty: torch.Tensor | None = None) -> list[torch.Tensor]:
        parts = [torch.cat([o, n], dim=2) for o, n in zip(old, new)]
        if keep is None:
            return parts
        index = keep[..., None] if keep.dim() == 3 else keep[:, None, :, None]
        return [_emptied(p.gather(2, index.expand(p.shape[0], p.shape[1], -1, p.shape[3])),
                         None if empty is None else empty[..., None], 0) for p in parts]

    def _empty_state(self, *shape: int) -> torch.Tensor:
        """A float32 per-slot state with no slots yet: (batch, *shape, 0)."""
        return torch.zeros(self.pos.shape[0], *shape, 0, device=self.pos.device)

    def _empty_score(self) -> torch.Tensor:
        """A per-slot score with no slots yet, as :meth:`per_group` gives it: (batch, [groups,] 0)."""
        return self._empty_state(*self._group_axis())


def _emptied(t: torch.Tensor, empty: torch.Tensor | None, fill: float) -> torch.Tensor:
    """``t`` with ``fill`` where ``empty`` (an AdaKV padding slot); as it is when ``empty`` is None."""
    return t if empty is None else t.masked_fill(empty, fill)


def grown(state: torch.Tensor, tokens: int) -> torch.Tensor:
    """A per-slot state (batch, [groups,] slots) with ``tokens`` zero slots appended."""
    return torch.cat([state, state.new_zeros(*state.shape[:-1], tokens)], dim=-1)
