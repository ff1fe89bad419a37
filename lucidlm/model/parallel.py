"""Tensor parallelism (Megatron-LM style) with LRP that flows through the all-reduce.

Every process of the group holds a slice of each block: its share of the attention heads (the
queries of its heads, the keys and values of its KV groups) and of the MLP's columns. The rest of
the model (embeddings, norms, ``lm_head``) is replicated. Per block and sub-layer:

* **column-parallel** ``q/k/v_proj`` and ``gate/up_proj`` (:class:`ColumnParallelLinear`): this
  rank's output rows of the weight, so each rank computes its own heads / hidden units;
* **row-parallel** ``o_proj`` and ``down_proj`` (:class:`RowParallelLinear`): this rank's input
  columns; each rank's product is a partial sum of the full output, summed over the ranks.

The two communication points are Megatron's conjugate operators f and g (M. Shoeybi et al.,
"Megatron-LM: Training Multi-Billion Parameter Language Models Using Model Parallelism", 2019,
arXiv:1909.08053, Sec. 3, Fig. 3), each an autograd function:

* f, :class:`CopyToParallel`, at the sub-layer's input (once, shared by q, k and v, or by gate and
  up): identity forward, all-reduce backward;
* g, :class:`ReduceFromParallel`, at the row-parallel output: all-reduce forward, identity backward.

**LRP.** Explanations run in gradient × input form (:mod:`lucidlm.model.rules`): a relevance is a
value times its gradient. g's forward is a sum z = Σ_r z_r; LRP's rule for a sum hands each summand
R_{z_r} = z_r · ∂s/∂z (the z-rule with z_r / z as the share, Montavon et al., "Layer-wise Relevance
Propagation: an overview", 2019, Eq. 1), which is exactly what the identity backward gives: no
relevance is created or lost in the reduce. f copies x to every rank; each copy receives relevance
x · ∂s/∂x_r and the all-reduce backward sums them, R_x = Σ_r R_{x_r}: the relevance of a copied value
is the sum of its copies'. Every other rule acts inside a rank on its own heads and columns (a
head's softmax, the uniform rule on its q·kᵀ, a hidden unit's gate), so the relevance at the
(replicated) embeddings is the one process's, up to float32 summation order, on every rank.

Supported: the blocks of llama-like families (:class:`~lucidlm.model.attention.CausalSelfAttention`
with a GLU or plain MLP: Llama, Qwen2/3, Mistral, Gemma 1/2/3, Phi-3, GPT-2, NeoX ...). MoE, MLA,
mixture-of-attention, custom attention/MLP/block classes and query/key norms over all heads raise
:class:`~lucidlm.errors.ParallelError` naming what is unsupported.

>>> from lucidlm import Config, GPT
>>> model = GPT(Config.from_name("tiny-llama"))
>>> shard_model(model, rank=0, size=1) is model       # one process: the whole model, unchanged
True
>>> check_divisible(model.config, 3)                  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
lucidlm.errors.ParallelError: tensor_parallel over 3 processes: n_head=4 is not a multiple of 3 ...

Under ``torchrun`` (``LLM.load(..., tensor_parallel=True)`` calls this through
:func:`lucidlm.distributed.tensor_parallel`)::

    torchrun --nproc-per-node 2 -m lucidlm explain "The capital of France is" --model DIR --tensor-parallel
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import Config
from ..errors import ParallelError
from .attention import CausalSelfAttention
from .linear import Linear, linear
from .mlp import GLU, MLP

#: qk norms that act on one head at a time with weights shared by every head (shardable as they are)
_PER_HEAD_NORMS = (None, "head", "layernorm_head")


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's slice of a tensor-parallel model: its ``rank`` among ``size`` processes and the
    whole model's config (``model.config`` describes the slice: its heads, groups and columns)."""

    rank: int
    size: int
    full_config: Config

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    x = x.contiguous().clone()
    dist.all_reduce(x)
    return x


def _all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


