"""Training through a bounded KV cache: each sequence runs in chunks through a fresh cache of a
policy, the policy evicting between chunks, and one backward runs through the whole chunked graph
(keys_values' "KV cache that survives training").

How it works
------------
A micro-batch of ``T`` tokens is cut into chunks of ``chunk_size`` tokens. Chunk ``c`` runs the
model over its own tokens with the cache: its queries see the slots the policy kept after chunk
``c-1`` plus the chunk itself (causally), exactly as chunked prefill does at inference
(:func:`lucidlm.cache.prefill`), but with autograd on. The loss is the same summed cross-entropy
over answer tokens as the ordinary forward; the loop normalises it the same way.

Gradients
---------
The slot caches (:class:`~lucidlm.cache.SlotLayerCache` and its policies) never write into a
buffer in place: ``extend`` returns ``torch.cat`` of the kept keys/values and the new ones, and
``settle`` keeps the survivors by ``torch.cat`` + ``gather``. So the keys and values a chunk
attends to are ordinary autograd tensors, and the gradient of a later chunk's loss flows back
through the kept keys/values into the chunks that produced them. A token the policy evicted stays
in the graph through every chunk that saw it before it went: its contribution to those chunks'
hidden states is differentiated like any other. With a budget that evicts nothing, the loss and
the gradients are those of the ordinary full-sequence forward (tested to float32 rounding).

* ``dense`` is served by :class:`~lucidlm.cache.DenseSlotLayerCache` (concatenating slots, fails
  when full), not by the dense inference cache: :class:`~lucidlm.cache.DenseLayerCache` writes
  each chunk into preallocated buffers in place, which overwrites tensors an earlier chunk saved
  for backward (autograd refuses to differentiate it).
* Quantised buffers (``+int8`` / ``+int4``) are refused: integer codes carry no gradient, so the
  gradient into earlier chunks would be silently cut at every kept slot.
* Scoring policies (``h2o``, ``snapkv``, ...) rank slots with the attention weights, so their
  attention runs the explicit kernel; the ranking itself (``topk`` indices) carries no gradient.

Memory
------
What the cache bounds is the attention: a chunk's queries meet at most ``cache_tokens + chunk_size``
keys, so an attention matrix is (batch, heads, chunk_size, cache_tokens + chunk_size) rather than
(batch, heads, T, T). Since one backward runs through all chunks, every chunk's activations stay
alive until it: per layer, the usual O(batch · T · n_embd) of the linear layers and norms (as
without a cache), plus, per chunk, the concatenated keys and values it attended to,
2 · batch · n_query_groups · (cache_tokens + chunk_size) · head_size, i.e.
O(T / chunk_size · (cache_tokens + chunk_size)) slots over the sequence, and, for the scoring
policies, the attention weights, O(batch · heads · T · (cache_tokens + chunk_size)). So activation
memory still grows linearly with ``T`` (no checkpointing), but never quadratically.

>>> import torch
>>> from lucidlm import Config, GPT
>>> model = GPT(Config.from_name("tiny-llama"))
>>> ids = torch.randint(0, 256, (1, 40)); labels = ids.roll(-1, 1); labels[:, -1] = -100
>>> plan = ChunkedCache("window", cache_tokens=64, chunk_size=16)   # 64 >= 40: nothing evicted
>>> loss = plan.loss(model, ids, labels)
>>> full = torch.nn.functional.cross_entropy(model(ids)[0], labels[0], reduction="sum")
>>> bool(torch.allclose(loss, full, rtol=1e-5))
True
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from ..cache import KVCache, PolicySpec, parse_policy
from ..cache.spec import PRESSES
from ..errors import TrainError
from .data import IGNORE

#: tokens per chunk when ``chunk_size`` is not given (the chunked prefill's default)
DEFAULT_CHUNK_SIZE = 256


@dataclasses.dataclass(frozen=True)
class ChunkedCache:
    """A training forward in chunks of ``chunk_size`` tokens through a fresh cache of ``policy``
    with ``cache_tokens`` slots per layer (None: the micro-batch's length for ``dense``,
    :data:`~lucidlm.cache.DEFAULT_CACHE_TOKENS` for an evicting policy).

    ``policy`` is parsed once, here, into :attr:`spec`, which the cache is built from.

    >>> ChunkedCache("h2o(recent=8)", 32, 16).policy
    'h2o(recent=8)'
    >>> ChunkedCache(" dense() ").spec.is_plain_dense
    True
    >>> ChunkedCache("window+int8", 32)
    Traceback (most recent call last):
    ...
    lucidlm.errors.TrainError: kv_cache='window+int8': quantised buffers hold integer codes, which carry no gradient; train with the unquantised policy 'window'
    """

    policy: str | PolicySpec
    cache_tokens: int | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    spec: PolicySpec = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        spec = parse_policy(self.policy)  # CacheError listing the valid policies
        object.__setattr__(self, "spec", spec)  # frozen: set once, here
        if spec.quant is not None:
            plain = dataclasses.replace(spec, quant=None)
            raise TrainError(f"kv_cache={self.policy!r}: quantised buffers hold integer codes, which carry no "
                             f"gradient; train with the unquantised policy {str(plain)!r}")
        if spec.eviction in {press.name for press in PRESSES}:
            raise TrainError(f"kv_cache={self.policy!r}: {spec.eviction} compresses a prompt once it has been read "
                             "whole (a kvpress press), not a stream of training chunks; train with snapkv, h2o or window")
        if not _positive_int(self.chunk_size):
            raise TrainError(f"chunk_size={self.chunk_size!r}: expected a positive integer (tokens per chunk)")
        if self.cache_tokens is not None and not _positive_int(self.cache_tokens):
            from ..cache.spec import parse_share
            from ..errors import CacheError

            try:
                share = parse_share(self.cache_tokens) if isinstance(self.cache_tokens, str) else None
            except CacheError as exc:
                raise TrainError(str(exc)) from None
            if share is None:
                raise TrainError(f"cache_tokens={self.cache_tokens!r}: expected a positive integer (slots per "
                                 "layer) or a share of each micro-batch such as '25%'")

    def budget(self, tokens: int) -> int:
        """Slots per layer for a micro-batch of ``tokens`` tokens."""
        return self.spec.budget(self.cache_tokens, tokens)

    def build(self, config, batch: int, tokens: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> KVCache:
        """A fresh cache for ``batch`` sequences of ``tokens`` tokens (dense: concatenating slots)."""
        from ..cache import DenseSlotLayerCache, build_cache

        budget = self.budget(tokens)
        if not self.spec.is_dense:
            return build_cache(config, batch, self.spec, budget, dtype=dtype, device=device)
        # the inference dense cache writes in place into preallocated buffers: autograd cannot
        # differentiate through it, so dense training concatenates as the evicting policies do
        groups, key_size, value_size = config.kv_slot_sizes()
        return KVCache([DenseSlotLayerCache(batch, groups, key_size, budget, dtype, device, value_size=value_size)
                        for _ in range(config.n_layer)])

    def check(self, config, longest: int) -> None:
        """Raise before training when the policy cannot hold the data: a ``dense`` budget below the
        longest example, or a budget too small for the policy's protected slots (CacheError)."""
        if self.spec.is_dense and self.budget(longest) < longest:
            raise TrainError(f"kv_cache='dense' with cache_tokens={self.cache_tokens}: the longest example has "
                             f"{longest} tokens; use an evicting policy (window, sink, h2o) or a larger budget")
        self.build(config, 1, longest)  # the policies' own budget checks

    def loss(self, model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """Summed cross-entropy (float32) of ``labels`` (IGNORE: not counted) predicted from ``ids``
        (batch, tokens), run chunk by chunk through a fresh cache; differentiable end to end.
        ``model``: the GPT, or a DDP wrapper around it."""
        select = labels != IGNORE
        # chunks after the last target only feed later tokens: nothing they do reaches the loss
        targets = select.any(0).nonzero()
        end = int(targets.max()) + 1 if targets.numel() else 1
        config = getattr(model, "module", model).config
        param = next(model.parameters())
        dtype = torch.bfloat16 if bf16 else param.dtype
        cache = self.build(config, ids.shape[0], end, dtype, param.device)
        positions = torch.arange(end, device=ids.device).expand(ids.shape[0], end)
        total = None
        for start in range(0, end, self.chunk_size):
            stop = min(start + self.chunk_size, end)
            chosen = select[:, start:stop]
            with torch.autocast(param.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(ids[:, start:stop], positions=positions[:, start:stop], cache=cache, select=chosen)
            chunk = F.cross_entropy(logits.float(), labels[:, start:stop][chosen], reduction="sum")
            total = chunk if total is None else total + chunk
        return total


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


__all__ = ["ChunkedCache", "DEFAULT_CHUNK_SIZE"]
