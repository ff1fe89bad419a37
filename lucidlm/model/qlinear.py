"""Products with quantised weights kept as they are: 8-bit (per channel or Q8_0 blocks) and 4-bit (Q4_0 / Q4_1).

The storage (one copy of the truth, shared with the GGUF loader and ``Int8Linear``):

* 8-bit: ``qs`` int8 (n, k) and ``scales`` (n, k // B) float16/bfloat16/float32, B the block size
  (B = k: one scale per output channel; B = 32: Q8_0); ``value[i, j] = qs[i, j] * scales[i, j // B]``.
* 4-bit: ``qs`` uint8 (n, k // 2) in GGUF's nibble order (in each 32-weight block's 16 bytes, weight j
  is the low nibble of byte j and weight j + 16 its high nibble), ``scales`` float16 (n, k // 32) and
  ``mins`` float16 (n, k // 32) for Q4_1 (None for Q4_0); ``value = (nibble - 8) * d`` (Q4_0) or
  ``nibble * d + m`` (Q4_1): exactly ``gguf.quants.dequantize``'s values.

:func:`q8_linear` / :func:`q4_linear` are ``F.linear`` on the dequantised weight. A decode step (a few
rows, no gradient, CPU, float32 or bfloat16) runs in lucidlm's kernel (``q8_gemv`` / ``q4_gemv`` in
``lucidlm/kernels/``), which reads the blocks directly and accumulates in float32; everything else
(prompts, gradients, other devices) dequantises to the activations' dtype and runs one GEMM, so the
LRP rules and autograd see exactly the weights the kernel used.

>>> w = torch.randn(4, 64)
>>> scales = w.abs().unflatten(1, (2, 32)).amax(-1) / 127          # Q8_0: one scale per 32 weights
>>> qs = (w / scales.repeat_interleave(32, 1)).round().to(torch.int8)
>>> x = torch.randn(1, 64)
>>> with torch.no_grad():
...     bool(torch.allclose(q8_linear(x, qs, scales), x @ dequantize_q8(qs, scales).T, atol=1e-4))
True
"""

from __future__ import annotations

import os
import warnings

import torch
from torch.nn import functional as F

from ..errors import ConfigError
from ..kernels.build import ENV_VAR, KernelUnavailable, kernel_ready, unavailable_reason

__all__ = ["KERNEL_ROWS", "VNNI_VAR", "check_kernel", "dequantize_q4", "dequantize_q8", "q4_linear", "q8_linear",
           "uses_qkernel", "wants_grad"]

#: up to this many rows (tokens) a product runs in the kernel; more is a GEMM (prefill), where one
#: dequantised matrix product is faster than re-reading the blocks per row
KERNEL_ROWS = 4
#: "1": 8-bit products quantise the activations to int8 per 32-block and use AVX-512 VNNI (llama.cpp's Q8_0
#: dot); off by default: measured no faster here than the exact float-activation path, and results differ
VNNI_VAR = "LUCIDLM_VNNI"
_ACTIVATIONS = (torch.float32, torch.bfloat16)
_SCALES = (torch.float16, torch.bfloat16, torch.float32)
Q4_BLOCK = 32


