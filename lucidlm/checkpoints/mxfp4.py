"""MXFP4 expert weights (gpt-oss's published checkpoints), dequantized on load.

openai/gpt-oss-20b stores each expert matrix ``X`` as two tensors: ``X_blocks`` (experts, out,
groups, 16) uint8, two 4-bit E2M1 values per byte (low nibble first), and ``X_scales`` (experts, out,
groups) uint8, one power-of-two exponent per group of 32 values, biased by 127 (the OCP
Microscaling format). :func:`dequantize_mxfp4` turns every such pair into the float ``X`` of shape
(experts, in, out) that transformers' dequantized model holds, so the layout then reads it as an
unquantized checkpoint.

>>> blocks = torch.tensor([[[[0x21] + [0] * 15]]], dtype=torch.uint8)  # values 0.5 (low), 1.0 (high)
>>> scales = torch.tensor([[[128]]], dtype=torch.uint8)  # 2 ** (128 - 127)
>>> out = dequantize_mxfp4({"e.down_proj_blocks": blocks, "e.down_proj_scales": scales})
>>> out["e.down_proj"].shape, out["e.down_proj"][0, :2, 0].tolist()
(torch.Size([1, 32, 1]), [1.0, 2.0])
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError

#: the 16 E2M1 values, indexed by the 4-bit code (sign bit highest)
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """``state`` with every ``X_blocks``/``X_scales`` pair replaced by the dequantized ``X``
    (experts, in, out) in ``dtype``; other tensors are returned as they are."""
    out = {name: t for name, t in state.items() if not name.endswith(("_blocks", "_scales"))}
    for name in state:
        if name.endswith("_blocks"):
            stem = name.removesuffix("_blocks")
            if stem + "_scales" not in state:
                raise CheckpointError(f"{name}: an MXFP4 block tensor without its {stem}_scales")
            out[stem] = _dequantize(state[name], state[stem + "_scales"], dtype, stem)
        elif name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" not in state:
            raise CheckpointError(f"{name}: MXFP4 scales without their {name.removesuffix('_scales')}_blocks")
    return out


def _dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise CheckpointError(f"{name}: MXFP4 expects uint8 blocks (..., groups, 16) and uint8 scales (..., groups); "
                              f"got {blocks.dtype} {tuple(blocks.shape)} and {scales.dtype} {tuple(scales.shape)}")
    table = torch.tensor(_E2M1, dtype=torch.float32)
    values = torch.stack([table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]], dim=-1)  # low nibble first
    values = torch.ldexp(values.flatten(-2), scales.to(torch.int32)[..., None] - 127)  # (..., groups, 32)
    return values.flatten(-2).transpose(1, 2).to(dtype).contiguous()  # (experts, out, in) -> (experts, in, out)
