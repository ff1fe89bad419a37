"""Presses: policies that read the whole prompt, then compress it once (kvpress's "compress after
prefill"), and the question-aware and query-statistics scorers that need it.

A press keeps every token while a prompt streams through (``holds_prompt``); when the prompt ends
(:meth:`~lucidlm.cache.base.KVCache.end_prompt`, called by :func:`~lucidlm.cache.prefill.stream`)
it scores every held slot per KV head and evicts down to its budget; a question the caller marks
(``question_tokens``) is kept, as kvpress appends it after compressing the context. Decode steps
after that evict at once: a generated token is kept (it is the model's own output) and the
lowest-scored prompt token goes, so a generation never holds more than the budget + 1.

* :class:`ExpectedAttentionLayerCache` (``expected-attention``): keys scored by the attention
  future queries are expected to pay, from the prompt's query statistics (Devoto et al. 2025).
* :class:`QuestionSnapKVLayerCache` (``snapkv-q``): SnapKV whose observation window is the
  question when the caller marks one (Li et al. 2024; kvpress's query-aware setting).
* :mod:`lucidlm.cache.kvzip` (``kvzip``) and :mod:`lucidlm.cache.duo` (``duo``) build on this.

>>> import torch
>>> from lucidlm import Config, GPT
>>> from lucidlm.cache import build_cache, prefill
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> cache = build_cache(model.config, batch=1, policy="expected-attention", cache_tokens=16)
>>> cache.holds_prompt
True
>>> _ = prefill(model, torch.randint(0, 256, (1, 40)), cache, chunk_size=8)  # one chunk, then compressed
>>> cache.layers[0].positions().shape[-1]
16
"""

from __future__ import annotations

import sys

import torch
from torch.nn import functional as F

from ..errors import CacheError
from .base import PromptEnd
from .slots import SlotLayerCache
from .spec import default_window


