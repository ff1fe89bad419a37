"""The one model class. Every family is this code with different :class:`~lucidlm.Config` fields.

>>> import torch
>>> from lucidlm import Config, GPT
>>> model = GPT(Config.from_name("tiny-llama"))
>>> model(torch.tensor([[1, 2, 3]])).shape
torch.Size([1, 3, 256])
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..cache.base import KVCache
from ..config import Config
from . import rules
from .attention import CausalSelfAttention
from .checkpointing import run_block
from .linear import Linear
from .mla import MLAttention
from .mlp import build_mlp
from .moa import MoAttention
from .norm import build_norm


class Block(nn.Module):
    """Pre-norm (or post-norm, OLMo-2), sequential or parallel residual, optional sandwich norms."""

    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        c = config
        eps = c.block_norm_eps  # None: the final norm's (JetMoE's block norms differ)
        self.attn_norm = build_norm(c, eps=eps) if c.pre_norm else None
        default = MLAttention if c.kv_lora_rank is not None else MoAttention if c.moa else CausalSelfAttention
        self.attn = (c.attention_class or default)(c, layer)
        self.post_attn_norm = build_norm(c, eps=eps) if c.post_attention_norm else None
        self.mlp_norm = build_norm(c, eps=eps) if c.pre_norm and not c.shared_attention_norm else None
        self.mlp = c.mlp_class(c) if c.mlp_class is not None else build_mlp(c, layer)
        self.post_mlp_norm = build_norm(c, eps=eps) if c.post_mlp_norm else None
        self.parallel = c.parallel_residual
        self.residual_multiplier = c.residual_multiplier  # Granite

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache=None, rope_memo: dict | None = None) -> torch.Tensor:
        h = self.attn_norm(x) if self.attn_norm is not None else x
        a = self.attn(h, pos, cache, rope_memo)
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        if self.residual_multiplier != 1.0:
            a = a * self.residual_multiplier
        if self.parallel:  # NeoX: separate norms on x; Phi-2: the attention's norm output is shared
            m = self.mlp(self.mlp_norm(x) if self.mlp_norm is not None else h)
            return x + a + self._post_mlp(m)
        x = x + a
        m = self.mlp(self.mlp_norm(x) if self.mlp_norm is not None else x)
        return x + self._post_mlp(m)

    def _post_mlp(self, m: torch.Tensor) -> torch.Tensor:
        m = self.post_mlp_norm(m) if self.post_mlp_norm is not None else m
        return m * self.residual_multiplier if self.residual_multiplier != 1.0 else m


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_embed = nn.Embedding(c.block_size, c.n_embd) if c.position_embedding == "learned" else None
        self.layers = nn.ModuleList((c.block_class or Block)(c, i) for i in range(c.n_layer))
        self.final_norm = build_norm(c)
        self.lm_head = Linear(c.n_embd, c.vocab_size, bias=c.lm_head_bias)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def embed_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The hidden state entering the first block (what explanations attribute to)."""
        x = self.embed(input_ids)
        if self.config.scale_embeddings:  # Gemma: sqrt(n_embd), rounded to the weights' dtype
            x = x * torch.tensor(math.sqrt(self.config.n_embd), dtype=x.dtype)
        if self.config.embedding_multiplier != 1.0:  # Granite
            x = x * self.config.embedding_multiplier
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions.clamp(min=0))
        return x

    def positions_for(self, input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Default positions: continue after what the cache has seen (the cache keeps count), else
        start at 0."""
        B, T = input_ids.shape
        if cache is not None:
            return cache.positions_for(B, T, input_ids.device)
        return torch.arange(T, device=input_ids.device).expand(B, T)

    def forward(self, input_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, inputs_embeds: torch.Tensor | None = None,
                last_only: bool = False, select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, tokens, vocab) — (batch, 1, vocab) with ``last_only``.

        ``select`` (batch, tokens) bool: logits only where it is true, as (n_selected, vocab); training
        uses it to skip the vocabulary projection of tokens the loss does not count.

        ``positions`` (batch, tokens): true positions (-1 marks left padding); default consecutive.
        ``cache``: a :class:`~lucidlm.cache.KVCache`; the new tokens are appended to it.
        ``inputs_embeds``: replaces ``embed_tokens(input_ids)`` (the explainer's entry point).
        """
        if input_ids is None and inputs_embeds is None:
            raise ValueError("forward needs input_ids or inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds[..., 0]
        if ref.shape[-1] == 0:
            raise ValueError("input_ids has no tokens: expected shape (batch, tokens) with tokens >= 1")
        if positions is None:
            positions = self.positions_for(ref, cache)
        elif positions.dim() == 1:
            positions = positions.expand(ref.shape[0], -1)
        x = self.embed_tokens(input_ids, positions) if inputs_embeds is None else inputs_embeds
        rope_memo: dict = {}  # cos/sin of these positions, computed once and shared by the layers
        for i, block in enumerate(self.layers):
            if cache is None:  # checkpointed inside ``with checkpointing()`` (a cache's updates are not replayable)
                x = run_block(block, x, positions, None, rope_memo)
            else:
                x = block(x, positions, cache[i], rope_memo)
        if cache is not None:
            cache.advance(positions)
        if last_only:
            x = x[:, -1:]
        elif select is not None:
            x = x[select.to(x.device)]  # split across devices: the mask is on the first one
        logits = self.lm_head(self.final_norm(x))
        if self.config.logit_scale != 1.0:  # Cohere logit_scale, Granite 1 / logits_scaling
            logits = logits * self.config.logit_scale
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = rules.activation(lambda s: torch.tanh(s / cap) * cap, logits)
        return logits
