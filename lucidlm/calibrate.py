"""Retrieval-head calibration for the ``duo`` KV-cache policy: which KV heads look back at a needle.

DuoAttention (Xiao et al. 2025) finds its retrieval heads by optimising a gate per head on synthetic
passkey-retrieval data. Here each KV head is scored, as Wu et al. 2024 ("Retrieval Head
Mechanistically Explains Long-Context Factuality") score retrieval heads, by the attention it pays to
the needle when the answer is produced. The prompts are the pass-key task of :mod:`lucidlm.ruler`
(the same generator ``lucidlm bench longctx`` uses) at depths spread over 0-100%, each followed by
its answer, teacher-forced. A head's score is the attention weight that the queries predicting the
answer put on the needle's tokens, averaged over the group's query heads, those queries and the
prompts. No gradient and no optimisation: one forward per prompt. The scores are written with
:func:`lucidlm.cache.heads.write_head_scores` (``lucidlm calibrate-heads MODEL --out FILE``).

>>> import torch
>>> from lucidlm import GPT, Config
>>> class Chars:  # a toy tokenizer: one token per character
...     def encode(self, text, add_special_tokens=True): return [ord(c) % 256 for c in text]
...     def decode(self, ids): return "".join(map(chr, ids))
>>> prompts = needle_prompts(Chars(), "the sky is blue and the grass is green " * 20, samples=2, length=300)
>>> [len(p.ids) for p in prompts], prompts[0].needle[0] < prompts[1].needle[0]
([306, 306], True)
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> heads = calibrate_heads(model, Chars(), [], samples=2, length=300, text="lorem ipsum dolor sit amet " * 40)
>>> len(heads.scores), len(heads.scores[0])
(2, 2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from .cache.base import KVCache, LayerCache
from .cache.heads import HeadScores, model_identity
from .cache.presses import attention_weights
from .ruler import Haystack, make_samples
from .texts import read_texts


@dataclasses.dataclass(frozen=True)
class NeedlePrompt:
    """A passkey prompt with its answer: token ids, the needle's token span [start, end), and the
    queries [first, last) that predict the answer's tokens."""

    ids: list[int]
    needle: tuple[int, int]
    answer_queries: tuple[int, int]


def needle_prompts(tokenizer, text: str, samples: int = 8, length: int = 1024, seed: int = 0) -> list[NeedlePrompt]:
    """``samples`` pass-key prompts of ``length`` tokens (:mod:`lucidlm.ruler`'s ``passkey`` task), the
    needle at depths spread evenly over 0-100%, each followed by its answer; deterministic for ``seed``.
    A length too short for the task is a :class:`~lucidlm.errors.CacheError` naming ``--length``."""
    depths = [s / (samples - 1) if samples > 1 else 0.5 for s in range(samples)]
    prompts = []
    for sample in make_samples(tokenizer, Haystack(tokenizer, text), ["passkey"], [length], depths, seed=seed,
                               flag="--length"):
        answer = tokenizer.encode(f" {sample.answers[0]}", add_special_tokens=False)
        start, size = sample.spans[0]
        n = len(sample.ids)
        prompts.append(NeedlePrompt(sample.ids + answer, (start, start + size), (n - 1, n - 1 + len(answer))))
    return prompts


def calibrate_heads(model, tokenizer, texts: Sequence[str | Path] = (), samples: int = 8, length: int = 1024,
                    seed: int = 0, text: str | None = None) -> HeadScores:
    """Score every KV head of ``model`` (a GPT or an LLM) by the attention its answer queries pay to
    the needle (see the module doc), on a haystack of ``text`` or else of the files ``texts``
    (:func:`lucidlm.texts.read_texts`: the license texts when empty)."""
    gpt = getattr(model, "model", model)
    hay = read_texts(texts, "--texts") if text is None else text
    prompts = needle_prompts(tokenizer, hay, samples, length, seed)
    total = None
    device = next(gpt.parameters()).device
    with torch.no_grad():
        for prompt in prompts:
            layers = [NeedleAttention(prompt, block.attn) for block in gpt.layers]
            gpt(torch.tensor([prompt.ids], device=device), cache=KVCache(layers), last_only=True)
            mass = torch.stack([layer.mass for layer in layers])  # (layers, groups)
            total = mass if total is None else total + mass
    scores = (total / len(prompts)).tolist()
    return HeadScores(model_identity(gpt.config), scores, samples=samples, length=length)


class NeedleAttention(LayerCache):
    """A layer "cache" for one forward over ``prompt``: stores nothing, and records per KV group the
    attention mass the answer queries put on the needle (``mass``, (groups,))."""

    wants_queries = True

    def __init__(self, prompt: NeedlePrompt, attention) -> None:
        self.prompt, self.attention = prompt, attention
        self.keys: torch.Tensor | None = None
        self.mass: torch.Tensor | None = None

    def extend(self, k, v, pos):
        self.keys = k
        return k, v, pos

    def see_queries(self, q, pos):
        first, last = self.prompt.answer_queries
        weights = attention_weights(q[:, :, first:last], pos[:, first:last], self.keys, pos,
                                    self.attention.scale, self.attention.softcap)
        start, end = self.prompt.needle
        self.mass = weights[0, ..., start:end].sum(-1).mean(dim=(1, 2))  # (groups,)