def question_rows(question: int | list[int] | tuple[int, ...] | None, batch: int,
                  device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The question's token count per row (batch,) long, or None when no question is marked.

    >>> question_rows(5, 2).tolist(), question_rows([3, 4], 2).tolist(), question_rows(None, 2)
    ([5, 5], [3, 4], None)
    """
    if question is None:
        return None
    rows = [question] * batch if isinstance(question, int) else list(question)
    if len(rows) != batch or any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in rows):
        raise CacheError(f"question={question!r}: expected a number of trailing question tokens >= 0, "
                         f"one or one per prompt ({batch})")
    return torch.tensor(rows, dtype=torch.long, device=device)


def by_group(pos: torch.Tensor, groups: int) -> torch.Tensor:
    """Slot positions (batch, groups, slots), from shared (batch, slots) or per-head positions."""
    return pos if pos.dim() == 3 else pos[:, None].expand(-1, groups, -1)


def attention_weights(q: torch.Tensor, q_pos: torch.Tensor, keys: torch.Tensor, k_pos: torch.Tensor,
                      scale: float, softcap: float | None = None) -> torch.Tensor:
    """Causal softmax weights (batch, groups, heads per group, queries, slots), float32, of the
    queries ``q`` (batch, heads, queries, d) at ``q_pos`` (batch, queries) over ``keys``
    (batch, groups, slots, d) at ``k_pos`` ((batch, slots) or (batch, groups, slots), -1 empty).
    A padding query (position -1) has weights 0.

    >>> q = torch.zeros(1, 2, 1, 4); k = torch.zeros(1, 1, 3, 4)
    >>> attention_weights(q, torch.tensor([[5]]), k, torch.tensor([[0, 1, -1]]), 0.5)[0, 0, :, 0].tolist()
    [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]
    """
    b, h, n, d = q.shape
    g = keys.shape[1]
    logits = torch.einsum("bgqnd,bgsd->bgqns", q.float().view(b, g, h // g, n, d), keys.float()) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    kp = by_group(k_pos, g)[:, :, None, None, :]
    qp = q_pos[:, None, None, :, None]
    visible = (kp >= 0) & (kp <= qp) & (qp >= 0)
    return torch.nan_to_num(logits.masked_fill(~visible, -torch.inf).softmax(-1), nan=0.0)


class PromptPressLayerCache(SlotLayerCache):
    """A slot cache that holds its prompt and compresses at its end (see the module doc).

    ``score`` (batch, groups, slots) is each KV head's score of each slot, set by
    :meth:`prompt_scores` when a prompt ends (generated tokens: +inf, kept); ``priority`` is it per
    head, or averaged over the groups when the layer's slots are shared. ``wants_queries``
    subclasses keep the prompt's last ``query_limit`` queries in ``queries`` / ``query_pos``.
    """

    holds_prompt = True
    slot_state = ("score",)
    #: most of a prompt's last queries kept for :meth:`prompt_scores` (wants_queries only)
    query_limit = 512

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("heads", "each")  # kvpress's presses score each KV head
        super().__init__(*args, **kwargs)
        self.score = self._empty_state(self.k[0].shape[1])  # (batch, groups, slots)
        self.holding = True
        self.queries: torch.Tensor | None = None  # (batch, heads, kept queries, d)
        self.query_pos: torch.Tensor | None = None  # (batch, kept queries)

    # ---- holding the prompt ------------------------------------------------------------------
    def extend(self, k, v, pos):
        if pos.shape[1] > 1:  # a prompt streams in (a decode step brings one token)
            self.holding = True
        return super().extend(k, v, pos)

    def settle(self, scores):
        if not self.holding:
            return super().settle(scores)
        capacity, self.capacity = self.capacity, sys.maxsize  # nothing is evicted before end_prompt
        try:
            super().settle(scores)
        finally:
            self.capacity = capacity

    def observe(self, scores, k, v, pos):
        fill = 0.0 if self.holding else torch.inf  # prompt tokens are scored at its end; generated ones stay
        new = torch.full((*self.score.shape[:2], k.shape[2]), fill, device=self.score.device)
        self.score = torch.cat([self.score, new], dim=-1)

    def see_queries(self, q, pos):
        if not self.holding or not self.query_limit:
            return
        q = q.detach().float()
        if self.queries is not None:
            q, pos = torch.cat([self.queries, q], dim=2), torch.cat([self.query_pos, pos], dim=1)
        self.queries, self.query_pos = q[:, :, -self.query_limit:], pos[:, -self.query_limit:]

    def end_prompt(self, end: PromptEnd) -> None:
        score = self.prompt_scores(end).float()
        score = score.masked_fill(score.isnan(), 0.0)  # (not nan_to_num: +-inf mean kept / evicted)
        self.score = self.keep_question(score, end.question if end is not None else None)
        self.holding, self.queries, self.query_pos = False, None, None
        self.evict()

    def keep_question(self, score: torch.Tensor, question) -> torch.Tensor:
        """``score`` with the marked question's tokens kept: kvpress compresses the context and
        appends the question after, so a question is never evicted (it counts in the budget)."""
        pos = by_group(self.pos, score.shape[1])
        rows = question_rows(question, pos.shape[0], pos.device)
        if rows is None:
            return score
        newest = pos.amax(-1, keepdim=True)
        return score.masked_fill((pos > newest - rows[:, None, None]) & (pos >= 0), torch.inf)

    def evict(self) -> None:
        """Evict down to ``capacity`` now (an empty step through the policy's own settle)."""
        b, g = self.pos.shape[0], self.k[0].shape[1]
        device = self.pos.device
        k = torch.zeros(b, g, 0, self.store.head_size, dtype=self.store.dtype, device=device)
        v = torch.zeros(b, g, 0, self.value_store.head_size, dtype=self.value_store.dtype, device=device)
        self.extend(k, v, torch.zeros(b, 0, dtype=torch.long, device=device))
        self.settle(None)

    # ---- scoring -----------------------------------------------------------------------------
    def prompt_scores(self, end: PromptEnd) -> torch.Tensor:
        """(batch, groups, slots): each KV head's score of every held slot, when a prompt ends."""
        raise NotImplementedError

    def priority(self, pos):
        return self.per_group(self.score)

    def held(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The held keys and values (batch, groups, slots, d), dequantised, and the slots' positions
        (batch, groups, slots)."""
        keys, values = self.store.decode(self.k), self.value_store.decode(self.v)
        return keys, values, by_group(self.pos, keys.shape[1])


class ExpectedAttentionLayerCache(PromptPressLayerCache):
    """Expected attention (Devoto et al. 2025, "Expected Attention: KV Cache Compression by
    Estimating Attention from Future Queries' Distribution"; kvpress ``ExpectedAttentionPress``).

    Future queries are modelled per head as a Gaussian: the mean ``mu`` and covariance ``Sigma``
    of the prompt's last ``n_queries`` queries (positions below ``n_sink`` left out: attention sinks
    are outliers), each taken back to RoPE's frame (un-rotated at its position) and rotated by the
    mean rotation of the next ``n_future_positions`` positions. A key's expected softmax numerator is
    ``E[exp(q·k s)] = exp(mu·k s + s² kᵀ Sigma k / 2)`` (s the attention scale, 1/sqrt(d)); as
    kvpress, the scores are the softmax of that exponent over the keys, averaged over a group's
    query heads, then ``(score + epsilon) · |v|`` with ``use_vnorm``. The first ``n_sink``
    positions are always kept (kvpress gives them the top score).

    kvpress takes the statistics over the whole prompt; the last ``n_queries`` bound what the
    layer holds while the prompt streams through.
    """

    policy = "expected-attention"
    wants_queries = True

    def __init__(self, *args, n_future_positions: int = 512, n_sink: int = 4, use_covariance: int = 1,
                 use_vnorm: int = 1, epsilon: float = 0.0, n_queries: int = 512, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.n_future, self.n_sink, self.epsilon = n_future_positions, n_sink, epsilon
        self.use_covariance, self.use_vnorm = bool(use_covariance), bool(use_vnorm)
        self.query_limit = n_queries

    def prompt_scores(self, end):
        keys, values, pos = self.held()
        if self.queries is None:
            return torch.zeros(pos.shape, device=pos.device)
        mu, cov = self.query_statistics(end.attention)
        scale = end.attention.scale
        g = keys.shape[1]
        k = keys.float().repeat_interleave(mu.shape[1] // g, dim=1)  # (batch, heads, slots, d)
        exponent = torch.einsum("bhd,bhsd->bhs", mu, k) * scale
        if cov is not None:
            exponent = exponent + torch.einsum("bhsi,bhij,bhsj->bhs", k, cov, k) * scale ** 2 / 2
        head_pos = pos.repeat_interleave(mu.shape[1] // g, dim=1)
        scores = exponent.masked_fill(head_pos < 0, -torch.inf).softmax(-1).nan_to_num(nan=0.0)
        scores = scores.unflatten(1, (g, -1)).mean(2)  # (batch, groups, slots)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values.float().norm(dim=-1)
        return scores.masked_fill((pos >= 0) & (pos < self.n_sink), torch.inf)

    def query_statistics(self, attention) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per head the mean (batch, heads, d) and covariance (batch, heads, d, d) of the future
        queries (None without ``use_covariance``), from the kept prompt queries."""
        q, q_pos = self.queries, self.query_pos
        q = attention.rotate(q, _inverse(attention.rotation(q_pos)))  # back to RoPE's frame
        weight = ((q_pos >= self.n_sink) & (q_pos >= 0)).float()[:, None, :, None]  # (batch, 1, n, 1)
        count = weight.sum(2).clamp_min(1.0)
        mu = (q * weight).sum(2) / count  # (batch, heads, d)
        centred = (q - mu[:, :, None]) * weight
        cov = centred.transpose(-1, -2) @ centred / count[..., None] if self.use_covariance else None
        future = q_pos.max(dim=1, keepdim=True).values + 1 + torch.arange(self.n_future, device=q.device)
        mean = _mean_rotation(attention.rotation(future))
        mu = attention.rotate(mu[:, :, None], mean)[:, :, 0]
        if cov is not None:  # R Sigma R^T: rotate the rows, then the rows of the transpose
            cov = attention.rotate(attention.rotate(cov, mean).transpose(-1, -2), mean)
        return mu, cov


def _inverse(cos_sin):
    return None if cos_sin is None else (cos_sin[0], -cos_sin[1])


def _mean_rotation(cos_sin):
    """cos and sin averaged over the positions (rotation is linear in them: the mean rotation)."""
    return None if cos_sin is None else tuple(t.float().mean(dim=2, keepdim=True) for t in cos_sin)


class QuestionSnapKVLayerCache(PromptPressLayerCache):
    """Question-aware SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before
    Generation", whose observation window is the end of the prompt — in practice the question; as
    kvpress's query-aware evaluation, the window here is exactly the question's tokens when the
    caller marks them (``question_tokens``/``question=``), else SnapKV's default ``window``).

    At the prompt's end the window's queries (at most the last 512) attend to every held key; a
    key's score per KV head is the weight summed over the window's queries and averaged over the
    group's query heads, pooled along the keys (``pool`` over ``kernel`` neighbours); the window's
    own tokens are kept. One decision per layer by default (``heads=shared``, the scores averaged
    over the KV heads): on the embedded model's 1k-token passkey prompts at 25% it kept the key 4
    times in 5 (as dense), per head (``each``) 2, ``adaptive`` 1. ``kernel`` defaults to SnapKV's 5;
    a tokenizer that writes numbers one digit per token (SmolLM2, Llama) needs a pool as wide as
    the facts asked for: ``kernel=21`` kept every 5-7 digit value at 25% of 1k-4k-token prompts
    where 5 lost the later digits (the README's long-context table).
    """

    policy = "snapkv-q"
    wants_queries = True

    def __init__(self, *args, window: int | None = None, kernel: int = 5, pool: str = "avg", **kwargs) -> None:
        kwargs.setdefault("heads", "shared")  # as SnapKV's mean over heads: found the passkey most often here
        super().__init__(*args, **kwargs)
        self.window = default_window(self.capacity) if window is None else window
        self.kernel, self.pool = kernel, pool

    def prompt_scores(self, end):
        keys, _, pos = self.held()
        if self.queries is None:
            return torch.zeros(pos.shape, device=pos.device)
        q_pos = self.query_pos
        rows = question_rows(end.question, q_pos.shape[0], q_pos.device)
        window = torch.full_like(q_pos[:, 0], self.window) if rows is None else rows.clamp_min(1)
        last = q_pos.max(dim=1, keepdim=True).values
        in_window = q_pos > last - window[:, None]
        weights = attention_weights(self.queries, q_pos.masked_fill(~in_window, -1), keys, pos,
                                    end.attention.scale, end.attention.softcap)
        step = weights.sum(3).mean(2)  # (batch, groups, slots)
        pool = F.avg_pool1d if self.pool == "avg" else F.max_pool1d
        pooled = pool(step, self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.masked_fill(pos > last[:, :, None] - window[:, None, None], torch.inf)
