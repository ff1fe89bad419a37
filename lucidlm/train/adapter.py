"""LLaMA-Adapter and LLaMA-Adapter V2, as LitGPT 0.5.13 defines them (``litgpt/adapter.py``,
``litgpt/adapter_v2.py``), injected into an existing lucidlm model.

**Adapter** (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with
Zero-init Attention", arXiv:2303.16199): every layer from ``start_layer`` on gets a learned prefix
``adapter_wte`` (``prompt_length`` x ``n_embd``) and a zero-initialised gate per head,
``gating_factor``. The prefix goes through the layer's own q/k/v projections (no RoPE, no q/k norm);
every query attends over the whole prefix (no mask, the layer's scale and soft-capping, grouped
heads as the main attention), and ``gating_factor * ay`` is added to the attention output before
the output projection. The prefix's keys and values are read from the fused q/k/v output exactly as
LitGPT 0.5.13 reads them: with its *interleaved* layout (per query group: that group's query heads,
one key head, one value head), although its fused ``qkv`` weight has been concatenated ([Q; K; V])
since 0.5. The prefix's "keys" are therefore a fixed mix of query/key/value rows; it is as learnable
as the paper's, and it is what LitGPT computes, so adapters trained on either side agree.

**AdapterV2** (Gao et al. 2023, arXiv:2304.15010) adds, on every linear layer LitGPT wraps in
``AdapterV2Linear`` (attention q/k/v and output, every MLP/MoE linear and router, ``lm_head``), a
bias and a scale: ``adapter_scale * (W x + b + adapter_bias)``; and trains the pre-norms and the
final norm.

Both are injected by changing the class of the existing modules to a subclass (no new module
names): the base weights keep their names, state dicts and kernels.

LRP: the prefix attention uses the same rules as the main attention (the uniform rule on q·kᵀ and
A·V for AttnLRP, a constant softmax for CP-LRP, through :func:`~lucidlm.model.kernels.explicit_attention`);
the gate is a parameter, so ``gate * ay`` is linear in ``ay`` (no uniform rule: one factor depends on
the input). V2's ``scale * (W x + b + adapter_bias)`` is linear. Relevance that reaches the prefix
or ``adapter_bias`` stays there, as relevance reaching a bias does.

>>> import torch
>>> from lucidlm import Config, GPT
>>> model = GPT(Config.from_name("tiny-llama"))
>>> attach_adapter(model, "adapter_v2", prompt_length=4, start_layer=1)
>>> adapter_version(model), adapter_settings(model)
('adapter_v2', (4, 1))
>>> sorted(n for n, p in model.named_parameters() if p.requires_grad)[:3]
['final_norm.weight', 'layers.0.attn.k_proj.adapter_bias', 'layers.0.attn.k_proj.adapter_scale']
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..errors import AdapterError
from ..model import rules
from ..model.attention import CausalSelfAttention
from ..model.kernels import explicit_attention
from ..model.linear import Linear
from .names import ADAPTER_METHODS

#: the norms AdapterV2 trains (LitGPT's ``norm_1``, ``norm_2``, ``ln_f``)
V2_NORMS = ("attn_norm", "mlp_norm", "final_norm")


# ----------------------------------------------------------------------------- the modules
class PrefixAttention(CausalSelfAttention):
    """Mixed into an attention class: attention over the learned prefix, gated, added to the
    output of :meth:`attend` (before the output projection)."""

    adapter_wte: nn.Embedding
    gating_factor: nn.Parameter  # (1, 1, heads, 1), LitGPT's shape
    _adapter_base: type = CausalSelfAttention  # the class the module had before

    def attend(self, q, k, v, q_pos, k_pos, *args, **kwargs):
        out, scores = super().attend(q, k, v, q_pos, k_pos, *args, **kwargs)
        return out + self.prefix_attention(q), scores

    def prefix_attention(self, q: torch.Tensor) -> torch.Tensor:
        """``gating_factor * softmax(q akᵀ) av`` (batch, heads, tokens, head_size) for the queries
        ``q`` (batch, heads, tokens, head_size) the main attention used."""
        ak, av = self.prefix_keys_values()
        ay, _ = explicit_attention(rules.bilinear(q), rules.bilinear(ak.to(q.dtype)), av.to(q.dtype), None,
                                   self.scale, self.softcap)
        gate = self.gating_factor.transpose(1, 2).to(ay.dtype)  # (1, heads, 1, 1)
        if rules.current() is not None:  # a weight, never an input: ay keeps all of its relevance
            gate = gate.detach()
        return rules.product(gate, rules.bilinear(ay))

    def prefix_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix's keys and values, (1, groups, prompt_length, head_size) each, read from the
        fused [Q; K; V] projection with LitGPT's interleaved view (see the module docstring)."""
        prefix = self.adapter_wte.weight[None]  # (1, aT, n_embd)
        length = prefix.shape[1]
        fused = torch.cat(self.project_qkv(prefix), dim=-1)
        per_group = self.n_head // self.n_groups
        fused = fused.view(1, length, self.n_groups, per_group + 2, self.head_size).permute(0, 2, 3, 1, 4)
        return fused[:, :, per_group], fused[:, :, per_group + 1]