def dequantize_q8(qs: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 (n, k) weight of 8-bit ``qs`` (n, k) with ``scales`` (n, k // B)."""
    _check_q8(qs, scales)
    block = qs.shape[1] // scales.shape[1]
    return (qs.float().unflatten(1, (-1, block)) * scales.float()[:, :, None]).flatten(1)


def dequantize_q4(qs: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 (n, k) weight of 4-bit ``qs`` (n, k // 2): Q4_1 with ``mins``, Q4_0 without."""
    _check_q4(qs, scales, mins)
    bytes_ = qs.unflatten(1, (-1, Q4_BLOCK // 2))  # (n, blocks, 16)
    nibbles = torch.cat([bytes_ & 0x0F, bytes_ >> 4], dim=2).float()  # (n, blocks, 32): low nibbles first
    if mins is None:
        return ((nibbles - 8) * scales.float()[:, :, None]).flatten(1)
    return (nibbles * scales.float()[:, :, None] + mins.float()[:, :, None]).flatten(1)


def uses_qkernel(x: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """Whether a product with these activations runs in the kernel: a few rows, no gradient wanted,
    CPU tensors, float32 or bfloat16 activations, and the kernel built."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (not wants_grad(x, *weights) and 0 < rows <= KERNEL_ROWS and x.dtype in _ACTIVATIONS and x.device.type == "cpu"
            and all(t is None or t.device.type == "cpu" for t in weights) and _ops_ready())


def q8_linear(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize_q8(qs, scales), bias)``: in the kernel for a decode step."""
    _check_q8(qs, scales)
    _check_x(x, qs.shape[1], "q8_linear")
    if uses_qkernel(x, scales, bias):
        out = torch.ops.lucidlm_kernels.q8_gemv(x.reshape(-1, x.shape[-1]), qs, scales, bias)
        return out.reshape(*x.shape[:-1], qs.shape[0])
    bias = None if bias is None else bias.to(x.dtype)
    if scales.shape[1] == 1 and not wants_grad(x, scales, bias):
        # one scale per channel, a prompt: x @ (q·s)ᵀ = (x @ qᵀ)·s saves a pass over the weight (measured:
        # 512 rows within a few % of the float GEMM, where torch._weight_int8pack_mm is 10-80x slower)
        out = F.linear(x, qs.to(x.dtype)).mul_(scales[:, 0].to(x.dtype))
        return out if bias is None else out.add_(bias)
    return F.linear(x, dequantize_q8(qs, scales).to(x.dtype), bias)


def q4_linear(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize_q4(qs, scales, mins), bias)``: in the kernel for a decode step."""
    _check_q4(qs, scales, mins)
    _check_x(x, qs.shape[1] * 2, "q4_linear")
    if uses_qkernel(x, scales, mins, bias):
        out = torch.ops.lucidlm_kernels.q4_gemv(x.reshape(-1, x.shape[-1]), qs, scales, mins, bias)
        return out.reshape(*x.shape[:-1], qs.shape[0])
    weight = dequantize_q4(qs, scales, mins).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def check_kernel() -> str | None:
    """The path quantised decode products take here ("vnni", "avx512" or "portable"), or None where the
    kernel is unavailable; a :class:`KernelUnavailable` warning says so when that is not what was asked
    (no compiler, a failed build, ``LUCIDLM_VNNI=1`` on a CPU without AVX-512 VNNI). Called where
    quantised weights are set up (``LLM.quantize``, GGUF loading with ``keep_quantized``).

    >>> check_kernel() in ("vnni", "avx512", "portable", None)
    True
    """
    if not _ops_ready():
        reason = unavailable_reason() or "the kernel library predates the quantised ops"
        if reason != f"{ENV_VAR}=0":  # asked for: nothing to warn about
            warnings.warn(f"lucidlm's quantised-weight kernel is unavailable ({reason}): products dequantise "
                          "and run in F.linear (same results, slower decoding)", KernelUnavailable, stacklevel=2)
        return None
    path = torch.ops.lucidlm_kernels.q8_path()
    if os.environ.get(VNNI_VAR) == "1" and path != "vnni":
        warnings.warn(f"{VNNI_VAR}=1 but this CPU has no AVX-512 VNNI: 8-bit products take the {path} path "
                      "(float activations)", KernelUnavailable, stacklevel=2)
    return path


def wants_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will want a gradient through any of ``tensors`` (then no kernel may run: the
    kernels have no backward, and the LRP rules must see the dequantised weight)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _ops_ready() -> bool:
    # the library may predate the quantised ops (a cached build of an older source): then F.linear
    return kernel_ready() and hasattr(torch.ops.lucidlm_kernels, "q8_gemv")


def _check_x(x: torch.Tensor, k: int, name: str) -> None:
    if x.dim() == 0 or x.shape[-1] != k or not x.is_floating_point():
        raise ConfigError(f"{name}: activations (..., {k}) of a floating dtype expected, "
                          f"got {tuple(x.shape)} {x.dtype}")


def _check_q8(qs: torch.Tensor, scales: torch.Tensor) -> None:
    if qs.dtype != torch.int8 or qs.dim() != 2:
        raise ConfigError(f"8-bit weights: qs must be int8 (n, k), got {qs.dtype} {tuple(qs.shape)}")
    ok = (scales.dim() == 2 and scales.dtype in _SCALES and scales.shape[0] == qs.shape[0]
          and scales.shape[1] > 0 and qs.shape[1] % scales.shape[1] == 0)
    if not ok:
        raise ConfigError(f"8-bit weights: scales (n, k // B) float16/bfloat16/float32 with B dividing k expected "
                          f"for qs {tuple(qs.shape)}, got {scales.dtype} {tuple(scales.shape)}")


def _check_q4(qs: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> None:
    if qs.dtype != torch.uint8 or qs.dim() != 2 or qs.shape[1] % (Q4_BLOCK // 2):
        raise ConfigError(f"4-bit weights: qs must be uint8 (n, k // 2) with k a multiple of {Q4_BLOCK}, "
                          f"got {qs.dtype} {tuple(qs.shape)}")
    expected = (qs.shape[0], qs.shape[1] * 2 // Q4_BLOCK)
    for name, t in (("scales", scales), ("mins", mins)):
        if t is not None and (t.dtype != torch.float16 or tuple(t.shape) != expected):
            raise ConfigError(f"4-bit weights: {name} must be float16 {expected}, got {t.dtype} {tuple(t.shape)}")