class CopyToParallel(torch.autograd.Function):
    """Megatron's f (Shoeybi et al. 2019, Sec. 3, Fig. 3a): the input of a column-parallel layer,
    used by every rank. Forward: identity. Backward: the gradients of the ranks' copies summed
    (all-reduce), so x · grad_x = Σ_r x · grad_{x_r}: the copies' relevances add up."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad)


class ReduceFromParallel(torch.autograd.Function):
    """Megatron's g (Shoeybi et al. 2019, Sec. 3, Fig. 3a): the output of a row-parallel layer.
    Forward: the ranks' partial sums added (all-reduce). Backward: identity, so each partial sum
    z_r receives the relevance z_r · grad_z (LRP's rule for a sum, Montavon et al. 2019, Eq. 1):
    relevance passes through the all-reduce unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


def copy_to_parallel(x: torch.Tensor) -> torch.Tensor:
    """f: identity forward, all-reduce backward (:class:`CopyToParallel`)."""
    return CopyToParallel.apply(x)


def reduce_from_parallel(x: torch.Tensor) -> torch.Tensor:
    """g: all-reduce forward, identity backward (:class:`ReduceFromParallel`)."""
    return ReduceFromParallel.apply(x) if torch.is_grad_enabled() else _all_reduce(x)


def gather_groups(x: torch.Tensor) -> torch.Tensor:
    """Every rank's KV groups of a per-group tensor (batch, groups, ...), in rank order: what a
    cache policy that averages over the groups sees, so every rank keeps the same tokens."""
    return _all_gather(x.detach(), dim=1)


def gather_units(x: torch.Tensor) -> torch.Tensor:
    """Every rank's slice of a per-head or per-neuron tensor (units, ...), in rank order: the whole
    model's units (each rank holds a contiguous slice)."""
    return _all_gather(x.detach(), dim=0)


class ColumnParallelLinear(Linear):
    """This rank's output rows of ``layer`` (and of its bias): rows ``rows`` of the weight."""

    @classmethod
    def from_linear(cls, layer: nn.Linear, rows: slice) -> ColumnParallelLinear:
        new = cls(layer.in_features, rows.stop - rows.start, bias=layer.bias is not None,
                  device="meta", dtype=layer.weight.dtype)
        new.weight = nn.Parameter(layer.weight.detach()[rows].clone(), requires_grad=layer.weight.requires_grad)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.detach()[rows].clone(), requires_grad=layer.bias.requires_grad)
        return new


class RowParallelLinear(Linear):
    """This rank's input columns ``columns`` of ``layer``; the partial products are summed over the
    ranks (g, :func:`reduce_from_parallel`) and the bias, whole on every rank, added once after."""

    @classmethod
    def from_linear(cls, layer: nn.Linear, columns: slice) -> RowParallelLinear:
        new = cls(columns.stop - columns.start, layer.out_features, bias=layer.bias is not None,
                  device="meta", dtype=layer.weight.dtype)
        new.weight = nn.Parameter(layer.weight.detach()[:, columns].clone(), requires_grad=layer.weight.requires_grad)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = reduce_from_parallel(linear(x, self.weight))
        return out if self.bias is None else out + self.bias


def check_divisible(config: Config, size: int) -> None:
    """A :class:`~lucidlm.errors.ParallelError` unless ``size`` divides the heads, the KV groups and
    the MLP's hidden size (each process holds an equal share of each)."""
    for name in ("n_head", "n_query_groups", "intermediate_size"):
        value = getattr(config, name)
        if value % size:
            raise ParallelError(
                f"tensor_parallel over {size} processes: {name}={value} is not a multiple of {size} (each process "
                f"holds an equal share); use a world size that divides n_head={config.n_head}, "
                f"n_query_groups={config.n_query_groups} and intermediate_size={config.intermediate_size}")


