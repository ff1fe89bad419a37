"""Where a branch's latents are: the per-head and per-neuron tensors latent relevances are measured on.

Every attention and MLP module names its latents with one method, ``latents() -> {suffix: LatentSite}``;
:mod:`lucidlm.explain.latent` records them and :mod:`lucidlm.explain.components` zeroes parts of them,
with no knowledge of module names or families. A site is the *input* of a map that is linear in it
up to routing weights (constants for LRP): an output projection (``o_proj``), a ``down_proj``, or a
:class:`Tap` placed where stacked experts compute that product without a module of their own. So
the relevance of a site's latent, Σ z · ∂score/∂z, is exactly what the branch hands on through that
map (minus what reaches the map's bias, as everywhere).

The suffixes: ``"attn"`` (heads), ``"mlp"`` (neurons; one row per routed expert), and
``"shared_mlp"`` (the always-on shared experts of Qwen2-MoE and DeepSeek, neurons), so that a
branch's sites together hold all of it.

>>> import torch
>>> from lucidlm import Config, GPT
>>> block = GPT(Config.from_name("tiny-llama")).layers[0]
>>> site = block_latents(block)["layers.0.attn".split(".")[-1]]
>>> site.kind, site.units, site.width, site.experts, type(site.modules[0]).__name__
('heads', 4, 16, False, 'Linear')
>>> Tap()(torch.ones(2)).tolist()
[1.0, 1.0]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ExplainError


@dataclass(frozen=True)
class LatentSite:
    """One branch's latent: the first forward argument of each of ``modules`` (one, or one per expert),
    shaped (..., ``units * width``). ``kind``: ``"heads"`` (``width`` = a head's size; with experts the
    heads are numbered expert-major, head ``e * units + h`` is expert ``e``'s head ``h``) or
    ``"neurons"`` (``width`` 1; with experts one row of ``units`` per expert)."""

    modules: tuple[nn.Module, ...]
    units: int
    kind: str = "neurons"
    width: int = 1
    experts: bool = False

    def shape(self) -> tuple[int, ...]:
        """The shape of the site's relevance: (heads,), (neurons,) or (experts, neurons).

        >>> LatentSite((nn.Identity(),) * 3, units=2, kind="heads", width=5, experts=True).shape()
        (6,)
        """
        if self.kind == "heads":
            return (len(self.modules) * self.units,)
        return (len(self.modules), self.units) if self.experts else (self.units,)


class Tap(nn.Module):
    """The identity: a latent computed from stacked expert matrices (gpt-oss, DBRX, JetMoE) passes
    through one of these, so that hooks find it as they find the input of an ``o_proj``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def heads_of(output: nn.Module, n_head: int) -> LatentSite:
    """The heads entering the output projection ``output`` (a linear map of ``n_head`` heads)."""
    return LatentSite((output,), n_head, "heads", output.in_features // n_head)


def neurons_of(down: nn.Module) -> LatentSite:
    """The neurons entering ``down`` (a linear map)."""
    return LatentSite((down,), down.in_features)


def block_latents(block: nn.Module) -> dict[str, LatentSite]:
    """Suffix -> site for a block's attention (``block.attn``) and MLP (``block.mlp``); an
    :class:`~lucidlm.errors.ExplainError` naming a module that declares no ``latents()``."""
    out: dict[str, LatentSite] = {}
    for part in ("attn", "mlp"):
        module = getattr(block, part)
        if not callable(getattr(module, "latents", None)):
            raise ExplainError(f"{type(module).__name__} (a block's {part}) declares no latents(): latent "
                               "relevances need it to name the tensors of its heads or neurons "
                               "(see lucidlm.model.latents)")
        out.update(module.latents())
    return out