class AdapterV2Linear(Linear):
    """``adapter_scale * (W x + b + adapter_bias)`` on lucidlm's :class:`~lucidlm.model.linear.Linear`."""

    adapter_bias: nn.Parameter
    adapter_scale: nn.Parameter
    _adapter_base: type = Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_scale * (super().forward(x) + self.adapter_bias)


def _subclass(cls: type, mixin: type, base: type) -> type:
    """``mixin`` over ``cls``: the mixin itself when ``cls`` is exactly ``base``, else a subclass of both
    (a custom attention derived from ours keeps its own behaviour)."""
    if cls is base or issubclass(cls, mixin):
        return mixin if cls is base else cls
    return type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {"__module__": cls.__module__, "_adapter_base": cls})


# ----------------------------------------------------------------------------- attach / inspect
def attach_adapter(model: nn.Module, version: str = "adapter", prompt_length: int = 10, start_layer: int = 2) -> None:
    """Add a zero-effect adapter (gates zero, V2 biases zero and scales one) to ``model`` in place
    and mark only its parameters trainable (:func:`mark_trainable`).

    ``version``: ``"adapter"`` or ``"adapter_v2"``; ``prompt_length``: prefix tokens per layer;
    ``start_layer``: the first layer with a prefix (LitGPT's ``adapter_prompt_length`` and
    ``adapter_start_layer``)."""
    if version not in ADAPTER_METHODS:
        raise AdapterError(f"version={version!r}: expected one of {', '.join(ADAPTER_METHODS)}")
    if has_adapter(model):
        raise AdapterError(f"the model already has an adapter ({adapter_version(model)})")
    n_layer = len(model.layers)
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 1:
        raise AdapterError(f"adapter_prompt_length={prompt_length!r}: expected a positive integer")
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < n_layer:
        raise AdapterError(f"adapter_start_layer={start_layer!r}: expected an integer in [0, {n_layer}) "
                           f"(the model has {n_layer} layers)")
    for i in range(start_layer, n_layer):
        _add_prefix(model.layers[i].attn, prompt_length, f"layers.{i}.attn")
    if version == "adapter_v2":
        for name, module in list(v2_targets(model)):
            _add_scale_bias(module, name)
    mark_trainable(model)


def _add_prefix(attn: nn.Module, prompt_length: int, name: str) -> None:
    if not isinstance(attn, CausalSelfAttention):
        raise AdapterError(f"{name}: {type(attn).__name__} is not derived from lucidlm's CausalSelfAttention, "
                           "so LLaMA-Adapter's prefix cannot be attached to it")
    if not attn.per_head_qkv:  # MLA expands keys from a shared latent; MoA's queries come from experts
        raise AdapterError(f"{name}: LLaMA-Adapter sends its prefix through the attention's query, key and value "
                           f"projections (LitGPT's fused qkv), which {type(attn).__name__} does not have; "
                           "fine-tune this model with method='lora'")
    weight = attn.q_proj.weight
    attn.__class__ = _subclass(type(attn), PrefixAttention, CausalSelfAttention)
    attn.adapter_wte = nn.Embedding(prompt_length, weight.shape[1], device=weight.device, dtype=weight.dtype)
    attn.gating_factor = nn.Parameter(torch.zeros(1, 1, attn.n_head, 1, device=weight.device, dtype=weight.dtype))


def _add_scale_bias(linear: nn.Module, name: str) -> None:
    if not isinstance(linear, nn.Linear):
        raise AdapterError(f"{name}: {type(linear).__name__} is not a float nn.Linear (an int8 model?): "
                           "AdapterV2 needs float linear layers")
    weight = linear.weight
    linear.__class__ = _subclass(type(linear), AdapterV2Linear, Linear)
    linear.adapter_bias = nn.Parameter(torch.zeros(linear.out_features, device=weight.device, dtype=weight.dtype))
    linear.adapter_scale = nn.Parameter(torch.ones(linear.out_features, device=weight.device, dtype=weight.dtype))


