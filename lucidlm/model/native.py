"""The native decode step: one C++ call per token for a Llama-family model (``lucidlm/kernels/decode.cpp``).

A decode step of a small model on a CPU spends as much time around its products (norms, RoPE, the
cache write, attention, SwiGLU, residuals: dozens of small PyTorch ops per layer, or Inductor's graph
wrapper) as in them. :func:`plan` checks once that a model is exactly the plain Llama block this
code path computes, and collects its weights; :func:`step` then runs the whole step (every layer, the
final norm and the lm_head) in the ``native_decode`` op, with the products in lucidlm's gemv kernels
reading the weights as they are stored: float32 (:class:`~lucidlm.model.linear.Linear`), int8 per
channel (:class:`~lucidlm.model.quant.Int8Linear`) or GGUF's Q8_0 / Q4_0 / Q4_1 blocks
(:class:`~lucidlm.model.qmodules.QuantLinear`). Results equal the eager step up to float32 summation
order.

Covered: pre-norm RMSNorm blocks (no unit offset), GQA attention with RoPE of any type but
``dynamic`` (cos/sin come from the layer's own :class:`~lucidlm.model.rope.RotaryFrequencies`, the
same as the eager step), optional q/k/v/o biases (Qwen2), a SiLU-gated MLP, tied or untied lm_head;
float32 activations; a dense KV cache in float32 on the CPU. Anything else (LayerNorm, sliding
windows, soft-capping, q/k norms, MoE, LoRA or other hooks, bfloat16, another cache policy) makes
:func:`plan` return a reason instead, and the caller decodes as before.

>>> from lucidlm import Config, GPT
>>> plan(GPT(Config.from_name("tiny-llama")).to(torch.bfloat16)).reason
'activations are torch.bfloat16, not float32'
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..kernels.build import kernel_ready
from .attention import CausalSelfAttention
from .linear import Linear
from .mlp import GLU
from .norm import RMSNorm
from .qmodules import QuantLinear
from .quant import Int8Linear
from .rope import rope_cos_sin

__all__ = ["NativePlan", "plan", "step", "fits"]

_EMPTY = torch.empty(0)
_SCALES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class NativePlan:
    """What the op needs of a model: its weights in the op's order, or why it cannot run it (``reason``)."""

    reason: str = ""
    model: nn.Module | None = None
    weights: list[list[torch.Tensor]] = dataclasses.field(default_factory=list)  # per layer, then the tail
    ints: list[int] = dataclasses.field(default_factory=list)  # layers, heads, groups, head size, dims, interleaved
    floats: list[float] = dataclasses.field(default_factory=list)  # attention scale, the norms' eps

    @property
    def ready(self) -> bool:
        return not self.reason


class _Unsupported(Exception):
    pass


def plan(model: nn.Module) -> NativePlan:
    """The model's :class:`NativePlan`; ``reason`` says why the native step does not apply (then "")."""
    try:
        ready = _plan(model)
    except _Unsupported as exc:
        return NativePlan(reason=str(exc))
    if not kernel_ready() or not hasattr(torch.ops.lucidlm_kernels, "native_decode"):
        return NativePlan(reason="lucidlm's CPU kernels are unavailable")
    if torch.ops.lucidlm_kernels.q8_path() == "vnni":
        return NativePlan(reason="LUCIDLM_VNNI=1: the native step has no VNNI path")
    return ready


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise _Unsupported(reason)


