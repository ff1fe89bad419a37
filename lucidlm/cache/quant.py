"""Storage for the kept slots: full precision, or grouped int8 / packed int4 codes with scales.

A store holds the keys (or values) of a layer as a list of *parts*, every part with the slot axis
at dimension 2: ``(batch, n_query_groups, slots, ...)``. Eviction is then one ``gather`` per part,
done on the codes themselves, so a kept token is quantised exactly once (when it arrives) and never
re-quantised.

Quantisation is grouped along ``head_size`` (groups of up to 32 channels, one scale per token, per
head, per group): int8 is symmetric (``x ≈ code * scale``), int4 is asymmetric
(``x ≈ code * scale + low``, codes 0..15, two per byte). Scales and zero points are float16.

>>> import torch
>>> store = Int8Store(head_size=64, dtype=torch.float32)
>>> x = torch.randn(1, 2, 5, 64)
>>> parts = store.encode(x)
>>> [tuple(p.shape) for p in parts], [p.dtype for p in parts]
([(1, 2, 5, 64), (1, 2, 5, 2)], [torch.int8, torch.float16])
>>> bool((store.decode(parts) - x).abs().max() <= x.abs().max() / 127)
True
"""

from __future__ import annotations

import torch

from ..errors import CacheError

_TINY = 2.0 ** -20  # smallest scale: a group of zeros must not divide by zero (and fits float16)


def group_size(head_size: int, largest: int = 32) -> int:
    """Largest divisor of ``head_size`` not above ``largest`` (32 for 64/128, 24 for 24, 16 for 16)."""
    return max(g for g in range(1, min(largest, head_size) + 1) if head_size % g == 0)


class FloatStore:
    """Keys or values kept at the cache dtype: one part, the tensor itself."""

    def __init__(self, head_size: int, dtype: torch.dtype) -> None:
        self.head_size, self.dtype = head_size, dtype

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.to(self.dtype)]

    def decode(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0]

    def error(self, x: torch.Tensor) -> torch.Tensor:
        """(..., slots) float32: the L2 norm of what storing each vector of ``x`` (..., slots, head_size)
        loses, ``‖x − decode(encode(x))‖`` (0 at full precision in the input's dtype)."""
        return (x.float() - self.decode(self.encode(x)).float()).norm(dim=-1)


class Int8Store(FloatStore):
    """Symmetric int8 per group of channels: 1 byte per element plus a float16 scale per group."""

    def __init__(self, head_size: int, dtype: torch.dtype) -> None:
        super().__init__(head_size, dtype)
        self.group = group_size(head_size)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.head_size // self.group, self.group))

    def encode(self, x):
        g = self._grouped(x.float())
        # round the scale to float16 *before* quantising, so decode uses exactly the stored scale
        scale = (g.abs().amax(-1) / 127).clamp(min=_TINY).half()
        codes = torch.round(g / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
        return [codes.flatten(-2), scale]

    def decode(self, parts):
        codes, scale = parts
        return (self._grouped(codes).float() * scale.float()[..., None]).flatten(-2).to(self.dtype)


class Int4Store(Int8Store):
    """Asymmetric int4 per group: codes 0..15 packed two per byte, float16 scale and zero point."""

    def __init__(self, head_size: int, dtype: torch.dtype) -> None:
        if head_size % 2:
            raise CacheError(f"int4 packs two channels per byte: head_size={head_size} must be even")
        super().__init__(head_size, dtype)

    def encode(self, x):
        g = self._grouped(x.float())
        low = g.amin(-1).half()
        scale = ((g.amax(-1) - low.float()) / 15).clamp(min=_TINY).half()
        codes = torch.round((g - low.float()[..., None]) / scale.float()[..., None]).clamp(0, 15)
        codes = codes.to(torch.uint8).flatten(-2)
        packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # neighbours share a byte
        return [packed, scale, low]

    def decode(self, parts):
        packed, scale, low = parts
        codes = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)
        g = self._grouped(codes).float() * scale.float()[..., None] + low.float()[..., None]
        return g.flatten(-2).to(self.dtype)


#: quantiser name (the part after "+" in a policy name) -> store class
STORES: dict[str, type[FloatStore]] = {"int8": Int8Store, "int4": Int4Store}
