"""Feed-forward variants: plain MLP (GPT-2, NeoX, Phi-2), gated GLU (Llama family) and sparse MoE."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from . import rules
from .linear import Linear



def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """ReLU², y = max(x, 0)² (So et al., "Primer", NeurIPS 2021, Sec. 4; Arcee's and Nemotron's MLP).
    Element-wise, so it is explained like every activation here: the identity rule through
    :func:`rules.activation` (AttnLRP, Sec. 3: R_x = R_y; in gradient × input form the backward
    scales the gradient by y / x = max(x, 0)).

    >>> relu_squared(torch.tensor([-2.0, 3.0])).tolist()
    [0.0, 9.0]
    """
    return F.relu(x).square()


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "relu2": relu_squared,
}


class MLP(nn.Module):
    """down(act(up(x)))."""

    def __init__(self, config, bias: bool | None = None) -> None:
        super().__init__()
        bias = config.mlp_bias if bias is None else bias
        self.up_proj = Linear(config.n_embd, config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.n_embd, bias=bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(rules.activation(self.act, self.up_proj(x)))


class GLU(nn.Module):
    """down(act(gate(x)) * up(x)): AttnLRP puts the uniform rule on the product; CP-LRP makes the
    gate a constant (``rules.gate``), so all relevance flows through ``up``."""

    def __init__(self, config, bias: bool | None = None, size: int | None = None) -> None:
        super().__init__()
        bias = config.mlp_bias if bias is None else bias
        size = size or config.intermediate_size
        self.gate_proj = Linear(config.n_embd, size, bias=bias)
        self.up_proj = Linear(config.n_embd, size, bias=bias)
        self.down_proj = Linear(size, config.n_embd, bias=bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = rules.product(rules.activation(self.act, rules.gate(self.gate_proj(x))), self.up_proj(x))
        return self.down_proj(hidden)


class MoE(nn.Module):
    """Sparse mixture of GLU experts: softmax router, top-k, weights renormalised (Mixtral; Qwen-MoE
    with norm_topk_prob) or not; optionally a shared expert times sigmoid(gate(x)) (Qwen2-MoE).
    Routing weights and the shared expert's gate are constants for LRP (``rules.router_weights``)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.router = Linear(config.n_embd, config.n_expert, bias=False)
        size = config.moe_intermediate_size
        self.experts = nn.ModuleList(GLU(config, bias=False, size=size) for _ in range(config.n_expert))
        self.k = config.n_expert_per_token
        self.norm_topk = config.moe_norm_topk
        if config.shared_expert_intermediate_size:
            self.shared_expert = GLU(config, bias=False, size=config.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(config.n_embd, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.router(flat), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = rules.router_weights(weights.to(x.dtype))
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out = out.index_add(0, token, expert(flat[token]) * weights[token, slot, None])
        if self.shared_expert is not None:
            gate = rules.router_weights(torch.sigmoid(self.shared_expert_gate(flat)))
            out = out + gate * self.shared_expert(flat)
        return out.view_as(x)


def build_mlp(config, layer: int | None = None) -> nn.Module:
    """The MLP of ``layer``: a dense GLU where ``moe_layers`` marks a layer of an MoE model dense."""
    if config.mlp == "moe" and config.moe_layers is not None and layer is not None and not config.moe_layers[layer]:
        return GLU(config)
    return {"mlp": MLP, "glu": GLU, "moe": MoE}[config.mlp](config)
