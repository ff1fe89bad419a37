"""Chunked prefill: stream a prompt through a cache a chunk at a time.

Each chunk's queries attend to the cache's slots plus the chunk itself, so the largest attention
tensor is (batch, heads, chunk, cache + chunk) whatever the prompt length, and a bounded cache evicts
between chunks: an 8k-token prompt goes through a 512-slot cache in 256-token chunks.

>>> import torch
>>> from lucidlm import Config, GPT
>>> from lucidlm.cache import build_cache, prefill
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> cache = build_cache(model.config, batch=1, policy="window", cache_tokens=16)
>>> prefill(model, torch.randint(0, 256, (1, 200)), cache, chunk_size=32).shape
torch.Size([1, 256])
>>> cache.layers[0].pos.shape
torch.Size([1, 16])
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import CacheError
from .base import KVCache


def check_context(config, positions: torch.Tensor) -> None:
    """Raise :class:`CacheError` when a position reaches past the model's context length.

    A cache bounds memory, not positions: RoPE (or learned position embeddings) were trained up to
    ``block_size``, and we never wrap positions silently.
    """
    last = int(positions.max()) if positions.numel() else -1
    if last >= config.block_size:
        raise CacheError(f"token position {last} is beyond the context length block_size={config.block_size} "
                         f"of {config.name}: shorten the text to at most {config.block_size} tokens in all "
                         "(prompt plus generated tokens); a KV-cache policy bounds memory, not positions")


def _model(model) -> torch.nn.Module:
    return getattr(model, "model", model)  # an LLM or the GPT itself


def stream(model, input_ids: torch.Tensor, cache: KVCache, chunk_size: int = 256,
           positions: torch.Tensor | None = None, last_only: bool = False,
           question: int | None = None) -> Iterator[torch.Tensor]:
    """Feed ``input_ids`` (batch, tokens) through ``cache`` chunk by chunk; yield each chunk's logits
    ((batch, chunk, vocab), or (batch, 1, vocab) with ``last_only``).

    A cache that holds its prompt (``cache.holds_prompt``: kvpress-style presses, which compress
    once after the context is read) keeps every token of a chunk and compresses at the chunk's end
    (:meth:`~lucidlm.cache.base.KVCache.end_prompt`, before the chunk's logits are yielded), so
    perplexity streamed in chunks compresses at each chunk end; :func:`prefill` hands such a cache
    the whole prompt as one chunk. ``question``: how many trailing tokens of ``input_ids`` are the
    question (told to the cache with the last chunk).
    """
    gpt = _model(model)
    if chunk_size < 1:
        raise CacheError(f"chunk_size={chunk_size} must be at least 1")
    if positions is None:
        positions = gpt.positions_for(input_ids, cache)
    elif positions.dim() == 1:
        positions = positions.expand(input_ids.shape[0], -1)
    check_context(gpt.config, positions)
    holds = cache.holds_prompt
    for start in range(0, input_ids.shape[1], chunk_size):
        end = start + chunk_size
        logits = gpt(input_ids[:, start:end], positions=positions[:, start:end], cache=cache, last_only=last_only)
        if holds:
            last = end >= input_ids.shape[1]
            cache.end_prompt(gpt, input_ids[:, start:end], positions[:, start:end], question if last else None)
        yield logits


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache: KVCache, chunk_size: int = 256,
            positions: torch.Tensor | None = None, question: int | None = None) -> torch.Tensor:
    """Run the prompt through ``cache`` in chunks; return the last token's logits (batch, vocab).

    ``positions`` (batch, tokens): true positions, -1 for left padding (default: consecutive,
    continuing after what the cache has seen). Raises :class:`CacheError` for positions beyond the
    model's context length. A cache that holds its prompt reads it in one chunk (attention
    bounds its memory per query chunk) and compresses at its end, ``question`` (the number of
    trailing question tokens, or None) telling it what the question is.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise CacheError(f"input_ids must have shape (batch, tokens) with tokens >= 1, got {tuple(input_ids.shape)}")
    if cache.holds_prompt:
        chunk_size = max(chunk_size, input_ids.shape[1])
    logits = None
    for logits in stream(model, input_ids, cache, chunk_size, positions, last_only=True, question=question):
        pass
    return logits[:, -1]
