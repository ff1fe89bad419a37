"""QLoRA-style fine-tuning: LoRA adapters over frozen int8 base weights.

The frozen linear layers are stored as int8 with one float scale per output channel (symmetric
absmax / 127), a quarter of their float32 size; each forward dequantises the layer it runs. The
LoRA adapters on top stay in full precision and train as usual, so the saved adapter is an
ordinary PEFT adapter. (QLoRA proper quantises to 4-bit NF4 with ``bitsandbytes``, which has no
CPU kernels here; int8 per channel keeps the base within ~0.4% of its float weights.)

>>> import torch
>>> layer = torch.nn.Linear(8, 4)
>>> q = Int8Linear.quantize(layer)
>>> bool((q(torch.ones(1, 8)) - layer(torch.ones(1, 8))).abs().max() < 0.05)
True
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` with int8 weights and per-output-channel scales."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def quantize(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(qweight, scale.to(linear.weight.dtype), linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (what peft reads for the adapter's dtype and device)."""
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_linear(self) -> nn.Linear:
        """A float ``nn.Linear`` with the dequantised weights (for merging an adapter)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.qweight.device, dtype=self.scale.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def quantize_linears(model: nn.Module, names: set[str] | None = None) -> int:
    """Replace the model's ``nn.Linear`` layers (all but ``lm_head``, or those in ``names``) by
    :class:`Int8Linear`, in place; returns how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head" and (names is None or name in names):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, Int8Linear.quantize(module))
            replaced += 1
    return replaced
