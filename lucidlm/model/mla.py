"""DeepSeek-V2/V3's multi-head latent attention (MLA), which caches the latent rather than keys and values.

MLA compresses each token's keys and values into one latent vector (``kv_lora_rank``) plus one
rotary key shared by all heads (``qk_rope_head_dim``); ``kv_b_proj`` expands the latent into every
head's non-rotary key (``qk_nope_head_dim``) and value (``v_head_dim``). The KV cache keeps the
latent and the rotated shared key, ``kv_lora_rank + qk_rope_head_dim`` numbers per token and layer,
instead of ``n_head * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim)`` (``kv_slot_sizes``):
every policy then keeps and evicts latent slots, and the keys and values are re-expanded from the
kept latents at every step (what the paper and transformers 5 do).

LRP: the factored products (``q_a``/``q_b``, ``kv_a``/``kv_b``) are linear maps, so relevance
passes through the low rank unchanged; the latent norms are RMSNorms (``rules.normalizer``); q·kᵀ
and A·V take the uniform rule and the softmax is as everywhere (:meth:`CausalSelfAttention.attend`).
DeepSeek's MoE is :class:`lucidlm.model.mlp.DeepSeekMoE`; a config with ``kv_lora_rank`` set builds
this attention (:class:`lucidlm.model.gpt.Block`).

>>> import torch
>>> from lucidlm import GPT, Config
>>> config = Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, head_size=12, intermediate_size=48,
...                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, rope_interleaved=True)
>>> GPT(config)(torch.tensor([[1, 2, 3]])).shape, config.kv_slot_sizes()
(torch.Size([1, 3, 64]), (1, 20, 0))
>>> type(GPT(config).layers[0].attn).__name__
'MLAttention'
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache.base import LayerCache
from ..config import Config
from .attention import CausalSelfAttention
from .linear import Linear
from .norm import RMSNorm
from .rope import RotaryFrequencies, apply_rope, softmax_scale

#: the eps of DeepSeek's q_a/kv_a RMSNorms (transformers builds them with the class default)
_LATENT_NORM_EPS = 1e-6


class MLAttention(CausalSelfAttention):
    """Multi-head latent attention; its cache slots hold ``[latent, rotated shared key]``. Its latent
    relevances are per head, at the input of ``o_proj`` (``n_head`` heads of ``v_head_dim``)."""

    per_head_qkv = False  # keys and values are expanded from the shared latent

    def __init__(self, config: Config, layer: int) -> None:
        nn.Module.__init__(self)
        c = config
        self.n_head = self.n_groups = c.n_head  # keys are expanded per head before the kernel
        self.rank, self.nope, self.rope, self.v_size = (c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim,
                                                        c.v_head_dim)
        qk = self.nope + self.rope
        if c.q_lora_rank is None:
            self.q_proj = Linear(c.n_embd, c.n_head * qk, bias=False)
        else:
            self.q_a_proj = Linear(c.n_embd, c.q_lora_rank, bias=c.attn_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = Linear(c.q_lora_rank, c.n_head * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(c.n_embd, self.rank + self.rope, bias=c.attn_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, _LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.rank, c.n_head * (self.nope + self.v_size), bias=False)
        self.o_proj = Linear(c.n_head * self.v_size, c.n_embd, bias=c.attn_bias)
        self.window, self.softcap, self.sinks = None, None, None  # full causal attention, no soft-cap, no sinks
        self.scale = softmax_scale(qk ** -0.5, c.rope_scaling)
        self.use_rope, self.rope_interleaved = True, c.rope_interleaved
        self._rope_args = (self.rope, 1.0, c.rope_theta, c.rope_scaling)
        self.rotary = RotaryFrequencies(*self._rope_args)
        self._rope_key = ("mla",) + self._rope_args[:3] + (repr(c.rope_scaling), c.rope_interleaved)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: LayerCache | None = None,
                rope_memo: dict | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self._queries(x).view(B, T, self.n_head, self.nope + self.rope).transpose(1, 2)
        q_nope, q_rot = q.split([self.nope, self.rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent, k_rot = self.kv_a_layernorm(latent)[:, None], k_rot[:, None]  # (B, 1, T, size)
        cos, sin = self._cos_sin(pos, q.dtype, rope_memo if rope_memo is not None else {})
        q_rot = apply_rope(q_rot, cos, sin, self.rope_interleaved)
        k_rot = apply_rope(k_rot, cos, sin, self.rope_interleaved)  # rotated once, then cached as it is
        slots = torch.cat([latent, k_rot], dim=-1)
        if cache is not None:  # the latent is what the cache keeps: keys only, no values
            slots, _, key_pos = cache.extend(slots, slots[..., :0], pos)
            visible = cache.visibility(pos, key_pos)
            want_scores, score_queries = cache.wants_scores, cache.score_queries
        else:
            key_pos, visible, want_scores, score_queries = pos, None, False, None
        k, v = self.expand(slots)
        out, scores = self.attend(torch.cat([q_nope, q_rot], dim=-1), k, v, pos, key_pos, want_scores,
                                  causal_prefill=cache is None, visible=visible, score_queries=score_queries)
        if cache is not None:  # one slot per token for all heads: the heads' scores averaged
            cache.settle(None if scores is None else scores.mean(1, keepdim=True))
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_head * self.v_size))

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def expand(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys (B, heads, S, nope + rope) and values (B, heads, S, v_head_dim) from cache
        slots (B, 1, S, kv_lora_rank + rope): ``kv_b_proj`` of the latent, the shared rotary key
        appended to every head."""
        B, _, S, _ = slots.shape
        latent, k_rot = slots.split([self.rank, self.rope], dim=-1)
        kv = self.kv_b_proj(latent[:, 0]).view(B, S, self.n_head, self.nope + self.v_size).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_size], dim=-1)
        return torch.cat([k_nope, k_rot.expand(B, self.n_head, S, self.rope)], dim=-1), v
