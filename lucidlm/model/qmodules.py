"""Layers whose weights stay quantised in memory: GGUF's Q8_0, Q4_0 and Q4_1 blocks used as they are.

:class:`QuantLinear` replaces an ``nn.Linear`` and :class:`QuantEmbedding` an ``nn.Embedding``; both hold
the blocks as buffers in the storage of :mod:`lucidlm.model.qlinear` (``qs`` int8/uint8, ``scales`` and,
for Q4_1, ``mins``), never a float copy of the weight:

* a linear layer's product is :func:`~lucidlm.model.qlinear.q8_linear` / ``q4_linear``: the kernel for
  a decode step, else ``F.linear`` on the dequantised weight (prompts, training, explanations: autograd
  and the LRP rules then see exactly the weights in use);
* an embedding lookup dequantises only the rows it looks up;
* a tied ``lm_head`` (:meth:`QuantLinear.tied_to`) shares the embedding's buffers: one copy.

``weight`` is the dequantised float32 weight, computed when asked (peft and the explainers read it).

>>> w = torch.randn(3, 64)
>>> scales = (w.abs().unflatten(1, (2, 32)).amax(-1) / 127).half()
>>> qs = (w / scales.float().repeat_interleave(32, 1)).round().to(torch.int8)
>>> layer = QuantLinear(qs, scales)
>>> x = torch.randn(2, 64)
>>> bool(torch.allclose(layer(x), x @ layer.weight.T, atol=1e-5)), layer.weight.shape
(True, torch.Size([3, 64]))
>>> table = QuantEmbedding(qs, scales)
>>> bool(torch.equal(table(torch.tensor([2, 0])), layer.weight[[2, 0]]))
True
>>> head = QuantLinear.tied_to(table)          # the tied lm_head: the same buffers
>>> head.qs is table.qs
True
"""

from __future__ import annotations

import torch
from torch import nn

from .qlinear import dequantize_q4, dequantize_q8, q4_linear, q8_linear, uses_qkernel

__all__ = ["QuantEmbedding", "QuantLinear", "is_keep_quantized"]

#: weights dequantised at once outside the kernel (prompts, gradients): 4 Mi values, 16 MB in float32
_CHUNK = 4 * 1024 * 1024


class _Blocks(nn.Module):
    """The quantised buffers and what both layers do with them."""

    def __init__(self, qs: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.bits = 8 if qs.dtype == torch.int8 else 4
        self.register_buffer("qs", qs)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.rows, self.cols = qs.shape[0], qs.shape[1] * (8 // self.bits)
        self.dtype = dtype  # what the dequantised values are computed in (the model's dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight, in the model's dtype (computed on every access; nothing is kept)."""
        return self.dequantize(self.qs, self.scales, self.mins).to(self.dtype)

    def dequantize(self, qs: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> torch.Tensor:
        return dequantize_q8(qs, scales) if self.bits == 8 else dequantize_q4(qs, scales, mins)

    def _apply(self, fn, recurse: bool = True):
        # model.to(dtype) must not round the blocks' float16 scales: they move between devices only,
        # and the dtype change becomes the dtype the dequantised values are computed in
        kept = {name: t for name in ("scales", "mins") if (t := self._buffers.get(name)) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            self._buffers[name] = old.to(self._buffers[name].device)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return self


class QuantLinear(_Blocks):
    """A frozen linear layer ``y = x W^T + b`` with ``W`` kept as quantised blocks."""

    def __init__(self, qs: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(qs, scales, mins, dtype)
        self.out_features, self.in_features = self.rows, self.cols
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @classmethod
    def tied_to(cls, embedding: QuantEmbedding, bias: torch.Tensor | None = None) -> QuantLinear:
        """The output layer that shares ``embedding``'s blocks (tied embeddings): no second copy."""
        return cls(embedding.qs, embedding.scales, embedding.mins, bias, embedding.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_features * self.in_features <= _CHUNK or uses_qkernel(x, self.scales, self.mins, self.bias):
            return self._product(x, slice(None))
        # dequantised in slices of output rows: a large matrix (the vocabulary's) never exists in float whole
        step = max(1, _CHUNK // self.in_features)
        return torch.cat([self._product(x, slice(i, i + step)) for i in range(0, self.out_features, step)], dim=-1)

    def _product(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        bias = None if self.bias is None else self.bias[rows]
        if self.bits == 8:
            return q8_linear(x, self.qs[rows], self.scales[rows], bias)
        return q4_linear(x, self.qs[rows], self.scales[rows], self.mins[rows] if self.mins is not None else None, bias)

    def extra_repr(self) -> str:
        kind = "q8" if self.bits == 8 else ("q4_1" if self.mins is not None else "q4_0")
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, bias={self.bias is not None}"


class QuantEmbedding(_Blocks):
    """A frozen embedding table kept as quantised blocks; a lookup dequantises only its rows."""

    def __init__(self, qs: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(qs, scales, mins, dtype)
        self.num_embeddings, self.embedding_dim = self.rows, self.cols

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        mins = None if self.mins is None else self.mins[flat]
        rows = self.dequantize(self.qs[flat], self.scales[flat], mins)
        return rows.reshape(*ids.shape, self.embedding_dim).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, q{self.bits}"


def is_keep_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` keeps GGUF blocks (a model loaded with ``keep_quantized=True``).

    >>> is_keep_quantized(nn.Linear(2, 2))
    False
    """
    return any(isinstance(m, _Blocks) for m in model.modules())
