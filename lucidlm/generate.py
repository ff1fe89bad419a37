"""Token generation: sampling, batched prompts (left padding with explicit positions), any KV-cache
policy, stop tokens. Text-level concerns (chat templates, stop strings, streaming text) live in
``api.py``; this module works on token ids.

>>> import torch
>>> from lucidlm import Config, GPT
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> steps = list(generate_ids(model, [[1, 2, 3]], max_new_tokens=4))
>>> len(steps), len(steps[0])
(4, 1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch

from .cache.base import KVCache, VisibleKeys
from .cache.spec import PolicySpec, parse_policy
from .errors import CacheError, GenerationError
from .model.pipeline import cache_devices
from .model.rope import length_dependent, recompute_position


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when ``temperature == 0``."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise GenerationError(f"temperature={self.temperature}: expected a value >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k={self.top_k}: expected an integer >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p={self.top_p}: expected a value in (0, 1]")


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (batch,) from last-position logits (batch, vocab)."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        logits = _nucleus(logits, sampling.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (always the top one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already enough
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch prompts of different lengths: ids (B, T) and positions (B, T), -1 on the padding."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    pos = torch.full((len(prompts), longest), -1, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(list(p), dtype=torch.long)
        pos[row, longest - len(p):] = torch.arange(len(p))
    return ids, pos


@torch.inference_mode()
def generate_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                 sampling: Sampling = Sampling(), stop_ids: Sequence[int] = (),
                 kv_cache: str | PolicySpec = "dense", cache_tokens: int | str | None = None,
                 chunk_size: int = 256, decoder=None,
                 question_tokens: int | Sequence[int] | None = None) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of each prompt (``None`` once that sequence has stopped).

    A sequence stops at a token in ``stop_ids`` (which is yielded), after ``max_new_tokens``, or at
    the model's context length. ``kv_cache``: a policy spec, text or a parsed
    :class:`~lucidlm.cache.spec.PolicySpec`. ``decoder``: a :class:`~lucidlm.compiled.CompiledDecoder`
    for the decode steps (plain dense cache only; other policies decode eagerly).
    ``question_tokens``: how many trailing tokens of each prompt are the question (one number, or
    one per prompt), for the policies that compress the prompt knowing its question (``snapkv-q``;
    kvpress's query-aware setting); None: not marked.
    """
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens={max_new_tokens}: expected >= 0")
    spec = parse_policy(kv_cache)
    config = model.config
    ids, pos = left_pad(prompts)
    longest = max(len(p) for p in prompts)
    if longest >= config.block_size:
        raise CacheError(f"prompt of {longest} tokens does not fit the model's context length "
                         f"({config.block_size} tokens)")
    max_new_tokens = min(max_new_tokens, config.block_size - longest)
    needed = ids.shape[1] + max_new_tokens  # a dense cache's room for exactly this generation
    compiled = decoder is not None and spec.is_plain_dense and cache_tokens is None
    if compiled:  # static shapes: capacities rounded up, so that prompts share compiled graphs
        cache_tokens = decoder.capacity(needed, config.block_size)
    cache_tokens = spec.budget(cache_tokens, needed, prompt=longest)  # a share: of the longest prompt
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    if length_dependent(config.rope_scaling) and spec.is_dense:
        # one forward, as transformers: its length picks the frequencies (a bounded policy keeps its
        # chunks, and so its memory bound: each chunk then rotates by its own length)
        chunk_size = max(chunk_size, needed)
    cache, logits = _prefill(model, prompts, ids, pos, spec, cache_tokens, chunk_size, dtype, device,
                             question_tokens)
    next_pos = pos.max(dim=1).values.to(device) + 1
    step_fn = decoder if compiled and decoder.prepare(cache) else decode_step
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    switch = recompute_position(config.rope_scaling)
    sequences = [list(p) for p in prompts] if switch is not None and longest <= switch else None
    for step in range(max_new_tokens):
        token = sample(logits, sampling, generator)
        yield [None if d else int(t) for t, d in zip(token.tolist(), done.tolist())]
        done |= torch.isin(token, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        if sequences is not None:  # Phi-3 LongRoPE: kept until the switch, then started over with long factors
            for seq, t in zip(sequences, token.tolist()):
                seq.append(t)
        if sequences is not None and int(next_pos.max()) == switch:
            ids, pos = left_pad(sequences)
            cache, logits = _prefill(model, sequences, ids, pos, spec, cache_tokens, chunk_size, dtype, device)
            step_fn, sequences = decoder if compiled and decoder.prepare(cache) else decode_step, None
        else:
            logits = step_fn(token[:, None], next_pos[:, None], cache, model)
        next_pos = next_pos + 1


def _prefill(model, prompts: Sequence[Sequence[int]], ids: torch.Tensor, pos: torch.Tensor, spec: PolicySpec,
             cache_tokens: int, chunk_size: int, dtype: torch.dtype, device: torch.device,
             question: int | Sequence[int] | None = None):
    """The prompts' cache and last logits (batch, vocab): packed into one sequence when a plain
    dense batch is short enough, else left-padded (``ids``, ``pos``) and prefilled in chunks."""
    from .cache import build_cache, prefill

    if spec.is_plain_dense and len(prompts) > 1 and sum(map(len, prompts)) <= chunk_size * 8:
        return prefill_packed(model, prompts, cache_tokens, dtype, device)
    cache = build_cache(model.config, len(prompts), spec, cache_tokens, dtype=dtype,
                        device=cache_devices(model, device))  # split by device_map: each layer's with its block
    return cache, prefill(model, ids.to(device), cache, chunk_size=chunk_size, positions=pos.to(device),
                          question=question)


def decode_step(token: torch.Tensor, positions: torch.Tensor, cache: KVCache, model) -> torch.Tensor:
    """One eager decode step: last logits (batch, vocab) for ``token`` (batch, 1) at ``positions``
    (batch, 1), appended to ``cache`` (what :class:`~lucidlm.compiled.CompiledDecoder` compiles)."""
    return model(token, positions=positions, cache=cache, last_only=True)[:, -1]


def prefill_packed(model, prompts: Sequence[Sequence[int]], cache_tokens: int,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Prefill a batch of prompts of different lengths as ONE packed sequence (each prompt sees
    only itself), then lay their keys and values out left-padded in a dense batch cache, exactly
    as a padded prefill would have left them.

    A padded prefill spends the padding's share of its matrix products for nothing (41% for eight
    prompts of 24-136 tokens); prefilling the prompts one by one reads every weight once per
    prompt. Packed, the weights are read once and no padding is computed. Returns the cache and
    the last logits (batch, vocab).
    """
    from .cache import dense_cache

    lengths = [len(p) for p in prompts]
    longest, ends = max(lengths), torch.tensor(lengths).cumsum(0)
    ids = torch.tensor([[t for p in prompts for t in p]], device=device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)[None]
    segment = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(lengths)).to(device)
    own_prompt = segment[:, None] == segment[None, :]  # the causal part comes from the positions
    packed = KVCache([VisibleKeys(own_prompt) for _ in range(model.config.n_layer)])
    last = torch.zeros(ids.shape[1], dtype=torch.bool, device=device)
    last[ends - 1] = True
    logits = model(ids, positions=positions, cache=packed, select=last[None])
    batch = dense_cache(model.config, len(prompts), cache_tokens, dtype, cache_devices(model, device))
    for into, layer in zip(batch.layers, packed.layers):
        for row, (n, end) in enumerate(zip(lengths, ends.tolist())):
            into.k[row, :, longest - n:longest] = layer.k[0, :, end - n:end]
            into.v[row, :, longest - n:longest] = layer.v[0, :, end - n:end]
            into.pos[row, longest - n:longest] = torch.arange(n, device=device)
        into.filled = into._last = longest
    batch.next_position = torch.tensor(lengths, device=device)
    return batch, logits