def v2_targets(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The layers AdapterV2 adapts (LitGPT's ``AdapterV2Linear``): every linear layer of attention
    and MLP (experts and router included) and ``lm_head``."""
    for i, block in enumerate(model.layers):
        for part in ("attn", "mlp"):
            for name, module in getattr(block, part).named_modules():
                if isinstance(module, nn.Linear) or type(module).__name__ == "Int8Linear":
                    yield f"layers.{i}.{part}.{name}", module
    yield "lm_head", model.lm_head


def prefix_layers(model: nn.Module) -> dict[int, PrefixAttention]:
    """Layer index -> its attention, for the layers with a prefix."""
    return {i: block.attn for i, block in enumerate(getattr(model, "layers", ()))
            if isinstance(block.attn, PrefixAttention)}


def has_adapter(model: nn.Module) -> bool:
    """Whether ``model`` carries a LLaMA-Adapter (either version)."""
    return adapter_version(model) is not None


def adapter_version(model: nn.Module) -> str | None:
    """``"adapter"``, ``"adapter_v2"`` or ``None``."""
    if any(isinstance(m, AdapterV2Linear) for m in model.modules()):
        return "adapter_v2"
    return "adapter" if prefix_layers(model) else None


def adapter_settings(model: nn.Module) -> tuple[int, int]:
    """``(prompt_length, start_layer)`` of the attached adapter."""
    layers = prefix_layers(model)
    if not layers:
        raise AdapterError("the model has no LLaMA-Adapter prefix")
    first = min(layers)
    return layers[first].adapter_wte.num_embeddings, first


def is_adapter_parameter(name: str, version: str) -> bool:
    """LitGPT's ``adapter_filter`` on our names: the prefix and gates; for V2 also the linear
    layers' bias and scale and the norms it trains."""
    leaf = name.rsplit(".", 1)[-1]
    if "adapter_wte" in name or leaf == "gating_factor":
        return True
    if version != "adapter_v2":
        return False
    return leaf in ("adapter_bias", "adapter_scale") or any(
        name.startswith(n + ".") or f".{n}." in name for n in V2_NORMS)


def mark_trainable(model: nn.Module) -> None:
    """Only the adapter's parameters train (LitGPT's ``mark_only_adapter(_v2)_as_trainable``)."""
    version = adapter_version(model)
    if version is None:
        raise AdapterError("the model has no adapter")
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_parameter(name, version))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our names -> the adapter's tensors (what a LitGPT adapter file holds)."""
    version = adapter_version(model)
    if version is None:
        raise AdapterError("the model has no adapter")
    return {n: p for n, p in model.named_parameters() if is_adapter_parameter(n, version)}


# ----------------------------------------------------------------------------- merge
def merge_adapter(model: nn.Module) -> list[str]:
    """Fold AdapterV2's scale and bias into the linear weights where that is exact
    (``W' = diag(s) W``, ``b' = s (b + adapter_bias)``): a layer without a bias of its own keeps its
    adapter unless ``adapter_bias`` is zero, and a ``lm_head`` tied to the embeddings unless its scale
    is one. The prefix attention cannot be merged (it attends to extra learned keys and values):
    it stays attached. Returns the names of the layers left unmerged (the prefix layers included).

    >>> from lucidlm import Config, GPT
    >>> model = GPT(Config.from_name("tiny-llama"))
    >>> attach_adapter(model, "adapter_v2", prompt_length=2, start_layer=1)
    >>> merge_adapter(model)
    ['layers.1.attn (prefix)']
    """
    left = []
    tied = getattr(model.config, "tie_embeddings", False)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterV2Linear)]:
        if not _fold(module, tied and name == "lm_head"):
            left.append(name)
    left.extend(f"layers.{i}.attn (prefix)" for i in prefix_layers(model))
    return left


def refuse_unmergeable(model: nn.Module, action: str) -> None:
    """AdapterError when ``model`` carries a LLaMA-Adapter: ``action`` (save, merge) would need its
    prefix folded into the weights, which cannot be done."""
    version = adapter_version(model)
    if version is not None:
        raise AdapterError(f"cannot {action} a model with a LLaMA-Adapter ({version}): its prefix attention cannot be "
                           "merged into the weights; keep the adapter folder and load it onto the base "
                           "(LLM.load(base, adapter=DIR))")


def _fold(module: AdapterV2Linear, tied: bool) -> bool:
    scale, bias = module.adapter_scale.detach(), module.adapter_bias.detach()
    if (module.bias is None and bool(bias.any())) or (tied and not bool((scale == 1).all())):
        return False
    with torch.no_grad():
        module.weight.mul_(scale[:, None].to(module.weight.dtype))
        if module.bias is not None:
            module.bias.copy_(scale * (module.bias + bias))
    del module.adapter_scale, module.adapter_bias
    module.__class__ = module._adapter_base
    return True


__all__ = ["AdapterV2Linear", "PrefixAttention", "adapter_settings", "adapter_state", "adapter_version",
           "attach_adapter", "has_adapter", "is_adapter_parameter", "mark_trainable", "merge_adapter",
           "prefix_layers", "refuse_unmergeable", "v2_targets"]
