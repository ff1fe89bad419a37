"""Components of a model by name, their latent relevances, and zeroing them for one forward.

A component is what a latent relevance is recorded for (:mod:`lucidlm.explain.latent`), named so
that a ranking and an ablation speak the same language:

* ``layers.{i}``: a whole block's two branches (attention and MLP outputs into the residual);
* ``layers.{i}.attn.head.{h}``: one attention head (its slice of ``o_proj``'s input; JetMoE: one
  attention expert's head, numbered as in ``layers.{i}.attn``);
* ``layers.{i}.mlp.neuron.{j}``: one MLP neuron (column j of ``down_proj``'s input); in a
  mixture of experts ``layers.{i}.mlp.expert.{e}.neuron.{j}``.

Zeroing a component zeroes that latent (the block's latent sites, :mod:`lucidlm.model.latents`), so
a component's ablation removes exactly what its latent relevance measures. A shared expert's neurons
(``layers.{i}.shared_mlp``) have no names of their own: they go with their layer.

>>> component_values({"layers.0.attn": torch.tensor([1.0, -2.0]), "layers.0.mlp": torch.tensor([0.5])}, "heads")
{'layers.0.attn.head.0': 1.0, 'layers.0.attn.head.1': -2.0}
>>> parse_component("layers.3.mlp.neuron.117")
Component(layer=3, kind='neuron', index=117, expert=None)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..errors import ExplainError
from ..model.latents import block_latents

#: what :meth:`ExplanationDiff.components` ranks
KINDS = ("layers", "heads", "neurons")

_NAME = re.compile(r"layers\.(?P<layer>\d+)(?:\.attn\.head\.(?P<head>\d+)"
                   r"|\.mlp(?:\.expert\.(?P<expert>\d+))?\.neuron\.(?P<neuron>\d+))?")
_FORMS = "layers.I, layers.I.attn.head.H, layers.I.mlp.neuron.J or layers.I.mlp.expert.E.neuron.J"
_ABLATING: contextvars.ContextVar[object | None] = contextvars.ContextVar("lucidlm_ablating", default=None)


@dataclasses.dataclass(frozen=True)
class Component:
    """One parsed component name (``kind``: ``"layer"``, ``"head"`` or ``"neuron"``)."""

    layer: int
    kind: str
    index: int | None = None
    expert: int | None = None


def parse_component(name: object) -> Component:
    """The component a name stands for; an :class:`ExplainError` naming it when it is not one."""
    match = _NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ExplainError(f"component {name!r}: expected a name of the form {_FORMS}")
    layer = int(match["layer"])
    if match["head"] is not None:
        return Component(layer, "head", int(match["head"]))
    if match["neuron"] is not None:
        return Component(layer, "neuron", int(match["neuron"]), None if match["expert"] is None else int(match["expert"]))
    return Component(layer, "layer")


def component_values(latents: dict[str, torch.Tensor], kind: str) -> dict[str, float]:
    """Per component of ``kind`` (:data:`KINDS`), its value in ``latents`` (the ``Explanation.layers``
    mapping: ``layers.{i}.attn`` per head, ``layers.{i}.mlp`` per neuron); a layer's value is the
    sum of both branches."""
    if kind not in KINDS:
        raise ExplainError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    out: dict[str, float] = {}
    for key, values in latents.items():
        layer, branch = key.rsplit(".", 1)
        if kind == "layers":
            out[layer] = out.get(layer, 0.0) + float(values.double().sum())
        elif kind == "heads" and branch == "attn":
            out.update({f"{key}.head.{h}": float(v) for h, v in enumerate(values.tolist())})
        elif kind == "neurons" and branch == "mlp":
            rows = values.tolist() if values.dim() == 2 else [values.tolist()]
            for e, row in enumerate(rows):
                prefix = f"{key}.expert.{e}" if values.dim() == 2 else key
                out.update({f"{prefix}.neuron.{j}": float(v) for j, v in enumerate(row)})
    return out


# ----------------------------------------------------------------------------- ablation
def _check_fits(model: nn.Module, c: Component, name: str) -> None:
    """An :class:`ExplainError` when ``model`` has no such layer, head, expert or neuron."""
    n_layer = len(model.layers)
    if c.layer >= n_layer:
        raise ExplainError(f"component {name!r}: the model has layers 0 to {n_layer - 1}")
    sites = block_latents(model.layers[c.layer])
    heads, neurons = sites["attn"], sites["mlp"]
    if c.kind == "head" and c.index >= heads.shape()[0]:
        raise ExplainError(f"component {name!r}: layer {c.layer} has heads 0 to {heads.shape()[0] - 1}")
    if c.kind == "neuron":
        if (c.expert is None) == neurons.experts:
            form = "layers.I.mlp.expert.E.neuron.J" if neurons.experts else "layers.I.mlp.neuron.J"
            raise ExplainError(f"component {name!r}: layer {c.layer}'s MLP neurons are named {form}")
        if neurons.experts and c.expert >= len(neurons.modules):
            raise ExplainError(f"component {name!r}: layer {c.layer} has experts 0 to {len(neurons.modules) - 1}")
        if c.index >= neurons.units:
            raise ExplainError(f"component {name!r}: layer {c.layer}'s MLP has neurons 0 to {neurons.units - 1}")


def _targets(model: nn.Module, c: Component) -> list[tuple[nn.Module, slice | int | None]]:
    """(the module whose input holds the component, the part of its last dim; None: all), from the
    block's latent sites (:mod:`lucidlm.model.latents`)."""
    sites = block_latents(model.layers[c.layer])
    if c.kind == "layer":  # both branches whole, shared experts included
        return [(module, None) for site in sites.values() for module in site.modules]
    if c.kind == "head":
        heads = sites["attn"]
        module, head = heads.modules[c.index // heads.units], c.index % heads.units
        return [(module, slice(head * heads.width, (head + 1) * heads.width))]
    return [(sites["mlp"].modules[c.expert or 0], c.index)]


@contextlib.contextmanager
def ablated(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Forwards of this thread/task inside the block run with the named components zeroed (forward
    pre-hooks on the shared model, removed on exit; a forward in another thread is left alone)."""
    zeroed: dict[nn.Module, list] = {}
    for name in names:
        component = parse_component(name)
        _check_fits(model, component, name)
        for module, part in _targets(model, component):
            zeroed.setdefault(module, []).append(part)
    key = object()

    def hook(module, args):
        if _ABLATING.get() is not key:
            return None
        x = args[0].clone()
        for part in zeroed[module]:
            if part is None:
                x.zero_()
            else:
                x[..., part] = 0
        return (x, *args[1:])

    handles = [module.register_forward_pre_hook(hook) for module in zeroed]
    token = _ABLATING.set(key)
    try:
        yield
    finally:
        _ABLATING.reset(token)
        for handle in handles:
            handle.remove()
