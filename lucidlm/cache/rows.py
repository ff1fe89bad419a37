"""Many sequences, each with its own cache, through one batched forward.

A server's decode batch changes at every step: sequences join after their prompt is prefilled and
leave at their stop. Each keeps its own one-row :class:`~lucidlm.cache.base.KVCache` (any policy:
an evicting one decides per sequence, exactly as when the sequence runs alone), and
:func:`stacked` binds the current rows into one cache for one forward. Its layers split the new
keys by row, hand each row to that row's own layer cache, and stack what comes back, padded to the
longest with position -1 (attention masks it); ``settle`` hands each row its own scores, trimmed
to its own keys.

>>> import torch
>>> from lucidlm import Config, GPT
>>> from lucidlm.cache import build_cache, prefill
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> short, long = (build_cache(model.config, 1, "window", cache_tokens=8) for _ in range(2))
>>> _ = prefill(model, torch.tensor([[1, 2, 3]]), short), prefill(model, torch.tensor([[4, 5, 6, 7, 8]]), long)
>>> logits = model(torch.tensor([[9], [9]]), positions=torch.tensor([[3], [5]]), cache=stacked([short, long]))
>>> logits.shape[0], short.layers[0].positions().tolist(), long.layers[0].positions()[0, -1].item()
(2, [[0, 1, 2, 3]], 5)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import KVCache, LayerCache


class RowsLayerCache(LayerCache):
    """One layer of a batch whose rows are one-row layer caches of the same policy."""

    def __init__(self, rows: Sequence[LayerCache]) -> None:
        self.rows = list(rows)
        first = self.rows[0]
        # one policy for every row: the first one speaks for all
        self.wants_scores, self.score_queries, self.capacity = first.wants_scores, first.score_queries, first.capacity
        self.wants_queries, self.groups = first.wants_queries, first.groups
        self._lengths: list[int] = []

    def extend(self, k, v, pos):
        outs = [row.extend(k[i:i + 1], v[i:i + 1], pos[i:i + 1]) for i, row in enumerate(self.rows)]
        self._lengths = [out[2].shape[-1] for out in outs]
        if len(outs) == 1:
            return outs[0]
        return _pad_stack([o[0] for o in outs]), _pad_stack([o[1] for o in outs]), _pad_positions([o[2] for o in outs])

    def see_queries(self, q, pos):
        for i, row in enumerate(self.rows):
            row.see_queries(q[i:i + 1], pos[i:i + 1])

    def settle(self, scores):
        for i, (row, n) in enumerate(zip(self.rows, self._lengths)):
            row.settle(None if scores is None else scores[i:i + 1, :, :n])

    def visibility(self, q_pos, k_pos):
        seen = [row.visibility(q_pos[i:i + 1], k_pos[i:i + 1, ..., :n])
                for i, (row, n) in enumerate(zip(self.rows, self._lengths))]
        if all(s is None for s in seen):
            return None
        heads = max(1 if s is None else s.shape[1] for s in seen)  # 1, groups or heads: the same for all rows
        visible = torch.zeros(len(seen), heads, q_pos.shape[1], k_pos.shape[-1], dtype=torch.bool,
                              device=q_pos.device)
        for i, (s, n) in enumerate(zip(seen, self._lengths)):
            visible[i, :, :, :n] = True if s is None else s[0]
        return visible

    def buffers(self):
        return [b for row in self.rows for b in row.buffers()]

    def positions(self):
        return _pad_positions([row.positions() for row in self.rows])


class DenseRowsLayerCache(LayerCache):
    """One layer of a batch of one-row dense caches, without a copy per step: the rows' buffers
    move (once, here) into one batch buffer and each row keeps a one-row view of it, so a row's
    own ``extend`` writes into the batch and the batch returns its buffers as they are (slots past
    a row's end keep position -1). The rows stay usable alone, and in a later batch."""

    def __init__(self, rows: Sequence[LayerCache]) -> None:
        self.rows = list(rows)
        first = self.rows[0]
        self.capacity, self.groups = max(row.capacity for row in self.rows), first.groups
        shape = (len(self.rows), first.k.shape[1], self.capacity)
        self.k = first.k.new_zeros(*shape, first.k.shape[3])
        self.v = first.v.new_zeros(*shape, first.v.shape[3])
        self.pos = torch.full(shape[::2], -1, dtype=torch.long, device=first.pos.device)
        for i, row in enumerate(self.rows):
            n = row.filled
            self.k[i, :, :n], self.v[i, :, :n], self.pos[i, :n] = row.k[0, :, :n], row.v[0, :, :n], row.pos[0, :n]
            row.k, row.v, row.pos = self.k[i:i + 1], self.v[i:i + 1], self.pos[i:i + 1]
        self._stepped = False

    def extend(self, k, v, pos):
        self._stepped = k.shape[2] == 1 and all(row.filled < row.capacity for row in self.rows)
        if self._stepped:  # a decode step: every row's token written at its own end, in one copy each
            slots = torch.tensor([row.filled for row in self.rows], device=self.k.device)
            rows = torch.arange(len(self.rows), device=self.k.device)
            self.k[rows, :, slots], self.v[rows, :, slots], self.pos[rows, slots] = k[:, :, 0], v[:, :, 0], pos[:, 0]
            for row in self.rows:
                row.filled, row._last = row.filled + 1, 1
        else:  # more tokens, or a full row (whose own extend raises its error)
            for i, row in enumerate(self.rows):
                row.extend(k[i:i + 1], v[i:i + 1], pos[i:i + 1])
        end = max(row.filled for row in self.rows)
        return self.k[:, :, :end], self.v[:, :, :end], self.pos[:, :end]

    def settle(self, scores):
        if not self._stepped:  # a decode step's token is never padding: nothing to zero
            for row in self.rows:
                row.settle(None)

    def buffers(self):
        return [self.k, self.v, self.pos]

    def positions(self):
        return self.pos[:, :max(row.filled for row in self.rows)]


def stacked(caches: Sequence[KVCache]) -> KVCache:
    """One cache over one-row ``caches`` (same model, same policy) for a forward whose batch row i
    is ``caches[i]``'s sequence. Pass the positions to the forward: each row has its own.

    Keep it for as long as the rows stay the same: for dense rows, building it moves their slots
    into one batch buffer (:class:`DenseRowsLayerCache`), after which a step copies nothing.
    """
    from .base import DenseLayerCache

    if not caches:
        raise ValueError("stacked: expected at least one cache")
    layers = list(zip(*(c.layers for c in caches)))
    dense = all(type(row) is DenseLayerCache and row.cursor is None for rows in layers for row in rows)
    return KVCache([(DenseRowsLayerCache if dense else RowsLayerCache)(rows) for rows in layers])


def _pad_stack(parts: list[torch.Tensor]) -> torch.Tensor:
    """(1, groups, n_i, size) parts -> (rows, groups, longest, size), zeros after each row's n_i."""
    longest = max(p.shape[2] for p in parts)
    out = parts[0].new_zeros(len(parts), parts[0].shape[1], longest, parts[0].shape[3])
    for i, p in enumerate(parts):
        out[i, :, :p.shape[2]] = p[0]
    return out


def _pad_positions(parts: list[torch.Tensor]) -> torch.Tensor:
    """(1, [groups,] n_i) positions -> (rows, [groups,] longest), -1 after each row's (and group's) n_i."""
    longest = max(p.shape[-1] for p in parts)
    out = torch.full((len(parts), *parts[0].shape[1:-1], longest), -1, dtype=torch.long, device=parts[0].device)
    for i, p in enumerate(parts):
        out[i, ..., :p.shape[-1]] = p[0]
    return out


def split_dense(batch: KVCache, lengths: Sequence[int], capacities: Sequence[int]) -> list[KVCache]:
    """The rows of a left-padded dense ``batch`` (as :func:`lucidlm.generate.prefill_packed` leaves
    it: row i's ``lengths[i]`` tokens end at the batch's last filled slot) as one-row dense caches of
    ``capacities[i]`` slots each, the tokens moved to the front.

    >>> from lucidlm import Config
    >>> from lucidlm.cache import dense_cache
    >>> config = Config.from_name("tiny-llama")
    >>> batch = dense_cache(config, 2, 8)
    >>> for layer in batch.layers:
    ...     layer.pos[0, 1:3] = torch.arange(2); layer.pos[1, :3] = torch.arange(3); layer.filled = 3
    >>> rows = split_dense(batch, [2, 3], [5, 6])
    >>> rows[0].layers[0].positions().tolist(), rows[1].layers[0].capacity, rows[0].next_position.tolist()
    ([[0, 1]], 6, [2])
    """
    from .base import DenseLayerCache

    rows = []
    for i, (n, capacity) in enumerate(zip(lengths, capacities)):
        layers = []
        for layer in batch.layers:
            end = layer.filled
            row = DenseLayerCache(1, layer.k.shape[1], layer.k.shape[3], capacity, layer.k.dtype, layer.k.device,
                                  layer.v.shape[3])
            row.k[0, :, :n] = layer.k[i, :, end - n:end]
            row.v[0, :, :n] = layer.v[i, :, end - n:end]
            row.pos[0, :n] = layer.pos[i, end - n:end]
            row.filled = row._last = n
            layers.append(row)
        cache = KVCache(layers)
        cache.next_position = torch.tensor([n], device=batch.layers[0].pos.device)
        rows.append(cache)
    return rows
