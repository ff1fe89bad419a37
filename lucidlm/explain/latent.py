"""Latent relevances: how much relevance passes through each MLP neuron and attention head.

Relevance of a latent tensor z is Σ z · ∂score/∂z, the same gradient × input the explainer uses at
the embeddings. We record two tensors per layer with forward pre-hooks (registered only when asked,
so a plain explanation pays nothing):

* ``"layers.{i}.mlp"``: the input of ``down_proj`` (the MLP's neurons after activation and gate),
  summed over tokens -> ``(intermediate_size,)``; for a mixture of experts
  ``(n_expert, intermediate_size)``, each expert's neurons over the tokens routed to it.
* ``"layers.{i}.attn"``: the input of ``o_proj`` (the concatenated head outputs), summed over tokens
  and each head's dimensions -> ``(n_head,)``.

Both are inputs of bias-free linear maps in most families, so their relevance is exactly what the
branch hands to the residual stream (through ``down_proj``/``o_proj``).

>>> import torch
>>> from lucidlm import Config, GPT
>>> from lucidlm.explain.explainer import explain
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> e = explain(model, None, [1, 5, 7], target=2, layers=[0])
>>> sorted(e.layers)
['layers.0.attn', 'layers.0.mlp']
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ExplainError

_RECORDING: contextvars.ContextVar[LatentRecorder | None] = contextvars.ContextVar("lucidlm_recording", default=None)


@dataclass
class _Record:
    key: str
    tensor: torch.Tensor  # the recorded activation (part of the autograd graph)
    heads: int = 0  # > 0: attention, reduce to one value per head
    expert: int | None = None  # MoE expert index
    n_expert: int = 0


class LatentRecorder:
    """Context manager: records the latent tensors of the selected layers during one forward.

    ``layers``: ``None`` (record nothing), ``"all"``, or layer indices (negative count from the end).
    """

    def __init__(self, model: nn.Module, layers: str | Sequence[int] | None) -> None:
        self.model = model
        self.indices = select_layers(len(model.layers), layers)
        self.records: list[_Record] = []
        self._handles: list = []

    def __enter__(self) -> LatentRecorder:
        # the hooks sit on the shared model: they record only forwards of the context (thread or
        # task) that entered this recorder, never a generation running beside it in another thread
        self._token = _RECORDING.set(self)
        for i in self.indices:
            block = self.model.layers[i]
            heads = block.attn.n_head
            self._hook(block.attn.o_proj, f"layers.{i}.attn", heads=heads)
            experts = getattr(block.mlp, "experts", None)
            if experts is None:
                self._hook(block.mlp.down_proj, f"layers.{i}.mlp")
            else:
                for e, expert in enumerate(experts):
                    self._hook(expert.down_proj, f"layers.{i}.mlp", expert=e, n_expert=len(experts))
        return self

    def __exit__(self, *exc) -> None:
        _RECORDING.reset(self._token)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, module: nn.Module, key: str, **kw) -> None:
        def record(_module, args):
            if _RECORDING.get() is self:
                self.records.append(_Record(key, args[0], **kw))

        self._handles.append(module.register_forward_pre_hook(record))

    def tensors(self) -> list[torch.Tensor]:
        """The recorded tensors, in order (to pass to ``torch.autograd.grad``)."""
        return [r.tensor for r in self.records]

    def relevances(self, grads: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Latent relevances (float32, CPU) from the gradients of :meth:`tensors`."""
        out: dict[str, torch.Tensor] = {}
        for i in self.indices:  # every requested key exists, even if no token reached an expert
            block = self.model.layers[i]
            experts = getattr(block.mlp, "experts", None)
            size = (experts[0] if experts is not None else block.mlp).down_proj.in_features
            out[f"layers.{i}.attn"] = torch.zeros(block.attn.n_head)
            out[f"layers.{i}.mlp"] = torch.zeros((len(experts), size) if experts is not None else size)
        for r, g in zip(self.records, grads):
            if g is None:
                continue
            rel = r.tensor.detach().float() * g.float()
            if r.heads:  # (..., heads * head_size) -> (heads,)
                value = rel.reshape(-1, r.heads, rel.shape[-1] // r.heads).sum((0, 2))
                out[r.key] += value.cpu()
            elif r.expert is not None:
                out[r.key][r.expert] += rel.reshape(-1, rel.shape[-1]).sum(0).cpu()
            else:
                out[r.key] += rel.reshape(-1, rel.shape[-1]).sum(0).cpu()
        return out


def select_layers(n_layer: int, layers: str | Sequence[int] | None) -> list[int]:
    """Normalise ``layers`` to sorted unique indices in ``range(n_layer)``.

    >>> select_layers(4, "all"), select_layers(4, [-1, 0]), select_layers(4, None)
    ([0, 1, 2, 3], [0, 3], [])
    """
    if layers is None:
        return []
    if isinstance(layers, str):
        if layers != "all":
            raise ExplainError(f"layers={layers!r}: expected None, 'all' or a list of layer indices")
        return list(range(n_layer))
    if isinstance(layers, int):
        layers = [layers]
    out = set()
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not -n_layer <= i < n_layer:
            raise ExplainError(f"layers: {i!r} is not a layer index of this {n_layer}-layer model")
        out.add(i % n_layer)
    return sorted(out)