def _plan(model: nn.Module) -> NativePlan:
    from .gpt import GPT, Block

    _require(type(model) is GPT, f"{type(model).__name__} is not lucidlm's GPT")
    c = model.config
    floats = [p for p in model.parameters() if p.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.float32
    _require(dtype == torch.float32, f"activations are {dtype}, not float32")
    _require(all(p.device.type == "cpu" for p in [*model.parameters(), *model.buffers()]), "not on the CPU")
    _require(not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "a module has hooks")
    _require(model.pos_embed is None and c.position_embedding == "rope", "positions are not RoPE")
    _require(not c.scale_embeddings and c.embedding_multiplier == 1.0, "embeddings are scaled")
    _require(c.logit_scale == 1.0 and c.final_logit_softcapping is None, "logits are scaled or soft-capped")
    _require(_plain_rms(model.final_norm), "the final norm is not a plain RMSNorm")
    weights = [_layer(block, Block) for block in model.layers]
    weights.append([model.final_norm.weight.detach(), *_linear(model.lm_head)])
    attn = model.layers[0].attn
    _require(len({block.attn._rope_key for block in model.layers}) == 1, "layers rotate differently")
    dims = attn.rotary.initial.numel() * 2
    ints = [c.n_layer, attn.n_head, attn.n_groups, attn.head_size, dims, int(attn.rope_interleaved)]
    eps = [e for block in model.layers for e in (block.attn_norm.eps, block.mlp_norm.eps)]
    return NativePlan(model=model, weights=weights, ints=ints, floats=[float(attn.scale), *eps, model.final_norm.eps])


def _layer(block: nn.Module, block_class: type) -> list[torch.Tensor]:
    _require(type(block) is block_class, f"{type(block).__name__} is not lucidlm's Block")
    _require(not block.parallel and block.residual_multiplier == 1.0, "parallel or scaled residuals")
    _require(block.post_attn_norm is None and block.post_mlp_norm is None, "sandwich norms")
    _require(_plain_rms(block.attn_norm) and _plain_rms(block.mlp_norm), "block norms are not plain RMSNorm")
    attn, mlp = block.attn, block.mlp
    _require(type(attn) is CausalSelfAttention, f"{type(attn).__name__} is not plain attention")
    _require(attn.qk_norm is None and attn.clip is None and attn.softcap is None and attn.sinks is None,
             "q/k norms, clipping, soft-capping or sinks")
    _require(attn.window is None, "a sliding window")
    _require(attn.use_rope and attn.rotary.rope_type != "dynamic", "no RoPE, or dynamic NTK RoPE")
    _require(attn.head_size == attn.rotary.args[0] and attn.n_head % attn.n_groups == 0, "head sizes differ")
    _require(type(mlp) is GLU and mlp.act is nn.functional.silu, "the MLP is not SwiGLU")
    out = [block.attn_norm.weight.detach()]
    for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
        out += _linear(linear)
    out.append(block.mlp_norm.weight.detach())
    for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        out += _linear(linear)
    return out


def _plain_rms(norm: nn.Module | None) -> bool:
    return type(norm) is RMSNorm and not norm.unit_offset and norm.weight.dtype == torch.float32


def _linear(layer: nn.Module) -> list[torch.Tensor]:
    """The op's 4 slots of a linear layer: weight storage a, b, c and the bias (empty where absent)."""
    bias = getattr(layer, "bias", None)
    bias = _EMPTY if bias is None else bias.detach().float().contiguous()
    if type(layer) in (Linear, nn.Linear) and layer.weight.dtype == torch.float32:
        return [layer.weight.detach().contiguous(), _EMPTY, _EMPTY, bias]
    if type(layer) is Int8Linear and layer.scale.dtype in _SCALES:
        return [layer.qweight.contiguous(), layer.scale[:, None].contiguous(), _EMPTY, bias]
    if type(layer) is QuantLinear and layer.dtype == torch.float32:
        mins = _EMPTY if layer.mins is None else layer.mins.contiguous()
        return [layer.qs.contiguous(), layer.scales.contiguous(), mins, bias]
    raise _Unsupported(f"{type(layer).__name__} weights ({getattr(layer, 'weight', _EMPTY).dtype}) are not "
                       "float32, int8 or GGUF blocks")


def fits(cache, batch: int | None = None) -> bool:
    """Whether ``cache`` is one the op writes into: dense float32 layers on the CPU with fixed shapes
    off, all filled to the same slot, with room for one more token, of ``batch`` rows (default: any)."""
    from ..cache.base import DenseLayerCache

    layers = getattr(cache, "layers", [])
    if not layers or not all(type(layer) is DenseLayerCache for layer in layers):
        return False
    first = layers[0]
    batch = first.k.shape[0] if batch is None else batch
    return all(layer.cursor is None and layer.filled == first.filled and layer.k.dtype == torch.float32
               and layer.v.dtype == torch.float32 and layer.k.device.type == "cpu" and layer.k.is_contiguous()
               and layer.v.is_contiguous() and layer.pos.is_contiguous() and layer.k.shape[0] == batch
               and layer.v.shape[-1] == layer.k.shape[-1] for layer in layers) and first.filled < first.capacity


@torch.no_grad()  # inference only: the op has no backward
def step(native: NativePlan, token: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """Last logits (batch, vocab) for ``token`` (batch, 1) at ``positions`` (batch, 1), appended to
    ``cache`` (the caller checked :func:`fits`): what the eager decode step computes, in one call."""
    model = native.model
    x = model.embed_tokens(token, positions)[:, 0].float().contiguous()
    attn = model.layers[0].attn
    cos, sin = rope_cos_sin(attn.rotary.frequencies(positions), positions, torch.float32, attn.rope_interleaved,
                            attn.rotary.scale_at(positions))
    slot = cache.layers[0].filled
    tensors = []
    for weights, layer in zip(native.weights, cache.layers):
        tensors += weights
        tensors += (layer.k, layer.v, layer.pos)
    tensors += native.weights[-1]
    rows = token.shape[0]
    logits = torch.ops.lucidlm_kernels.native_decode(
        x, tensors, [*native.ints, slot], native.floats, cos.reshape(rows, -1).contiguous(),
        sin.reshape(rows, -1).contiguous(), positions[:, 0].contiguous())
    for layer in cache.layers:
        layer.filled, layer._last = slot + 1, 1
    cache.advance(positions)
    return logits
