"""Causal self-attention with grouped-query heads, explicit positions and a pluggable KV cache.

Two kernels compute the same thing:

* fused ``scaled_dot_product_attention`` (fast, returns no weights), used when nothing needs the
  weights;
* an explicit softmax path, used when the cache policy scores tokens by attention weight (H2O),
  when the logits are soft-capped (Gemma 2), or when CP-LRP must detach the softmax.

The LRP rules (uniform rule on q·kᵀ and A·V, stop-gradient on the softmax for CP-LRP) are applied
at the kernel's inputs and outputs, so both kernels explain identically.

Memory linear in tokens: a call that would hold a (queries x keys) tensor (the explicit kernel's
weights, a sliding window's or sinks' mask, SDPA's math kernel for MLA's unequal head sizes) over
more than :data:`QUERY_CHUNK` queries attends a chunk of queries at a time; where a backward will
follow (an explanation, checkpointed training) each chunk is recomputed in it rather than kept.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..cache.base import LayerCache
from . import rules
from .checkpointing import active as checkpointing_active
from .checkpointing import recomputed, recomputing
from .kernels import explicit_attention, heads_mask, position_mask
from .latents import LatentSite, heads_of
from .linear import Linear
from .norm import HeadWeightsLayerNorm, LayerNorm, PerHeadNorm, RMSNorm
from .rope import RotaryFrequencies, apply_rope, rope_cos_sin

#: where the forwards of this thread/task append their attention weights inside
#: ``with recording_weights()`` (attention rollout); a ContextVar, so other threads never record
_recorded: contextvars.ContextVar[list[torch.Tensor] | None] = contextvars.ContextVar(
    "lucidlm_attention_weights", default=None)


@contextlib.contextmanager
def recording_weights() -> Iterator[list[torch.Tensor]]:
    """Record the attention weights of every layer of the forwards run inside the block, in this
    thread/task only: a list that receives one detached (batch, groups, heads per group, queries,
    keys) tensor per attention call, in call order (the explicit kernel runs while recording).

    >>> from lucidlm import Config, GPT
    >>> model = GPT(Config.from_name("tiny-llama"))
    >>> with recording_weights() as weights:
    ...     _ = model(torch.tensor([[1, 2, 3]]))
    >>> len(weights) == model.config.n_layer, weights[0].shape[-2:]
    (True, torch.Size([3, 3]))
    """
    weights: list[torch.Tensor] = []
    token = _recorded.set(weights)
    try:
        yield weights
    finally:
        _recorded.reset(token)


def _recording() -> list[torch.Tensor] | None:
    # a ContextVar read would break a torch.compile graph; only inference is compiled
    return None if torch.compiler.is_compiling() else _recorded.get()


class CausalSelfAttention(nn.Module):
    #: whether the queries, keys and values come from per-head projections of the hidden state
    #: (``project_qkv``): LLaMA-Adapter's prefix goes through them (:mod:`lucidlm.train.adapter`)
    per_head_qkv = True

    def __init__(self, config, layer: int) -> None:
        super().__init__()
        c = config
        self.n_head, self.n_groups, self.head_size = c.n_head, c.n_query_groups, c.head_size
        self.q_proj = Linear(c.n_embd, c.n_head * c.head_size, bias=c.attn_bias)
        self.k_proj = Linear(c.n_embd, c.n_query_groups * c.head_size, bias=c.attn_bias)
        self.v_proj = Linear(c.n_embd, c.n_query_groups * c.head_size, bias=c.attn_bias)
        self.o_proj = Linear(c.n_head * c.head_size, c.n_embd, bias=c.attn_out_bias)
        self.qk_norm = c.qk_norm
        if c.qk_norm == "head":
            self.q_norm = RMSNorm(c.head_size, c.norm_eps, c.norm_unit_offset)
            self.k_norm = RMSNorm(c.head_size, c.norm_eps, c.norm_unit_offset)
        elif c.qk_norm == "full":
            self.q_norm = RMSNorm(c.n_head * c.head_size, c.norm_eps, c.norm_unit_offset)
            self.k_norm = RMSNorm(c.n_query_groups * c.head_size, c.norm_eps, c.norm_unit_offset)
        elif c.qk_norm in ("layernorm_per_head", "layernorm_head_weights"):
            cls = PerHeadNorm if c.qk_norm == "layernorm_per_head" else HeadWeightsLayerNorm
            self.q_norm = cls(c.n_head, c.head_size, c.norm_eps)
            self.k_norm = cls(c.n_query_groups, c.head_size, c.norm_eps)
        elif c.qk_norm == "layernorm_head":  # Persimmon: one LayerNorm (with bias) over head_size, every head
            self.q_norm, self.k_norm = LayerNorm(c.head_size, c.norm_eps), LayerNorm(c.head_size, c.norm_eps)
        self.window = c.sliding_window if c.is_sliding(layer) else None
        self.scale = c.attention_scale or c.head_size ** -0.5
        self.softcap = c.attn_logit_softcapping
        # gpt-oss: per head, not per token, so no cache policy ever evicts it
        self.sinks = nn.Parameter(torch.zeros(c.n_head)) if c.attn_sinks else None
        self.clip = c.clip_qkv
        self.use_rope = c.position_embedding == "rope" and (c.rope_layers is None or c.rope_layers[layer])
        if self.use_rope:
            # Gemma 3, OLMo 3: RoPE per layer type (as transformers picks it), whether or not a window is set
            sliding_type = c.layer_types is not None and c.layer_types[layer] == "sliding_attention"
            local = c.rope_local_theta is not None and sliding_type
            theta = c.rope_local_theta if local else c.rope_theta
            self._rope_args = (c.head_size, c.rotary_fraction, theta, None if local else c.rope_scaling)
            self.rope_interleaved = c.rope_interleaved
            # a plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies
            self.rotary = RotaryFrequencies(*self._rope_args)
            self._rope_key = self._rope_args[:3] + (repr(self._rope_args[3]), self.rope_interleaved)  # equal: shared

    def reset_rope(self) -> None:
        """Recompute the RoPE frequencies (after building the model on the meta device)."""
        if self.use_rope:
            self.rotary = RotaryFrequencies(*self._rope_args)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: LayerCache | None = None,
                rope_memo: dict | None = None) -> torch.Tensor:
        """x: (batch, tokens, n_embd); pos: (batch, tokens) true positions (-1 = padding).
        ``rope_memo``: a dict shared by the layers of one forward, so that cos/sin are computed once
        per distinct set of frequencies rather than once per layer."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        if self.qk_norm == "full":  # before the clip (OLMoE), as transformers
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:  # OLMo: an element-wise non-linearity (identity rule)
            clip = self.clip
            q, k, v = (rules.activation(lambda t: t.clamp(-clip, clip), t) for t in (q, k, v))
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)
        k = k.view(B, T, self.n_groups, self.head_size).transpose(1, 2)
        v = v.view(B, T, self.n_groups, self.head_size).transpose(1, 2)
        if self.qk_norm in ("head", "layernorm_per_head", "layernorm_head_weights", "layernorm_head"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            cos, sin = self._cos_sin(pos, q.dtype, rope_memo if rope_memo is not None else {})
            q, k = apply_rope(q, cos, sin, self.rope_interleaved), apply_rope(k, cos, sin, self.rope_interleaved)
        out = self.attend_cached(q, k, v, pos, cache)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_head * self.head_size))

    def attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                      cache: LayerCache | None) -> torch.Tensor:
        """:meth:`attend` over the new keys and values appended to ``cache`` (if any), through the
        contract of :class:`lucidlm.cache.base.LayerCache` only: extend, what each query may see, and
        the attention scores a policy asked for handed back."""
        if cache is not None:
            k, v, key_pos = cache.extend(k, v, pos)
            if cache.wants_queries:  # a policy scoring keys by the queries' statistics (expected attention)
                cache.see_queries(q, pos)
            visible = cache.visibility(pos, key_pos)
            want_scores, score_queries = cache.wants_scores, cache.score_queries
        else:
            key_pos, visible, want_scores, score_queries = pos, None, False, None
        out, scores = self.attend(q, k, v, pos, key_pos, want_scores, causal_prefill=cache is None, visible=visible,
                                  score_queries=score_queries)
        if cache is not None:
            cache.settle(scores)
        return out

    def latents(self) -> dict[str, LatentSite]:
        """The heads: the input of ``o_proj`` (:mod:`lucidlm.model.latents`)."""
        return {"attn": heads_of(self.o_proj, self.n_head)}

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values, (batch, tokens, heads * head_size) each: the place a custom
        attention changes what it attends with (see docs/custom-models.md)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def rotation(self, pos: torch.Tensor, dtype: torch.dtype = torch.float32):
        """cos, sin of this layer's RoPE at ``pos`` (batch, tokens), without YaRN's attention factor
        (None without RoPE): for :meth:`rotate`, which KV-cache policies use (they cannot import
        the model) to move queries between positions."""
        if not self.use_rope:
            return None
        return rope_cos_sin(self.rotary.frequencies(pos), pos, dtype, self.rope_interleaved)

    def rotate(self, x: torch.Tensor, cos_sin) -> torch.Tensor:
        """``x`` (batch, heads, tokens, head_size) rotated by ``cos_sin`` from :meth:`rotation` (as
        it is when None). Linear in cos and sin: their means over positions rotate by the mean
        rotation (expected attention); ``(cos, -sin)`` undoes a rotation."""
        return x if cos_sin is None else apply_rope(x, *cos_sin, self.rope_interleaved)

    def _cos_sin(self, pos: torch.Tensor, dtype: torch.dtype, memo: dict):
        key = self._rope_key
        if key not in memo:  # the first layer with this RoPE: its frequencies for this forward's length
            memo[key] = rope_cos_sin(self.rotary.frequencies(pos), pos, dtype, self.rope_interleaved,
                                     self.rotary.scale_at(pos))
        return memo[key]

    # ---- kernels --------------------------------------------------------------------------
    def attend(self, q, k, v, q_pos, k_pos, want_scores: bool = False, causal_prefill: bool = False,
               visible: torch.Tensor | None = None, score_queries: int | None = None):
        """Attention output (batch, heads, tokens, head_size) and, if asked, the per-key scores
        (batch, groups, keys): weights summed over queries (``score_queries``: each row's last ones
        only), averaged over a group's heads.
        ``visible``: a cache's further restriction of the causal mask (see ``LayerCache.visibility``)."""
        q, k = rules.bilinear(q), rules.bilinear(k)
        record = _recording()
        explicit = want_scores or self.softcap is not None or _few_queries_on_cpu(q) or record is not None
        if not want_scores and record is None and self._square(q, v, q_pos, explicit, causal_prefill, visible):
            out = self._in_query_chunks(q, k, v, q_pos, k_pos, explicit, causal_prefill, visible)
            return rules.bilinear(out), None
        if explicit:
            mask = self._mask(q_pos, k_pos, visible)
            sinks = None if self.sinks is None else rules.sink_logits(self.sinks)
            out, weights = explicit_attention(q, k, v, mask, self.scale, self.softcap, sinks=sinks)
            scores = self._scores(weights, q_pos, score_queries) if want_scores else None
            if record is not None and not recomputing():  # a checkpointed block's recompute: recorded already
                record.append(weights.detach())
        else:
            # CP-LRP's constant softmax, in O(tokens) memory instead of the explicit kernel's O(tokens²)
            q, k = rules.query_key(q), rules.query_key(k)
            out, scores = self._fused(q, k, v, q_pos, k_pos, causal_prefill, visible), None
        return rules.bilinear(out), scores

    def _square(self, q, v, q_pos, explicit: bool, causal_prefill: bool, visible) -> bool:
        """Whether this call would make a (queries x keys) tensor per head or per row (weights, a
        mask, SDPA's math kernel) over more than :data:`QUERY_CHUNK` queries: then it runs in
        chunks of queries, so that memory grows linearly in tokens."""
        if q.shape[2] <= QUERY_CHUNK:
            return False
        plain_causal = causal_prefill and visible is None and self.window is None and self.sinks is None
        # SDPA's CPU flash kernel needs one head size for q, k and v; MLA's differ (math kernel)
        return explicit or not plain_causal or q.shape[-1] != v.shape[-1] or not bool((q_pos >= 0).all())

    def _in_query_chunks(self, q, k, v, q_pos, k_pos, explicit: bool, causal_prefill: bool, visible):
        """The attention of :data:`QUERY_CHUNK` queries at a time: (heads, chunk, keys) at most in
        memory. Where a backward will run (an explanation, or checkpointed training) each chunk is
        recomputed there rather than keeping its weights (:func:`~lucidlm.model.checkpointing.recomputed`);
        plain training keeps them, as the unchunked kernel would."""
        keep_nothing = torch.is_grad_enabled() and (rules.current() is not None or checkpointing_active())
        outs = []
        for start in range(0, q.shape[2], QUERY_CHUNK):
            end = start + QUERY_CHUNK
            # a prompt's later keys are in every one of these queries' future (positions grow along a row)
            keys = slice(None, end) if causal_prefill else slice(None)
            args = (q[:, :, start:end], k[:, :, keys], v[:, :, keys], q_pos[:, start:end], k_pos[..., keys],
                    _rows(visible, start, end, keys), explicit)
            outs.append(recomputed(self._chunk, *args) if keep_nothing else self._chunk(*args))
        return torch.cat(outs, dim=2)

    def _chunk(self, q, k, v, q_pos, k_pos, visible, explicit: bool) -> torch.Tensor:
        """One chunk of queries through the kernel the whole call would take (as :meth:`attend`)."""
        if explicit:
            sinks = None if self.sinks is None else rules.sink_logits(self.sinks)
            return explicit_attention(q, k, v, self._mask(q_pos, k_pos, visible), self.scale, self.softcap,
                                      sinks=sinks)[0]
        q, k = rules.query_key(q), rules.query_key(k)
        return self._fused(q, k, v, q_pos, k_pos, False, visible)

    def _mask(self, q_pos, k_pos, visible: torch.Tensor | None) -> torch.Tensor:
        """(batch, 1 | heads, queries, keys): positions (per group for a per-head cache's keys) and
        the cache's visibility (1, groups or heads of them), repeated for a group's heads."""
        mask = heads_mask(position_mask(q_pos, k_pos, self.window), self.n_head)
        return mask if visible is None else mask & heads_mask(visible, self.n_head)

    def _fused(self, q, k, v, q_pos, k_pos, causal_prefill: bool, visible: torch.Tensor | None = None):
        if self.sinks is not None:
            return self._fused_with_sinks(q, k, v, self._mask(q_pos, k_pos, visible))
        if visible is not None:
            mask, causal = self._mask(q_pos, k_pos, visible), False
        elif causal_prefill and self.window is None and bool((q_pos >= 0).all()):
            mask, causal = None, True  # plain prompt: the built-in causal mask is the fastest
        elif q.shape[2] == 1 and self.window is None and bool((k_pos >= 0).all()):
            mask, causal = None, False  # one-token decode over a full cache: every key is visible
        else:
            mask, causal = self._mask(q_pos, k_pos, None), False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                              enable_gqa=self.n_groups != self.n_head)

    def _fused_with_sinks(self, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        """SDPA with gpt-oss's sinks: one more key per group, zero key and zero value, whose logit is
        the head's sink through a float mask (q·0 + sink); the explicit kernel's weights exactly."""
        (B, H, Q, _), K = q.shape, k.shape[2]
        zero = k.new_zeros(*k.shape[:-2], 1, k.shape[-1])
        k, v = torch.cat([k, zero], dim=-2), torch.cat([v, zero], dim=-2)
        keys = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        sink = rules.sink_logits(self.sinks).to(q.dtype).view(1, H, 1, 1).expand(B, H, Q, 1)
        bias = torch.cat([keys.expand(B, H, Q, K), sink], dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale,
                                              enable_gqa=self.n_groups != self.n_head)

    @staticmethod
    def _scores(weights: torch.Tensor, q_pos: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """Weight each key received, summed over the (non-padding) queries, averaged over a group;
        ``last``: over each row's ``last`` newest queries only (SnapKV's observation window)."""
        real = q_pos >= 0  # padding queries' weights don't count
        if last is not None:
            real = real & (q_pos > q_pos.max(dim=1, keepdim=True).values - last)
        # detached: a policy's scores only decide what to evict, and are never differentiated (in
        # training through a cache they would otherwise keep every chunk's graph alive in the cache)
        return (weights.detach().float() * real[:, None, None, :, None]).sum(3).mean(2)


def _rows(visible: torch.Tensor | None, start: int, end: int, keys: slice) -> torch.Tensor | None:
    """A cache's visibility (..., queries or 1, keys) for the queries start:end and ``keys``."""
    if visible is None:
        return None
    return (visible[..., start:end, :] if visible.shape[-2] > 1 else visible)[..., keys]


def _few_queries_on_cpu(q: torch.Tensor) -> bool:
    """Decode steps on the CPU take the written-out kernel: SDPA's CPU flash kernel has a fixed cost
    per call (about 1.8 ms for one query over 256 keys on 2 cores, 45% of a SmolLM2-135M decode
    step) that two small matmuls do not."""
    return q.shape[2] <= _FEW_QUERIES and q.device.type == "cpu"


#: queries per call up to which the CPU takes the explicit kernel (decode, speculative steps)
_FEW_QUERIES = 8

#: queries per chunk where attention would otherwise hold a (queries x keys) tensor: a Gemma-2-2B
#: layer's 8 heads over 16k keys then hold 8 * 512 * 16k float32 = 256 MiB at a time
QUERY_CHUNK = 512
