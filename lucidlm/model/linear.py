"""``Linear``: ``nn.Linear`` whose decode-step products run in lucidlm's CPU kernel (``lucidlm/kernels/gemv.cpp``).

A decode step multiplies one row of activations by every weight matrix once: it is bound by memory
bandwidth, and PyTorch's CPU ``F.linear`` reaches about half of it for one row (measured on SmolLM2's
shapes with 2 threads: 54 ms for all float32 weights against 31 ms for the kernel, 25 against 11 ms
in bfloat16; ``scripts/gemv_bench.py``). The kernel streams each thread's block of weight rows and
accumulates dot products in float32.

It is used only where it is a drop-in: no gradient wanted (inference; explanations and training
always run ``F.linear``, so the LRP rules never see it), a CPU tensor, float32 or bfloat16, and one
row (one token of one sequence; prefill and batched decode are GEMMs, where PyTorch is faster).
Results equal ``F.linear`` up to float32 summation order.

The kernel is built and loaded by :mod:`lucidlm.kernels.build` (once per machine, into the cache);
where it cannot be (no C++ compiler, a failed build: a :class:`KernelUnavailable` warning says why,
or ``LUCIDLM_KERNELS=0``), every product runs in ``F.linear``: same results, slower.

>>> layer = Linear(8, 4)
>>> with torch.no_grad():
...     bool(torch.allclose(layer(torch.ones(1, 8)), F.linear(torch.ones(1, 8), layer.weight, layer.bias), atol=1e-6))
True
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..kernels.build import KernelUnavailable, kernel_ready

__all__ = ["KernelUnavailable", "Linear", "kernel_ready", "linear", "uses_kernel"]  # the kernel's two names: re-exported

_DTYPES = (torch.float32, torch.bfloat16)


def uses_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.linear(x, weight)`` runs in the kernel: one row, no gradient, CPU, float32/bfloat16."""
    no_grad = not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    return (no_grad and x.device.type == "cpu" and x.dtype in _DTYPES and weight.dtype == x.dtype
            and x.numel() == x.shape[-1] and x.numel() > 0 and kernel_ready())


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose one-row inference products run in
    lucidlm's CPU kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, in the kernel where :func:`uses_kernel` says it is a drop-in."""
    if uses_kernel(x, weight):
        out = torch.ops.lucidlm_kernels.gemv(x.reshape(1, -1), weight, bias)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