def check_supported(model: nn.Module) -> None:
    """A :class:`~lucidlm.errors.ParallelError` naming the first part of ``model`` that this module
    cannot shard (see the module docstring)."""
    c = model.config
    if c.attention_class is not None or c.mlp_class is not None or c.block_class is not None:
        raise ParallelError(f"tensor_parallel: {c.name or 'this model'} uses a custom attention, MLP or block "
                            "class; only lucidlm's own llama-like blocks are sharded")
    if c.qk_norm not in _PER_HEAD_NORMS:
        raise ParallelError(f"tensor_parallel: qk_norm={c.qk_norm!r} normalises over all heads or holds per-head "
                            f"weights; supported: {', '.join(repr(n) for n in _PER_HEAD_NORMS)}")
    for i, block in enumerate(model.layers):
        if type(block.attn) is not CausalSelfAttention:
            raise ParallelError(f"tensor_parallel: layer {i}'s attention is {type(block.attn).__name__} (MLA and "
                                "mixture-of-attention are not sharded); supported: CausalSelfAttention")
        if type(block.mlp) not in (GLU, MLP):
            raise ParallelError(f"tensor_parallel: layer {i}'s MLP is {type(block.mlp).__name__} (mixtures of "
                                "experts are not sharded); supported: GLU, MLP")
        linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
        if any(type(m) is not Linear for m in linears):
            raise ParallelError(f"tensor_parallel: layer {i} holds quantised or adapter-wrapped linears; shard the "
                                "float model before quantising or attaching adapters")


def shard_model(model: nn.Module, rank: int, size: int) -> nn.Module:
    """Keep only process ``rank``'s share of every block of ``model`` (in place; returns it), for
    ``size`` processes of the default ``torch.distributed`` group. ``size == 1``: unchanged."""
    if size == 1:
        return model
    check_supported(model)
    full = model.config
    check_divisible(full, size)
    for block in model.layers:
        _shard_attention(block.attn, rank, size)
        _shard_mlp(block.mlp, rank, size)
    model.config = dataclasses.replace(full, n_head=full.n_head // size, n_query_groups=full.n_query_groups // size,
                                       intermediate_size=full.intermediate_size // size)
    model.tensor_parallel = Shard(rank, size, full)
    return model


def shard_of(model: nn.Module) -> Shard | None:
    """The :class:`Shard` of a model :func:`shard_model` sharded, else None."""
    return getattr(model, "tensor_parallel", None)


def _part(total: int, rank: int, size: int, unit: int = 1) -> slice:
    share = total // size
    return slice(rank * share * unit, (rank + 1) * share * unit)


def _shard_attention(attn: CausalSelfAttention, rank: int, size: int) -> None:
    heads, groups = _part(attn.n_head, rank, size), _part(attn.n_groups, rank, size)
    h = attn.head_size
    attn.q_proj = ColumnParallelLinear.from_linear(attn.q_proj, _part(attn.n_head, rank, size, h))
    attn.k_proj = ColumnParallelLinear.from_linear(attn.k_proj, _part(attn.n_groups, rank, size, h))
    attn.v_proj = ColumnParallelLinear.from_linear(attn.v_proj, _part(attn.n_groups, rank, size, h))
    attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, _part(attn.n_head, rank, size, h))
    if attn.sinks is not None:
        attn.sinks = nn.Parameter(attn.sinks.detach()[heads].clone(), requires_grad=attn.sinks.requires_grad)
    attn.n_head, attn.n_groups = heads.stop - heads.start, groups.stop - groups.start
    attn.register_forward_pre_hook(_attention_input)


def _shard_mlp(mlp: GLU | MLP, rank: int, size: int) -> None:
    columns = _part(mlp.down_proj.in_features, rank, size)
    if isinstance(mlp, GLU):
        mlp.gate_proj = ColumnParallelLinear.from_linear(mlp.gate_proj, columns)
    mlp.up_proj = ColumnParallelLinear.from_linear(mlp.up_proj, columns)
    mlp.down_proj = RowParallelLinear.from_linear(mlp.down_proj, columns)
    mlp.register_forward_pre_hook(_mlp_input)


def _attention_input(module: nn.Module, args: tuple) -> tuple:
    """f once at the attention's input (shared by q, k and v); the layer's cache, if any, observes
    every rank's groups (:func:`gather_groups`)."""
    x, *rest = args
    if len(rest) > 1 and hasattr(rest[1], "gather_groups"):  # a policy that decides on the groups' mean
        rest[1].gather_groups = gather_groups
    return (_copy_if_grad(x), *rest)


def _mlp_input(module: nn.Module, args: tuple) -> tuple:
    """f once at the MLP's input (shared by gate and up)."""
    x, *rest = args
    return (_copy_if_grad(x), *rest)


def _copy_if_grad(x: torch.Tensor) -> torch.Tensor:
    return copy_to_parallel(x) if torch.is_grad_enabled() and x.requires_grad else x
