"""The KV-cache contract between attention and cache policies, and the dense cache.

Attention talks to one :class:`LayerCache` per layer in two steps:

1. ``keys, values, key_pos = layer.extend(k, v, pos)`` hands over the new tokens' keys and values
   (batch, n_query_groups, tokens, head_size) — keys already rotated at their true positions, never
   re-rotated — and their positions (batch, tokens), and gets back everything the new queries may
   attend to: the slots kept so far followed by the new tokens, with the true position of each
   (-1 marks an empty slot or padding, which attention masks out).
2. ``layer.settle(scores)`` after attention. ``scores`` is ``None`` unless ``layer.wants_scores``;
   then it is the attention weight every returned key received, summed over the new queries and
   averaged over the query heads of its KV group: shape (batch, n_query_groups, len(key_pos)).
   The policy then evicts down to its budget.

What a slot holds is the attention's choice, sized by ``config.kv_slot_sizes()`` (groups, key size,
value size): keys and values per KV group for most models; multi-head latent attention
(:mod:`lucidlm.model.mla`) hands over its latent plus shared rotary key as the "keys" of one group and
zero-width values, so every policy keeps and evicts latent slots.

Because positions travel with the slots, a policy may keep any subset of tokens (gaps are fine).
``key_pos`` is (batch, keys) when every KV group holds the same tokens, or (batch, groups, keys)
when each group keeps its own (per-head eviction, :mod:`lucidlm.cache.slots`): slot j of group g
then holds the token at ``key_pos[b, g, j]``, and attention masks each group with its own positions.
Besides these two steps, attention reads four members, which every layer cache has (the base
class gives their defaults): ``wants_scores``, ``score_queries`` (which of a step's queries the
``scores`` sum over), ``visibility`` (a restriction of the causal mask) and ``wants_queries``
(then it hands the step's rotated queries to ``see_queries`` before ``settle``). ``capacity`` is the
most slots a layer keeps between steps (None: unbounded). Nothing else of a cache is read by the
model: a policy says what it needs through these members, never through members of its own.
:mod:`lucidlm.cache.policies` holds the evicting policies, :func:`lucidlm.cache.build_cache` builds
any of them by name.
"""

from __future__ import annotations

import dataclasses

import torch


