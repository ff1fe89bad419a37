"""Weight-only int8: ``nn.Linear`` layers stored as int8 with one scale per output channel.

Symmetric absmax per output channel (``scale = max|w_row| / 127``): a quarter of the float32 bytes,
which is what decoding on a CPU is bound by (every step reads every weight once). Used twice:

* **inference** (:meth:`lucidlm.LLM.quantize`): without gradients a decode step (a few rows, float32
  or bfloat16 activations alike) runs in lucidlm's 8-bit kernel (``q8_gemv``, :func:`q8_linear`),
  which reads the int8 weights directly at the memory roofline; a prompt runs one float GEMM on the
  int8 values and scales its output per channel (``torch._weight_int8pack_mm`` measured 10-80x
  slower for prompts, and slower than float32 for float32 activations);
* **QLoRA-style fine-tuning** (``finetune(..., quantize=True)``): a frozen int8 base under float
  LoRA adapters.

Whenever a gradient is needed (training, explanations) the layer dequantises and runs ``F.linear``:
the LRP rules then act on exactly the dequantised weights the forward used, so an explanation of a
quantised model is exact for that model (dequantise-on-explain).

>>> import torch
>>> layer = torch.nn.Linear(8, 4)
>>> q = Int8Linear.quantize(layer)
>>> bool((q(torch.ones(1, 8)) - layer(torch.ones(1, 8))).abs().max() < 0.05)
True
>>> with torch.no_grad():  # the int8 kernel computes the same product
...     bool(torch.allclose(q(torch.ones(2, 8)), q.to_linear()(torch.ones(2, 8)), atol=1e-5))
True
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .qlinear import check_kernel, q8_linear, wants_grad

_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the scales lucidlm's 8-bit kernel reads


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` with int8 weights and per-output-channel scales."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def quantize(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(qweight, scale.to(linear.weight.dtype), linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (what peft reads for the adapter's dtype and device)."""
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if wants_grad(x, self.scale) or self.scale.dtype not in _SCALE_DTYPES:
            # the LRP rules and autograd see exactly the dequantised weight the kernel uses
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return q8_linear(x, self.qweight, self.scale[:, None], self.bias)

    def to_linear(self) -> nn.Linear:
        """A float ``nn.Linear`` with the dequantised weights (for merging an adapter)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.qweight.device, dtype=self.scale.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def quantize_linears(model: nn.Module, names: set[str] | None = None, lm_head: bool = False) -> int:
    """Replace the model's ``nn.Linear`` layers (all but ``lm_head`` unless ``lm_head=True``, or
    those in ``names``) by :class:`Int8Linear`, in place; returns how many were replaced. A
    quantised ``lm_head`` gets its own int8 copy: the (tied) embedding table stays float."""
    replaced = 0
    for name, module in list(model.named_modules()):
        wanted = name != "lm_head" or lm_head
        if isinstance(module, nn.Linear) and wanted and (names is None or name in names):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, Int8Linear.quantize(module))
            replaced += 1
    if replaced:
        check_kernel()  # a warning now, where decoding would be slow without the kernel
    return replaced


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
