"""Latent relevances: how much relevance passes through each MLP neuron and attention head.

Relevance of a latent tensor z is Σ z · ∂score/∂z, the same gradient × input the explainer uses at
the embeddings. Each block's attention and MLP name their latents (``latents()``, see
:mod:`lucidlm.model.latents`); we record them with forward pre-hooks (registered only when asked,
so a plain explanation pays nothing):

* ``"layers.{i}.attn"``: the concatenated head outputs entering the output projection (``o_proj``;
  MLA's ``o_proj`` over ``v_head_dim`` heads), summed over tokens and each head's dimensions ->
  ``(n_head,)``. JetMoE's mixture of attention heads: every attention expert's heads entering its
  ``output_linear``, over the tokens routed to it -> ``(n_expert * n_query_groups,)``, expert-major.
* ``"layers.{i}.mlp"``: the MLP's neurons after activation and gate, entering ``down_proj``, summed
  over tokens -> ``(intermediate_size,)``; for a mixture of experts ``(n_expert, size)``, each
  expert's neurons over the tokens routed to it (also for stacked experts: gpt-oss, DBRX, JetMoE).
* ``"layers.{i}.shared_mlp"``: the shared expert's neurons of Qwen2-MoE and DeepSeek, where there is
  one -> ``(shared size,)``.

Each is the input of a map that is linear in it (routing weights are constants for LRP), so a
branch's latent relevances sum to exactly what the branch hands to the residual stream through that
map; with a bias-free output projection, to the branch's whole contribution.

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
from ..model.checkpointing import recomputing
from ..model.latents import LatentSite, block_latents

_RECORDING: contextvars.ContextVar[LatentRecorder | None] = contextvars.ContextVar("lucidlm_recording", default=None)


@dataclass
class _Record:
    key: str
    tensor: torch.Tensor  # the recorded activation (part of the autograd graph)
    site: LatentSite
    part: int  # which of the site's modules recorded it (the expert)


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
        try:
            for i in self.indices:
                for suffix, site in block_latents(self.model.layers[i]).items():
                    for e, module in enumerate(site.modules):
                        self._hook(module, f"layers.{i}.{suffix}", site, e)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        _RECORDING.reset(self._token)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, module: nn.Module, key: str, site: LatentSite, part: int) -> None:
        def record(_module, args):
            # a checkpointed block's recompute runs the hook again: its latent was recorded at the forward
            if _RECORDING.get() is self and not recomputing():
                self.records.append(_Record(key, args[0], site, part))

        self._handles.append(module.register_forward_pre_hook(record))

    def tensors(self) -> list[torch.Tensor]:
        """The recorded tensors, in order (to pass to ``torch.autograd.grad``)."""
        return [r.tensor for r in self.records]

    def relevances(self, grads: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Latent relevances (float32, CPU) from the gradients of :meth:`tensors`."""
        out: dict[str, torch.Tensor] = {}
        for i in self.indices:  # every requested key exists, even if no token reached an expert
            for suffix, site in block_latents(self.model.layers[i]).items():
                out[f"layers.{i}.{suffix}"] = torch.zeros(site.shape())
        for r, g in zip(self.records, grads):
            if g is None:
                continue
            site = r.site
            rel = (r.tensor.detach().float() * g.float()).reshape(-1, site.units, site.width).sum((0, 2)).cpu()
            if site.kind == "heads":  # this module's heads: all of them, or expert r.part's
                out[r.key][r.part * site.units:(r.part + 1) * site.units] += rel
            elif site.experts:
                out[r.key][r.part] += rel
            else:
                out[r.key] += rel
        return _whole_model(self.model, out)


def _whole_model(model: nn.Module, relevances: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tensor-parallel model's latent relevances hold this process's heads and neurons: every
    process's, in rank order (the model's own order: each holds one contiguous slice)."""
    from ..model.parallel import gather_units, shard_of

    if shard_of(model) is None:
        return relevances
    return {key: gather_units(value) for key, value in relevances.items()}


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
