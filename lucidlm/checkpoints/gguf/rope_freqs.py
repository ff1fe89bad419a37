"""Llama 3.1's RoPE scaling in GGUF: llama.cpp's converter writes no ``rope.scaling.*`` keys for it
but a ``rope_freqs`` tensor, one factor per frequency (llama.cpp divides each RoPE frequency by its
factor). :func:`llama3_factors` computes that tensor as the converter does (export);
:func:`llama3_parameters` turns a file's factors back into an equivalent ``llama3`` RoPE config (read).

The factors depend on the four Llama-3 settings only through ``factor`` and the two numbers of the
smoothing line ``s = old_context / wavelength / (high - low) - low / (high - low)``, so the read-back
config takes ``low_freq_factor = 1`` and the ``high_freq_factor`` / context that give the same line:
the same factor for every frequency, hence the same model.

>>> params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
...           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
>>> factors = llama3_factors(params, 128)
>>> back = llama3_parameters(factors, 500000.0, 128, "llama3.gguf")
>>> back["factor"], back["high_freq_factor"], back["original_max_position_embeddings"]
(8.0, 4.0, 8192)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...errors import GGUFError

_TOLERANCE = 1e-5  # relative: the file's float32 factors against a recomputation


def _frequencies(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def llama3_factors(params: dict[str, Any], dim: int) -> torch.Tensor:
    """``rope_freqs``: llama.cpp's converter's per-frequency factors for ``llama3`` RoPE ``params``
    (its ``LlamaModel.generate_extra_tensors``, defaults included), heads of size ``dim``."""
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_context = params.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in _frequencies(params.get("rope_theta", 10000.0), dim):
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def llama3_parameters(factors: torch.Tensor, theta: float, dim: int, path: object) -> dict[str, Any]:
    """The RoPE config (``rope_parameters``) whose frequencies llama.cpp's ``factors`` give.

    Raises:
        GGUFError: the factors are no Llama-3 scaling (no config reproduces them).
    """
    factors = factors.double().flatten()
    if len(factors) != (dim + 1) // 2:
        raise GGUFError(f"{path}: rope_freqs holds {len(factors)} factors; heads of size {dim} need {(dim + 1) // 2}")
    factor = float(factors.max())
    if factor <= 1.0 + _TOLERANCE:  # no frequency scaled: plain RoPE
        params = {"rope_type": "default", "rope_theta": theta}
    elif float(factors.min()) >= factor * (1 - _TOLERANCE):  # every frequency scaled alike: linear
        params = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    else:
        params = _llama3(factors, factor, theta, dim)
    expected = _expected(params, dim)
    if not torch.allclose(factors, expected, rtol=_TOLERANCE, atol=0.0):
        raise GGUFError(f"{path}: its rope_freqs factors are not Llama 3's RoPE scaling, the only per-frequency "
                        "scaling lucidlm implements")
    return params


def _expected(params: dict[str, Any], dim: int) -> torch.Tensor:
    if params["rope_type"] == "llama3":
        return llama3_factors(params, dim).double()
    return torch.full(((dim + 1) // 2,), float(params.get("factor", 1.0)), dtype=torch.float64)


def _llama3(factors: torch.Tensor, factor: float, theta: float, dim: int) -> dict[str, Any]:
    """``llama3`` parameters (``low_freq_factor`` 1) whose smoothing line ``s = a / wavelength - b``
    meets every factor: through the factors strictly between 1 and ``factor``, and keeping the
    others on their side of it."""
    inverse_wavelength = _frequencies(theta, dim).double() / (2 * math.pi)
    smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)  # 0: scaled by factor, 1: kept
    inside = (smooth > _TOLERANCE) & (smooth < 1 - _TOLERANCE)
    x, s = inverse_wavelength[inside], smooth[inside]
    scaled, kept = inverse_wavelength[~inside & (smooth <= 0.5)], inverse_wavelength[~inside & (smooth > 0.5)]
    if len(x) >= 2:  # the line through the outermost two
        a = float((s[-1] - s[0]) / (x[-1] - x[0]))
        b = float(a * x[0] - s[0])
    elif len(x) == 1:  # through the one point, steep enough to keep the others on their sides
        bounds = [float(s[0] / (x[0] - z)) for z in scaled if z < x[0]]
        bounds += [float((1 - s[0]) / (o - x[0])) for o in kept if o > x[0]] + [2 * float(s[0] / x[0])]
        a = max(bounds)
        b = float(a * x[0] - s[0])
    else:  # between the last scaled frequency and the first kept one
        a = 1 / float(kept.min() - scaled.max())
        b = a * float(scaled.max())
    high, old_context = 1 + 1 / b, a / b
    return {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": 1.0,
            **_rounded(high, old_context, factors, factor, theta, dim)}


def _rounded(high: float, old_context: float, factors: torch.Tensor, factor: float, theta: float,
             dim: int) -> dict[str, Any]:
    """The published values (an integer context, a high factor of a few decimals) where they give the
    same factors, else the exact ones."""
    exact = {"high_freq_factor": high, "original_max_position_embeddings": old_context}
    nice = {"high_freq_factor": round(high, 3), "original_max_position_embeddings": round(old_context)}
    params = {"rope_theta": theta, "factor": factor, "low_freq_factor": 1.0, **nice}
    same = torch.allclose(llama3_factors(params, dim).double(), factors, rtol=_TOLERANCE, atol=0.0)
    return nice if same else exact
