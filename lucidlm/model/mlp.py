"""Feed-forward variants: plain MLP (GPT-2, NeoX, Phi-2), gated GLU (Llama family), sparse MoE, gpt-oss's MoE of
clamped-SwiGLU experts, DeepSeek's grouped-routing MoE with shared experts, and DBRX's and JetMoE's MoEs of
stacked GLU experts."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from . import rules
from .latents import LatentSite, Tap, neurons_of
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


def xielu(x: torch.Tensor, alpha_p: torch.Tensor | float = 0.8, alpha_n: torch.Tensor | float = 0.8,
          beta: torch.Tensor | float = 0.5, eps: torch.Tensor | float = -1e-6) -> torch.Tensor:
    """xIELU (Huang et al., "Deriving Activation Functions Using Integration", arXiv:2411.13010;
    Apertus' MLP): ``alpha_p x² + beta x`` for x > 0, ``alpha_n (expm1(min(x, eps)) - x) + beta x``
    otherwise (the defaults are transformers' initial values; :class:`XIELU` learns them per layer).
    Element-wise, so it is explained with the identity rule through :func:`rules.activation`
    (AttnLRP, Sec. 3: R_x = R_y; in gradient × input form the backward scales the gradient by y / x).

    >>> [round(v, 4) for v in xielu(torch.tensor([2.0, -1.0])).tolist()]  # 0.8·4 + 0.5·2; 0.8·(e⁻¹ - 1 + 1) - 0.5
    [4.2, -0.2057]
    """
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    negative = (torch.expm1(torch.minimum(x, eps)) - x) * alpha_n
    return torch.where(x > 0, alpha_p * x * x + beta * x, negative + beta * x)


class XIELU(nn.Module):
    """:func:`xielu` with its two slopes learned per layer, stored as transformers' ``XIELUActivation``
    stores them (the checkpoint's ``mlp.act_fn.*``): ``alpha_p = softplus(p)``, ``alpha_n = beta +
    softplus(n)``, ``beta`` and ``eps`` fixed buffers.

    >>> act = XIELU(); round(act(torch.tensor([2.0])).item(), 5)
    4.2
    """

    def __init__(self, alpha_p: float = 0.8, alpha_n: float = 0.8, beta: float = 0.5, eps: float = -1e-6) -> None:
        super().__init__()
        self.alpha_p = nn.Parameter(torch.tensor(alpha_p).expm1().log().unsqueeze(0))  # softplus⁻¹
        self.alpha_n = nn.Parameter(torch.tensor(alpha_n - beta).expm1().log().unsqueeze(0))
        self.register_buffer("beta", torch.tensor(beta))
        self.register_buffer("eps", torch.tensor(eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha_n = self.beta + F.softplus(self.alpha_n)
        return xielu(x, F.softplus(self.alpha_p), alpha_n, self.beta, self.eps)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "relu2": relu_squared,
    "xielu": xielu,  # at its initial values; a plain MLP learns them per layer (XIELU)
}


class MLP(nn.Module):
    """down(act(up(x))); Apertus' learned xIELU is the module ``act_fn`` (its checkpoint name)."""

    def __init__(self, config, bias: bool | None = None) -> None:
        super().__init__()
        bias = config.mlp_bias if bias is None else bias
        self.up_proj = Linear(config.n_embd, config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.n_embd, bias=bias)
        self.act_fn = XIELU() if config.activation == "xielu" else None
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.act if self.act_fn is None else self.act_fn
        return self.down_proj(rules.activation(act, self.up_proj(x)))

    def latents(self) -> dict[str, LatentSite]:
        """The neurons: the input of ``down_proj`` (:mod:`lucidlm.model.latents`)."""
        return {"mlp": neurons_of(self.down_proj)}


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

    def latents(self) -> dict[str, LatentSite]:
        """The neurons: the input of ``down_proj`` (:mod:`lucidlm.model.latents`)."""
        return {"mlp": neurons_of(self.down_proj)}


def expert_latents(downs, size: int, shared: nn.Module | None = None) -> dict[str, LatentSite]:
    """An MoE's latents: each routed expert's ``size`` neurons, the inputs of ``downs`` (one module
    per expert), and the shared expert's (``"shared_mlp"``) where there is one."""
    out = {"mlp": LatentSite(tuple(downs), size, experts=True)}
    if shared is not None:
        out["shared_mlp"] = shared.latents()["mlp"]
    return out


def routed(experts: nn.ModuleList, flat: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over each token's chosen experts (``chosen``, ``weights``: (tokens, k)) of the weight times
    the expert's output on that token; ``flat``: (tokens, n_embd)."""
    out = torch.zeros_like(flat)
    for e, expert in enumerate(experts):
        token, slot = torch.where(chosen == e)
        if token.numel():
            out = out.index_add(0, token, expert(flat[token]) * weights[token, slot, None])
    return out


def softmax_topk(logits: torch.Tensor, k: int, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, k) routing weights and chosen experts: the k largest of the float32 softmax over every
    expert, renormalised to sum to 1 where ``normalise`` (Mixtral; Qwen-MoE and OLMoE norm_topk_prob)."""
    weights, chosen = F.softmax(logits, dim=-1, dtype=torch.float32).topk(k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True) if normalise else weights), chosen


def topk_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GraniteMoE: the softmax over each token's k largest logits only (in float32).

    >>> weights, chosen = topk_softmax(torch.tensor([[0.0, 2.0, 1.0]]), 2)
    >>> chosen.tolist(), round(float(weights.sum()), 6)
    ([[1, 2]], 1.0)
    """
    top, chosen = logits.float().topk(k, dim=-1)
    return F.softmax(top, dim=-1), chosen


def sparsemixer(scores: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's top-2 routing (``sparsemixer`` of transformers 5.25, its eval path): the best expert, then
    the best of the rest; each weighted by a softmax over the candidates whose logit is within
    ``2 * eps`` of that pick's, relative to ``max(|logit|, pick)``, read at the pick (the second
    softmax runs without the first pick). In the logits' own dtype, as transformers.

    >>> weights, chosen = sparsemixer(torch.tensor([[3.0, 0.0, 2.99]]), eps=0.01)
    >>> chosen.tolist(), [round(w, 4) for w in weights[0].tolist()]
    ([[0, 2]], [0.5025, 1.0])
    """
    first_weight, first = _sparsemixer_pick(scores, scores, eps)
    second_weight, second = _sparsemixer_pick(scores.scatter(-1, first, float("-inf")), scores, eps)
    return torch.cat([first_weight, second_weight], dim=-1), torch.cat([first, second], dim=-1)


def _sparsemixer_pick(candidates: torch.Tensor, scores: torch.Tensor, eps: float):
    best, chosen = candidates.max(dim=-1, keepdim=True)
    far = (best - scores) / scores.abs().clamp(min=best) > 2 * eps
    return candidates.masked_fill(far, float("-inf")).softmax(dim=-1).gather(-1, chosen), chosen


class MoE(nn.Module):
    """Sparse mixture of GLU experts: a router, then ``config.moe_routing``: the top-k of the softmax,
    renormalised (Mixtral; Qwen-MoE and OLMoE with norm_topk_prob) or not, the softmax of the top-k
    logits (GraniteMoE) or PhiMoE's sparsemixer; optionally a shared expert times sigmoid(gate(x))
    (Qwen2-MoE). Routing weights and the shared expert's gate are constants for LRP
    (``rules.router_weights``)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.router = Linear(config.n_embd, config.n_expert, bias=False)
        size = config.moe_intermediate_size
        self.experts = nn.ModuleList(GLU(config, bias=False, size=size) for _ in range(config.n_expert))
        self.k = config.n_expert_per_token
        self.norm_topk = config.moe_norm_topk
        self.routing, self.jitter_eps = config.moe_routing, config.moe_jitter_eps
        if config.shared_expert_intermediate_size:
            self.shared_expert = GLU(config, bias=False, size=config.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(config.n_embd, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.route(self.router(flat))
        out = routed(self.experts, flat, chosen, rules.router_weights(weights.to(x.dtype)))
        if self.shared_expert is not None:
            gate = rules.router_weights(torch.sigmoid(self.shared_expert_gate(flat)))
            out = out + gate * self.shared_expert(flat)
        return out.view_as(x)

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, k) routing weights and chosen experts of the router's logits."""
        if self.routing == "topk_softmax":
            return topk_softmax(logits, self.k)
        if self.routing == "sparsemixer":
            return sparsemixer(logits, self.jitter_eps)
        return softmax_topk(logits, self.k, self.norm_topk)

    def latents(self) -> dict[str, LatentSite]:
        return expert_latents([e.down_proj for e in self.experts], self.experts[0].down_proj.in_features,
                              self.shared_expert)


class DeepSeekMoE(nn.Module):
    """DeepSeek-V2/V3's MoE: routed GLU experts (named as in the checkpoints, ``experts.{e}.gate_proj``
    ...) plus always-on ``shared_experts``. Routing as transformers 5: V2 (``moe_scoring="softmax"``)
    takes the top-k of the softmax, among the ``topk_group`` groups with the best expert where
    ``topk_method="group_limited_greedy"``; V3 (``"sigmoid"``) ranks groups by their two best sigmoid
    scores plus ``e_score_correction_bias``, picks experts by the biased scores and weights them by
    the plain ones (renormalised where ``moe_norm_topk``). Both scale by ``routed_scaling_factor``.
    The routing weights are constants for LRP (``rules.router_weights``)."""

    def __init__(self, config) -> None:
        super().__init__()
        size = config.moe_intermediate_size or config.intermediate_size
        self.gate = DeepSeekRouter(config)
        self.experts = nn.ModuleList(GLU(config, bias=False, size=size) for _ in range(config.n_expert))
        shared = size * config.n_shared_experts
        self.shared_experts = GLU(config, bias=False, size=shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.gate(flat)
        out = routed(self.experts, flat, chosen, rules.router_weights(weights.to(x.dtype))).view_as(x)
        return out + self.shared_experts(x) if self.shared_experts is not None else out

    def latents(self) -> dict[str, LatentSite]:
        return expert_latents([e.down_proj for e in self.experts], self.experts[0].down_proj.in_features,
                              self.shared_experts)


class DeepSeekRouter(nn.Module):
    """(tokens, k) routing weights and chosen experts; see :class:`DeepSeekMoE`."""

    def __init__(self, config) -> None:
        super().__init__()
        self.c = config
        self.weight = nn.Parameter(torch.zeros(config.n_expert, config.n_embd))
        if config.moe_scoring == "sigmoid":  # V3's load-balancing bias: in the choice, not the weights
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_expert))

    def forward(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.c
        logits = F.linear(flat.float(), self.weight.float())  # transformers routes in float32
        if c.moe_scoring == "softmax":
            scores = logits.softmax(dim=-1)
            if c.topk_method == "group_limited_greedy":
                scores = scores.masked_fill(~self._best_groups(self._per_group(scores).max(dim=-1).values), 0.0)
            weights, chosen = scores.topk(c.n_expert_per_token, dim=-1, sorted=False)
        else:
            scores = logits.sigmoid()
            biased = scores + self.e_score_correction_bias.float()
            group_scores = self._per_group(biased).topk(2, dim=-1)[0].sum(dim=-1)
            chosen = biased.masked_fill(~self._best_groups(group_scores), float("-inf")).topk(
                c.n_expert_per_token, dim=-1, sorted=False)[1]
            weights = scores.gather(1, chosen)
        if c.moe_norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, chosen

    def _per_group(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.view(-1, self.c.n_group, self.c.n_expert // self.c.n_group)

    def _best_groups(self, group_scores: torch.Tensor) -> torch.Tensor:
        """(tokens, experts) bool: the experts of each token's ``topk_group`` best groups."""
        c = self.c
        best = group_scores.topk(c.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return mask[:, :, None].expand(-1, -1, c.n_expert // c.n_group).reshape(-1, c.n_expert)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's expert non-linearity: ``g * sigmoid(alpha * g) * (u + 1)`` with ``g = min(gate, limit)``
    and ``u = clamp(up, -limit, limit)``.

    LRP: the clamp and the gate's swish form one element-wise map of ``gate`` (identity rule, AttnLRP
    Sec. 3: R_gate = R_out of the map), and so do the clamp and the ``+ 1`` of ``up`` (identity
    rule: the shift hands its share back to ``up`` instead of absorbing it, so CP-LRP conserves);
    the product of the two takes the uniform rule (AttnLRP Eq. 7) as in :class:`GLU`, and under
    CP-LRP the gate is a constant (``rules.gate``), so all relevance flows through ``up``.

    >>> g = torch.tensor([-1.0, 0.5, 9.0]); u = torch.tensor([0.5, -8.0, 1.0])
    >>> clamped_swiglu(g, u, alpha=1.702, limit=7.0).tolist() == (
    ...     g.clamp(max=7) * torch.sigmoid(1.702 * g.clamp(max=7)) * (u.clamp(-7, 7) + 1)).tolist()
    True
    """
    swish = rules.activation(lambda g: (c := g.clamp(max=limit)) * torch.sigmoid(c * alpha), rules.gate(gate))
    return rules.product(swish, rules.activation(lambda u: u.clamp(-limit, limit) + 1, up))


class StackedLinear(nn.Module):
    """Every expert's ``x @ weight[e] + bias[e]`` in one (experts, in, out) matrix, as gpt-oss stores
    it (``gate_up_proj``/``down_proj`` and their biases); the parent reads ``weight``/``bias``."""

    def __init__(self, experts: int, size_in: int, size_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, size_in, size_out))
        self.bias = nn.Parameter(torch.empty(experts, size_out))

    def product(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return x @ self.weight[expert] + self.bias[expert]


class ClampedExperts(nn.Module):
    """gpt-oss's experts: ``down(clamped_swiglu(gate_up(x)))``, the gate and up columns interleaved
    (even columns gate, odd up), every product with a bias; each token's output weighted by its
    routing weight."""

    def __init__(self, config) -> None:
        super().__init__()
        size = config.moe_intermediate_size or config.intermediate_size
        self.gate_up = StackedLinear(config.n_expert, config.n_embd, 2 * size)
        self.down = StackedLinear(config.n_expert, size, config.n_embd)
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.size = size
        # each expert's neurons on their way into its down product (latent relevances, ablation)
        self.taps = nn.ModuleList(Tap() for _ in range(config.n_expert))

    def forward(self, flat: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(flat)
        for e in range(self.gate_up.weight.shape[0]):
            token, slot = torch.where(chosen == e)
            if token.numel():
                gate_up = self.gate_up.product(flat[token], e)
                hidden = clamped_swiglu(gate_up[..., ::2], gate_up[..., 1::2], self.alpha, self.limit)
                out = out.index_add(0, token, self.down.product(self.taps[e](hidden), e) * weights[token, slot, None])
        return out


class ClampedMoE(nn.Module):
    """gpt-oss's MoE: a router with a bias, the top-k logits softmaxed among themselves (a constant for
    LRP, ``rules.router_weights``), then :class:`ClampedExperts`."""

    def __init__(self, config) -> None:
        super().__init__()
        self.router = Linear(config.n_embd, config.n_expert, bias=True)
        self.experts = ClampedExperts(config)
        self.k = config.n_expert_per_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        top, chosen = self.router(flat).topk(self.k, dim=-1)
        weights = rules.router_weights(F.softmax(top, dim=-1, dtype=top.dtype))
        return self.experts(flat, chosen, weights).view_as(x)

    def latents(self) -> dict[str, LatentSite]:
        """Each expert's neurons, entering its ``down`` product (whose bias gets its own share)."""
        return expert_latents(self.experts.taps, self.experts.size)


def glu_expert(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act,
               tap: nn.Module) -> torch.Tensor:
    """One GLU expert from stacked weights, (out, in) each: ``down(act(gate x) * up x)`` with
    :class:`GLU`'s rules (the gate a constant under CP-LRP, the uniform rule on the product); the
    neurons pass through the expert's ``tap`` (:class:`~lucidlm.model.latents.Tap`) into ``down``."""
    hidden = rules.product(rules.activation(act, rules.gate(F.linear(x, gate))), F.linear(x, up))
    return F.linear(tap(hidden), down)


class TopKRouter(nn.Module):
    """``layer``: the router's logits. ``"softmax_topk"`` (DBRX): the top-k of the softmax, divided by
    their ``p``-norm where ``p`` is set; ``"topk_softmax"`` (JetMoE): the top-k logits (in float32)
    softmaxed among themselves. Returns the (tokens, k) weights, a constant for LRP
    (``rules.router_weights``), and the chosen experts."""

    def __init__(self, config, kind: str, p: float | None = None) -> None:
        super().__init__()
        self.layer = Linear(config.n_embd, config.n_expert, bias=False)
        self.kind, self.k, self.p = kind, config.n_expert_per_token, p

    def forward(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.layer(flat)
        if self.kind == "topk_softmax":
            weights, chosen = topk_softmax(logits, self.k)
            weights = weights.type_as(flat)
        else:  # in the logits' dtype, unlike softmax_topk (float32): as transformers' DBRX router
            weights, chosen = F.softmax(logits, dim=-1, dtype=logits.dtype).topk(self.k, dim=-1)
            if self.p is not None:
                weights = weights / weights.norm(p=self.p, dim=-1, keepdim=True)
        return rules.router_weights(weights), chosen


class DbrxExperts(nn.Module):
    """DBRX's experts as its checkpoints store them: ``w1`` (gate), ``v1`` (up) and ``w2`` (down,
    transposed), each (experts * ffn_hidden_size, d_model)."""

    def __init__(self, config) -> None:
        super().__init__()
        shape = (config.n_expert * config.moe_intermediate_size, config.n_embd)
        self.w1, self.v1, self.w2 = (nn.Parameter(torch.empty(shape)) for _ in range(3))
        self.size, self.act = config.moe_intermediate_size, ACTIVATIONS[config.activation]
        self.taps = nn.ModuleList(Tap() for _ in range(config.n_expert))  # latent relevances, ablation

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        part = slice(e * self.size, (e + 1) * self.size)
        return glu_expert(x, self.w1[part], self.v1[part], self.w2[part].t(), self.act, self.taps[e])


class DbrxMoE(nn.Module):
    """DBRX's MoE: :class:`TopKRouter` (``"softmax_topk"``, p-norm ``moe_norm_p`` where
    ``moe_norm_topk``) over :class:`DbrxExperts`."""

    def __init__(self, config) -> None:
        super().__init__()
        self.router = TopKRouter(config, "softmax_topk", config.moe_norm_p if config.moe_norm_topk else None)
        self.experts = DbrxExperts(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.router(flat)
        experts = [functools.partial(self.experts.expert, e) for e in range(self.router.layer.out_features)]
        return routed(experts, flat, chosen, weights).view_as(x)

    def latents(self) -> dict[str, LatentSite]:
        return expert_latents(self.experts.taps, self.experts.size)


class ParallelExperts(nn.Module):
    """Every expert's (out, in) matrix in one (experts, out, in) ``weight`` (JetMoE's ``input_linear``
    and ``output_linear``)."""

    def __init__(self, experts: int, size_in: int, size_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, size_out, size_in))


class JetMoeMoE(nn.Module):
    """JetMoE's MoE: :class:`TopKRouter` (``"topk_softmax"``) over GLU experts whose gate and up
    matrices are the two halves of ``input_linear``, plus a ``bias`` on the sum."""

    def __init__(self, config) -> None:
        super().__init__()
        size = config.moe_intermediate_size or config.intermediate_size
        self.router = TopKRouter(config, "topk_softmax")
        self.input_linear = ParallelExperts(config.n_expert, config.n_embd, 2 * size)
        self.output_linear = ParallelExperts(config.n_expert, size, config.n_embd)
        self.bias = nn.Parameter(torch.zeros(config.n_embd))
        self.act = ACTIVATIONS[config.activation]
        self.taps = nn.ModuleList(Tap() for _ in range(config.n_expert))  # latent relevances, ablation

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.input_linear.weight[e].chunk(2, dim=0)
        return glu_expert(x, gate, up, self.output_linear.weight[e], self.act, self.taps[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.router(flat)
        experts = [functools.partial(self.expert, e) for e in range(self.input_linear.weight.shape[0])]
        return routed(experts, flat, chosen, weights).view_as(x) + self.bias

    def latents(self) -> dict[str, LatentSite]:
        return expert_latents(self.taps, self.output_linear.weight.shape[2])


def build_mlp(config, layer: int | None = None) -> nn.Module:
    """The MLP of ``layer``: a dense GLU where ``moe_layers`` marks a layer of an MoE model dense."""
    sparse = config.mlp in ("moe", "deepseek_moe")
    if sparse and config.moe_layers is not None and layer is not None and not config.moe_layers[layer]:
        return GLU(config)
    return {"mlp": MLP, "glu": GLU, "moe": MoE, "clamped_moe": ClampedMoE, "deepseek_moe": DeepSeekMoE,
            "dbrx_moe": DbrxMoE, "jetmoe_moe": JetMoeMoE}[config.mlp](config)