class LayerCache:
    """One layer's slots. Subclasses implement a policy; this base is the contract."""

    #: whether ``settle`` wants the attention scores (attention then runs its explicit kernel)
    wants_scores: bool = False
    #: the scores sum over each sequence's last ``score_queries`` queries of a step (SnapKV's
    #: observation window); None: over all of them
    score_queries: int | None = None
    #: the most slots kept between steps; None: unbounded
    capacity: int | None = None
    #: keeps every token while a prompt streams through and evicts once, at :meth:`end_prompt`
    #: (kvpress's "compress after prefill"); the prompt then goes through in one chunk
    holds_prompt: bool = False
    #: whether attention hands the step's queries to :meth:`see_queries` (after ``extend``)
    wants_queries: bool = False
    #: KV groups of the slots (None: not said)
    groups: int | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        raise NotImplementedError

    def see_queries(self, q: torch.Tensor, pos: torch.Tensor) -> None:
        """The step's queries (batch, heads, tokens, head_size), rotated at their positions ``pos``
        (batch, tokens); called between ``extend`` and ``settle`` when ``wants_queries``."""

    def settle(self, scores: torch.Tensor | None) -> None:
        """Called once after every ``extend``; evicting policies drop slots here."""

    def see_queries(self, q: torch.Tensor, pos: torch.Tensor) -> None:
        """The step's rotated queries (batch, heads, tokens, head_size) at ``pos`` (batch, tokens),
        after ``extend`` and before ``settle`` (only when ``wants_queries``)."""

    def end_prompt(self, end: PromptEnd) -> None:
        """The prompt has been read (only when ``holds_prompt``): evict down to ``capacity``."""

    def visibility(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        """Which of the keys ``extend`` returned each query may see, beyond the causal mask:
        (batch, 1 | groups | heads, queries, keys) bool (attention repeats a per-group one for the
        group's query heads), or None (all of them: every policy that evicts does so by dropping
        slots). A replay of a policy's history (``explain.cached``) restricts it."""
        return None

    def memory_bytes(self) -> int:
        """Bytes held by this layer's buffers (keys, values, positions, scales)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def buffers(self) -> list[torch.Tensor]:
        return []

    def positions(self) -> torch.Tensor:
        """(batch, slots) true positions of the kept tokens (-1: empty or padding); (batch, groups,
        slots) for a cache whose KV groups keep their own slots."""
        return self.pos


@dataclasses.dataclass(frozen=True)
class PromptEnd:
    """What a layer learns when a prompt ends (:meth:`KVCache.end_prompt`): the model, the prompt
    chunk just read (``input_ids``, ``positions`` (batch, tokens), -1 on left padding), how many of
    its trailing tokens are the question (None: not marked) and the layer's index."""

    model: torch.nn.Module
    input_ids: torch.Tensor
    positions: torch.Tensor
    question: int | None
    layer: int

    @property
    def attention(self) -> torch.nn.Module:
        """This layer's attention module (its scale, RoPE)."""
        return self.model.layers[self.layer].attn


class VisibleKeys(LayerCache):
    """One layer for a forward over a whole sequence in which query i may see key j only where
    ``visible[i, j]`` (tokens, tokens) is true, on top of the causal mask; per KV group where
    ``visible[g, i, j]`` (groups, tokens, tokens) is (a per-head policy's replay). Stores nothing between
    forwards; keeps the keys and values of the last one (``k``, ``v``). Replays a policy's history
    (:mod:`lucidlm.explain.cached`) and prefills prompts packed into one sequence
    (:func:`lucidlm.generate.prefill_packed`)."""

    def __init__(self, visible: torch.Tensor) -> None:
        self.visible = visible
        self.k = self.v = None

    def extend(self, k, v, pos):
        self.k, self.v = k, v
        return k, v, pos

    def visibility(self, q_pos, k_pos):
        visible = self.visible.to(q_pos.device)
        return visible[None] if visible.dim() == 3 else visible[None, None]


class KVCache:
    """A model's cache: one :class:`LayerCache` per layer, plus bookkeeping shared by all layers."""

    def __init__(self, layers: list[LayerCache]) -> None:
        self.layers = layers
        self.next_position: torch.Tensor | None = None  # (batch,) position of the next token

    # ---- positions: the cache alone keeps track of where each sequence has got to -----------
    def positions_for(self, batch: int, tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(batch, tokens) positions of new tokens: right after what this cache has seen (from 0
        when it has seen nothing)."""
        steps = torch.arange(tokens, device=device)
        if self.next_position is None:
            return steps.expand(batch, tokens)
        return self.next_position[:, None] + steps

    def advance(self, positions: torch.Tensor) -> None:
        """Record that tokens at ``positions`` (batch, tokens) were appended (padding is -1)."""
        self.next_position = positions.max(dim=1).values + 1

    @property
    def holds_prompt(self) -> bool:
        """Whether a prompt must be read whole and then :meth:`end_prompt` called (kvpress presses)."""
        return any(layer.holds_prompt for layer in self.layers)

    def end_prompt(self, model, input_ids: torch.Tensor, positions: torch.Tensor, question: int | None = None) -> None:
        """Tell every layer that the prompt ``input_ids`` at ``positions`` (batch, tokens) has been
        read, its last ``question`` tokens the question (None: no question marked): a holding
        policy scores its slots now, after any pass over the model it needs (kvzip's reconstruction,
        run here once for all layers), and evicts down to its budget."""
        model = getattr(model, "model", model)  # an LLM or the GPT itself
        passes = {layer.prompt_pass for layer in self.layers if getattr(layer, "prompt_pass", None)}
        for run in passes:
            run(self, model, input_ids, positions, question)
        for i, layer in enumerate(self.layers):
            layer.end_prompt(PromptEnd(model, input_ids, positions, question, i))

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def memory_bytes(self) -> int:
        return sum(layer.memory_bytes() for layer in self.layers)

    def kept_positions(self, sequence: int = 0) -> list[set[int]]:
        """Per layer, the positions of ``sequence`` still in the cache (what the model still sees).

        Window and sink keep the same tokens in every layer; H2O decides per layer, so a token can be
        gone from some layers only. A per-head layer (``heads="each"``/``"adaptive"``) reports the
        positions any of its heads still holds (:meth:`kept_by_head`: each head's). An explanation
        shows tokens in no layer's set as evicted.
        """
        return [set().union(*heads) for heads in self.kept_by_head(sequence)]

    def kept_by_head(self, sequence: int = 0) -> list[list[set[int]]]:
        """Per layer, per KV group, the positions of ``sequence`` that group still holds; a layer
        whose groups share their slots gives the one set for each of its groups (one set when the
        layer does not say how many groups it has)."""
        return [_kept_by_group(layer, sequence) for layer in self.layers]

    @property
    def capacity(self) -> int | None:
        """Most tokens a layer keeps between steps (None: unbounded)."""
        return self.layers[0].capacity


def _kept_by_group(layer: LayerCache, sequence: int) -> list[set[int]]:
    pos = layer.positions()[sequence]
    if pos.dim() == 2:  # per head: (groups, slots)
        return [{p for p in row if p >= 0} for row in pos.tolist()]
    kept = {p for p in pos.tolist() if p >= 0}
    return [set(kept) for _ in range(layer.groups or 1)]


class DenseLayerCache(LayerCache):
    """Keeps every token, in buffers preallocated for ``capacity`` tokens (no copies per step)."""

    def __init__(self, batch: int, groups: int, head_size: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", value_size: int | None = None) -> None:
        self.k = torch.zeros(batch, groups, capacity, head_size, dtype=dtype, device=device)
        value_size = head_size if value_size is None else value_size  # 0: a layer that caches keys only
        self.v = torch.zeros(batch, groups, capacity, value_size, dtype=dtype, device=device)
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.capacity, self.filled, self._last, self.groups = capacity, 0, 0, groups
        self.cursor: torch.Tensor | None = None  # set by make_static

    def make_static(self) -> None:
        """Fixed shapes from now on, for a compiled decode step (:mod:`lucidlm.compiled`): ``extend``
        writes at a tensor ``cursor`` and returns all ``capacity`` slots (the empty ones have position
        -1, which attention masks out), so no shape and no Python number changes between steps. The
        caller keeps the count within ``capacity`` (an index past it is not checked on the device)."""
        self.cursor = torch.tensor(self.filled, device=self.k.device)

    def extend(self, k, v, pos):
        if self.cursor is not None:
            return self._extend_static(k, v, pos)
        end = self.filled + k.shape[2]
        if end > self.capacity:
            from ..errors import CacheError

            raise CacheError(f"dense cache full: {end} tokens > capacity {self.capacity}; use an evicting "
                             "policy (window, sink, h2o) or a larger cache_tokens")
        self.k[:, :, self.filled:end] = k
        self.v[:, :, self.filled:end] = v
        self.pos[:, self.filled:end] = pos
        self.filled, self._last = end, k.shape[2]
        return self.k[:, :, :end], self.v[:, :, :end], self.pos[:, :end]

    def _extend_static(self, k, v, pos):
        slots = self.cursor + torch.arange(k.shape[2], device=k.device)
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        self.pos.index_copy_(1, slots, pos)
        self.cursor.add_(k.shape[2])
        return self.k, self.v, self.pos

    def settle(self, scores):
        if self.cursor is not None:  # static: decode steps only, never padding
            return
        # padding tokens whose queries saw no key (a chunk of pure left padding) hold NaN: zero
        # them once attention is done, so later queries multiply a masked slot by 0, not by NaN.
        # Always (no host sync to ask whether there is padding): a decode step zeroes nothing.
        start = self.filled - self._last
        pad = (self.pos[:, start:self.filled] < 0)[:, None, :, None]
        self.k[:, :, start:self.filled].masked_fill_(pad, 0)
        self.v[:, :, start:self.filled].masked_fill_(pad, 0)

    def buffers(self):
        return [self.k, self.v, self.pos]

    def positions(self):
        return self.pos[:, :self.filled if self.cursor is None else int(self.cursor)]


def dense_cache(config, batch: int, capacity: int | None = None, dtype: torch.dtype = torch.float32,
                device: torch.device | str | list = "cpu") -> KVCache:
    """A dense cache for ``capacity`` tokens (default: the model's context length), with the slot
    sizes of ``config.kv_slot_sizes()``; ``device``: one, or one per layer (see :func:`layer_devices`)."""
    capacity = capacity or config.block_size
    groups, key_size, value_size = config.kv_slot_sizes()
    return KVCache([DenseLayerCache(batch, groups, key_size, capacity, dtype, d, value_size)
                    for d in layer_devices(device, config.n_layer)])


def layer_devices(device: torch.device | str | list, n_layer: int) -> list:
    """Where each layer's cache lives: ``device`` for all, or a list of one device per layer as it
    is (a model split across devices by ``device_map`` keeps each layer's cache with its block).

    >>> layer_devices("cpu", 2), layer_devices(["cpu", "meta"], 2)
    (['cpu', 'cpu'], ['cpu', 'meta'])
    """
    if not isinstance(device, (list, tuple)):
        return [device] * n_layer
    if len(device) != n_layer:
        from ..errors import CacheError

        raise CacheError(f"device: {len(device)} devices for a cache of {n_layer} layers; expected one device "
                         "or one per layer")
    return list(device)
