"""JetMoE's mixture of attention heads (MoA; Shen et al., "ModuleFormer", 2023, and "JetMoE", 2024).

Each token's router (:class:`~lucidlm.model.mlp.TopKRouter`, the top-k logits softmaxed) picks
``n_expert_per_token`` of ``n_expert`` experts; an expert is a pair of projections, ``input_linear``
(hidden -> ``n_query_groups * head_size`` queries) and ``output_linear`` (back). The keys and
values come from one ``kv_proj`` shared by all experts, so the KV cache holds only those
``n_query_groups`` heads (``Config.kv_slot_sizes``), as in transformers. The chosen experts' query
heads attend over the shared heads (head ``g`` of every expert reads key/value head ``g``), and the
output is the routing-weighted sum of each expert's ``output_linear`` of its heads, plus ``bias``.

transformers orders the heads expert-major (slot ``s``, key/value head ``g`` -> head
``s * groups + g``, the keys repeated with ``repeat``); the kernels here group heads group-major
(head ``g * k + s`` reads group ``g``), the same attention with the heads permuted.

LRP: the routing weights are constants (``rules.router_weights``), so the expert projections are
linear maps and their weighted sum a sum of linear terms; q·kᵀ, the softmax and A·V take the rules of
every attention (:meth:`~lucidlm.model.attention.CausalSelfAttention.attend`).

>>> import torch
>>> from lucidlm import GPT, Config
>>> config = Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_query_groups=2, head_size=12, moa=True,
...                 n_expert=3, n_expert_per_token=2, mlp="jetmoe_moe", moe_intermediate_size=16)
>>> model = GPT(config)
>>> type(model.layers[0].attn).__name__, model(torch.tensor([[1, 2, 3]])).shape, config.kv_slot_sizes()
('MoAttention', torch.Size([1, 3, 64]), (2, 12, 12))
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..cache.base import LayerCache
from ..config import Config
from .attention import CausalSelfAttention
from .latents import LatentSite, Tap
from .linear import Linear
from .mlp import ParallelExperts, TopKRouter
from .rope import RotaryFrequencies, apply_rope


class MoAExperts(nn.Module):
    """The attention experts, named as in JetMoE's checkpoints: ``router.layer``, ``input_linear``,
    ``output_linear`` (stacked (experts, out, in)) and the output ``bias``."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        size = config.n_query_groups * config.head_size
        self.router = TopKRouter(config, "topk_softmax")
        self.input_linear = ParallelExperts(config.n_expert, config.n_embd, size)
        self.output_linear = ParallelExperts(config.n_expert, size, config.n_embd)
        self.bias = nn.Parameter(torch.zeros(config.n_embd))
        # each expert's heads on their way into its output_linear (latent relevances, ablation)
        self.taps = nn.ModuleList(Tap() for _ in range(config.n_expert))

    def queries(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """(tokens, k, groups * head_size): each chosen expert's ``input_linear`` of its token."""
        out = flat.new_zeros(*chosen.shape, self.input_linear.weight.shape[1])
        for e in range(self.input_linear.weight.shape[0]):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out = out.index_put((token, slot), F.linear(flat[token], self.input_linear.weight[e]))
        return out

    def merge(self, heads: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(tokens, n_embd): Σ over a token's slots of the weight times the expert's ``output_linear``
        of the slot's heads (``heads``: (tokens, k, groups * head_size)), plus ``bias``."""
        out = heads.new_zeros(heads.shape[0], self.bias.shape[0])
        for e in range(self.output_linear.weight.shape[0]):
            token, slot = torch.where(chosen == e)
            if token.numel():
                part = F.linear(self.taps[e](heads[token, slot]), self.output_linear.weight[e]) * weights[token, slot, None]
                out = out.index_add(0, token, part)
        return out + self.bias


class MoAttention(CausalSelfAttention):
    """JetMoE's attention: ``experts`` (:class:`MoAExperts`) for the queries and the output, one
    ``kv_proj`` (keys, then values) for the ``n_query_groups`` shared heads.

    Latent relevances are per attention expert and head: ``n_expert * n_query_groups`` heads,
    expert-major (head ``e * n_query_groups + g`` is expert ``e``'s head ``g``, which reads key/value
    head ``g``), each the input of its expert's ``output_linear`` over the tokens routed to it. A
    token's ``n_head`` computed heads are its chosen experts' heads, so the per-head values of
    a dense attention would mix experts from token to token."""

    per_head_qkv = False  # the queries come from the chosen experts, keys and values from kv_proj

    def __init__(self, config: Config, layer: int) -> None:
        nn.Module.__init__(self)
        c = config
        self.n_head, self.n_groups, self.head_size = c.n_head, c.n_query_groups, c.head_size
        self.k = c.n_expert_per_token  # the experts (head groups) each token attends with
        self.experts = MoAExperts(c)
        self.kv_proj = Linear(c.n_embd, 2 * c.n_query_groups * c.head_size, bias=False)
        self.qk_norm, self.clip, self.softcap, self.sinks = None, None, None, None
        self.window = c.sliding_window if c.is_sliding(layer) else None
        self.scale = c.attention_scale or c.head_size ** -0.5
        self.use_rope, self.rope_interleaved = True, c.rope_interleaved
        self._rope_args = (c.head_size, c.rotary_fraction, c.rope_theta, c.rope_scaling)
        self.rotary = RotaryFrequencies(*self._rope_args)
        self._rope_key = self._rope_args[:3] + (repr(self._rope_args[3]), self.rope_interleaved)

    def latents(self) -> dict[str, LatentSite]:
        """Each attention expert's heads, entering its ``output_linear`` (see the class docstring)."""
        return {"attn": LatentSite(tuple(self.experts.taps), self.n_groups, "heads", self.head_size, experts=True)}

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: LayerCache | None = None,
                rope_memo: dict | None = None) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        weights, chosen = self.experts.router(flat)
        # (B*T, k, groups * head_size) -> heads group-major: head g * k + s reads key/value head g
        q = self.experts.queries(flat, chosen).view(B, T, self.k, self.n_groups, self.head_size)
        q = q.transpose(2, 3).reshape(B, T, self.n_head, self.head_size).transpose(1, 2)
        k, v = (t.view(B, T, self.n_groups, self.head_size).transpose(1, 2) for t in self.kv_proj(x).chunk(2, -1))
        cos, sin = self._cos_sin(pos, q.dtype, rope_memo if rope_memo is not None else {})
        q, k = apply_rope(q, cos, sin, self.rope_interleaved), apply_rope(k, cos, sin, self.rope_interleaved)
        out = self.attend_cached(q, k, v, pos, cache)  # the shared heads are what the cache keeps
        heads = out.transpose(1, 2).reshape(B, T, self.n_groups, self.k, self.head_size).transpose(2, 3)
        return self.experts.merge(heads.reshape(B * T, self.k, -1), chosen, weights).view(B, T, C)
