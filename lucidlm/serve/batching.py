"""Continuous batching: the tensors of the server's decode loop (the thread and queues are
:mod:`lucidlm.serve.worker`'s).

Every active request is a :class:`Sequence` with its own one-row KV cache (any policy: an evicting
one decides for that sequence alone), its own sampling settings and its own ``torch.Generator``.
New requests are prefilled together (:func:`lucidlm.generate.prefill_packed` for the plain dense
policy, else each through its own cache) and join the batch; one decode forward then runs over
all of them (:func:`lucidlm.cache.rows.stacked`), and each row samples its next token exactly as
:func:`lucidlm.generate.generate_ids` does for one sequence, so a request's tokens are those of
its solo run (up to the rounding of batched matrix products).

>>> import torch
>>> from lucidlm import Config, GPT
>>> from lucidlm.generate import generate_ids
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> engine = BatchEngine(model, stop_ids=())
>>> seqs = engine.start([GenRequest([1, 2, 3], 4), GenRequest([5, 6, 7, 8, 9], 4)])
>>> out = [[], []]
>>> while seqs:
...     for seq, token in zip(seqs, engine.sample(seqs)):
...         out[seqs.index(seq)].append(token)
...     seqs = [s for s in seqs if not s.finished]
...     engine.forward(seqs)
>>> out == [[t[0] for t in generate_ids(model, [p], 4)] for p in ([1, 2, 3], [5, 6, 7, 8, 9])]
True
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence as Seq

import torch

from ..cache.spec import PolicySpec, parse_policy
from ..generate import Sampling, decode_step, generate_ids, prefill_packed, sample
from ..model.pipeline import cache_devices
from ..model.rope import length_dependent, recompute_position

#: prompts whose total is longer than this are prefilled one by one (as generate_ids: 8 chunks of 256)
PACKED_TOKENS = 256 * 8


@dataclasses.dataclass
class GenRequest:
    """One generation: prompt ids, at most ``max_new`` tokens, its own sampling settings."""

    ids: list[int]
    max_new: int
    sampling: Sampling = Sampling()


class Sequence:
    """An active request: its cache, the logits its next token is sampled from, its generator."""

    def __init__(self, request: GenRequest, max_new: int, device: torch.device) -> None:
        self.request, self.max_new = request, max_new
        seed = request.sampling.seed
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        self.cache = None
        self.logits: torch.Tensor | None = None  # (1, vocab)
        self.next_pos = len(request.ids)
        self.produced, self.finished, self.last, self.serial = 0, False, None, -1
        self.solo: Iterator[list[int | None]] | None = None  # generate_ids' steps, for length-dependent RoPE


class BatchEngine:
    """Prefill, sample and decode for a changing batch of :class:`Sequence` s of one model.

    ``stop_ids``: tokens that end a sequence (yielded, as in ``generate_ids``). ``kv_cache`` /
    ``cache_tokens``: the policy every sequence gets, per sequence.
    """

    def __init__(self, model, stop_ids: Seq[int] = (), kv_cache: str | PolicySpec = "dense",
                 cache_tokens: int | str | None = None) -> None:
        self.model, self.stops = model, frozenset(stop_ids)
        self.policy, self.cache_tokens = parse_policy(kv_cache), cache_tokens
        config = model.config
        # Length-dependent RoPE (dynamic NTK, Phi-3's LongRoPE switch) rotates by the sequence's
        # length, which a shared decode step cannot give each row: such models run every request
        # alone through generate_ids (interleaved with the others, one token each per step)
        self.solo = length_dependent(config.rope_scaling) or recompute_position(config.rope_scaling) is not None
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._rows: tuple[int, ...] = ()  # the sequences (by serial) that _stacked binds
        self._serials = itertools.count()
        self._stacked = None

    def max_new(self, request: GenRequest) -> int:
        """As generate_ids: never past the model's context length."""
        return max(0, min(request.max_new, self.model.config.block_size - len(request.ids)))

    def _budget(self, seq: Sequence) -> int:
        n = len(seq.request.ids)
        return self.policy.budget(self.cache_tokens, n + seq.max_new, prompt=n)

    # ---- joining --------------------------------------------------------------------------
    @torch.inference_mode()
    def start(self, requests: Seq[GenRequest]) -> list[Sequence]:
        """New sequences, prefilled (together where the policy allows), ready to :meth:`sample`."""
        seqs = [Sequence(r, self.max_new(r), self.device) for r in requests]
        for seq in seqs:
            seq.serial = next(self._serials)  # never reused (an id() may be, once a sequence is gone)
        if self.solo:
            for seq in seqs:
                seq.solo = generate_ids(self.model, [seq.request.ids], seq.max_new, seq.request.sampling,
                                        tuple(self.stops), kv_cache=self.policy, cache_tokens=self.cache_tokens)
            return seqs
        prompts = [s.request.ids for s in seqs]
        if self.policy.is_plain_dense and len(seqs) > 1 and sum(map(len, prompts)) <= PACKED_TOKENS:
            self._prefill_packed(seqs)
        else:
            for seq in seqs:
                self._prefill_one(seq)
        return seqs

    def _prefill_packed(self, seqs: list[Sequence]) -> None:
        from ..cache.rows import split_dense

        budgets = [self._budget(s) for s in seqs]
        prompts = [s.request.ids for s in seqs]
        batch, logits = prefill_packed(self.model, prompts, max(budgets), self.dtype, self.device)
        for seq, cache, row in zip(seqs, split_dense(batch, list(map(len, prompts)), budgets), logits):
            seq.cache, seq.logits = cache, row[None]

    def _prefill_one(self, seq: Sequence) -> None:
        from ..cache import build_cache, prefill

        seq.cache = build_cache(self.model.config, 1, self.policy, self._budget(seq), dtype=self.dtype,
                                device=cache_devices(self.model, self.device))
        seq.logits = prefill(self.model, torch.tensor([seq.request.ids], device=self.device), seq.cache)

    # ---- stepping -------------------------------------------------------------------------
    def sample(self, seqs: Seq[Sequence]) -> list[int]:
        """Each sequence's next token, with its own settings and generator; marks the finished."""
        tokens = []
        for seq in seqs:
            if seq.solo is not None:
                token = next(seq.solo)[0]
            else:
                token = int(sample(seq.logits, seq.request.sampling, seq.generator)[0])
            seq.produced += 1
            seq.finished = token in self.stops or seq.produced >= seq.max_new
            seq.last = token
            tokens.append(token)
        return tokens

    @torch.inference_mode()
    def forward(self, seqs: Seq[Sequence]) -> None:
        """One decode forward over ``seqs`` (each fed its last token): their next logits."""
        batched = [s for s in seqs if s.solo is None]
        if not batched:
            return
        from ..cache.rows import stacked

        rows = tuple(s.serial for s in batched)
        if self._rows != rows:  # the batch changed: bind its rows anew (dense rows move into one buffer)
            self._rows, self._stacked = rows, stacked([s.cache for s in batched])
        tokens = torch.tensor([[s.last] for s in batched], device=self.device)
        positions = torch.tensor([[s.next_pos] for s in batched], device=self.device)
        logits = decode_step(tokens, positions, self._stacked, self.model)
        for seq, row in zip(batched, logits):
            seq.logits, seq.next_pos = row[None], seq.next_pos + 1
