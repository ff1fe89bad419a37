"""Rotary position embeddings (RoPE), applied at explicit positions.

Convention for partial rotary (GPT-NeoX ``rotary_pct``, Phi ``partial_rotary_factor``): with
``dim = int(head_size * fraction)``, the inverse frequencies are ``base ** -(arange(0, dim, 2) / dim)``
(``ceil(dim / 2)`` of them) and the first ``2 * ceil(dim / 2)`` dimensions of each head are rotated
with the "rotate half" layout. For an odd ``dim`` that is the next even number of dimensions, with the
frequencies still divided by the odd ``dim``: exactly what transformers does today (older releases
of several models sliced ``dim`` dimensions but built ``dim + 1`` cos/sin entries, a shape bug).

Scaling (``rope_scaling["rope_type"]``): ``linear``, ``llama3``, ``yarn``, ``longrope`` and ``dynamic``,
each computed as transformers 5's ``modeling_rope_utils.py`` computes it, operation for operation
(bit-equal frequencies); :class:`RotaryFrequencies` adds the rules of its ``dynamic_rope_update`` for
the two types whose frequencies depend on the forward's sequence length.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def inverse_frequencies(head_size: int, fraction: float, theta: float,
                        scaling: dict[str, Any] | None = None, seq_len: int | None = None) -> torch.Tensor:
    """The ``ceil(dim / 2)`` inverse frequencies of RoPE, in float32, with optional scaling, as
    transformers' ``ROPE_INIT_FUNCTIONS`` compute them. ``seq_len``: the forward's length, for the
    types that depend on it (``longrope``: long factors beyond ``original_max_position_embeddings``;
    ``dynamic``: NTK base grown to ``seq_len``); None = at initialisation.

    >>> inverse_frequencies(8, 1.0, 10000.0)
    tensor([1.0000, 0.1000, 0.0100, 0.0010])
    >>> inverse_frequencies(8, 1.0, 10000.0, {"rope_type": "longrope", "original_max_position_embeddings": 32,
    ...     "short_factor": [1, 1, 1, 1], "long_factor": [1, 2, 4, 8], "factor": 2.0}, seq_len=33)
    tensor([1.0000e+00, 5.0000e-02, 2.5000e-03, 1.2500e-04])
    """
    dim = int(head_size * fraction)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    s = scaling or {}
    rope_type = s.get("rope_type", "default")
    if rope_type == "longrope":
        long = seq_len is not None and seq_len > s["original_max_position_embeddings"]
        factors = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (factors * theta ** exponents)
    if rope_type == "dynamic":
        return 1.0 / (_dynamic_base(theta, dim, s, seq_len) ** exponents)
    inv_freq = 1.0 / (theta ** exponents)
    if rope_type == "linear":
        return inv_freq / s["factor"]
    if rope_type == "llama3":
        return _llama3_scaling(inv_freq, s)
    if rope_type == "yarn":
        return _yarn_scaling(theta, dim, exponents, s)
    return inv_freq


def length_dependent(scaling: dict[str, Any] | None) -> bool:
    """Whether RoPE's frequencies depend on the forward's sequence length (``longrope``, ``dynamic``):
    then a prompt is prefilled in one forward, as transformers does, not in chunks."""
    return (scaling or {}).get("rope_type") in ("longrope", "dynamic")


def recompute_position(scaling: dict[str, Any] | None) -> int | None:
    """The position at which a cached generation starts over with LongRoPE's long factors (Phi-3:
    transformers drops the cache when the sequence reaches ``original_max_position_embeddings + 1``
    tokens and recomputes every token), or None where the cache is kept (every other type)."""
    s = scaling or {}
    return s["original_max_position_embeddings"] if s.get("recompute_at_switch") else None


def attention_factor(scaling: dict[str, Any] | None) -> float:
    """The factor transformers multiplies RoPE's cos and sin by (YaRN's and LongRoPE's ``mscale``),
    1.0 for the other types.

    >>> attention_factor({"rope_type": "yarn", "factor": 4.0})
    1.138629436111989
    >>> attention_factor({"rope_type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0})
    1.0
    """
    s = scaling or {}
    rope_type = s.get("rope_type", "default")
    if rope_type not in ("yarn", "longrope"):
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    factor = s["factor"]
    if rope_type == "longrope":
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(s["original_max_position_embeddings"]))
    if s.get("mscale") and s.get("mscale_all_dim"):
        return float(yarn_mscale(factor, s["mscale"]) / yarn_mscale(factor, s["mscale_all_dim"]))
    return yarn_mscale(factor)


def yarn_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's ``0.1 * mscale * ln(scale) + 1`` (eq. 21 of the paper), 1.0 for ``scale <= 1``."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(scale: float, scaling: dict[str, Any] | None) -> float:
    """The attention's ``q·kᵀ`` scale with YaRN's ``mscale_all_dim`` folded in, as DeepSeek-V2/V3's
    multi-head latent attention uses it (``scale * mscale²``; transformers' ``yarn_apply_mscale``).
    Other attentions keep ``scale``: only MLA calls this.

    >>> softmax_scale(0.125, {"rope_type": "yarn", "factor": 40, "mscale_all_dim": 1.0}) > 0.125
    True
    """
    s = scaling or {}
    if s.get("rope_type", "default") != "default" and s.get("mscale_all_dim"):
        m = yarn_mscale(s["factor"], s["mscale_all_dim"])
        return scale * m * m
    return scale


def _dynamic_base(theta: float, dim: int, s: dict[str, Any], seq_len: int | None):
    """Dynamic NTK's base for ``seq_len`` tokens: grown when ``seq_len`` exceeds the trained length
    (``max_position_embeddings``). At initialisation transformers computes it in Python floats, in
    a forward in float32 tensors: both are reproduced, for bit-equal frequencies."""
    factor, trained = s["factor"], s["max_position_embeddings"]
    if seq_len is None:
        return theta * ((factor * trained / trained) - (factor - 1)) ** (dim / (dim - 2))
    length = torch.tensor(max(seq_len, trained), dtype=torch.int64)
    return theta * ((factor * length / trained) - (factor - 1)) ** (dim / (dim - 2))


def _yarn_scaling(theta: float, dim: int, exponents: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """YaRN ("NTK-by-parts"): frequencies that rotate more than ``beta_fast`` times over the original
    context kept, fewer than ``beta_slow`` times divided by ``factor``, a linear ramp between."""
    factor, original = s["factor"], s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** exponents
    extrapolation = 1 - ramp
    return 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation


def _llama3_scaling(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling: long wavelengths divided by ``factor``, short kept,
    a smooth interpolation between (Meta's reference implementation)."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, interleaved: bool = False,
                 scale: float | torch.Tensor = 1.0):
    """cos/sin of shape (batch, 1, tokens, 2 * len(inv_freq)) for integer ``positions`` (batch, tokens);
    ``interleaved`` (Cohere, GPT-J): each frequency repeated in place (f0, f0, f1, f1 ...); ``scale``:
    YaRN's/LongRoPE's attention factor, applied in float32 before the cast (as transformers does)."""
    freqs = positions.clamp(min=0)[..., None].float() * inv_freq.to(positions.device)
    emb = (freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1))[:, None]
    cos, sin = emb.cos(), emb.sin()
    if isinstance(scale, torch.Tensor) or scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


class RotaryFrequencies:
    """The frequencies one forward rotates with, by transformers' rules for the RoPE types whose
    frequencies depend on the sequence (its ``dynamic_rope_update``), where the sequence length is
    ``max(positions) + 1`` of the forward:

    * ``longrope``: the long factors when the length exceeds ``original_max_position_embeddings``,
      else the short ones, per forward (a ``torch.where``: traceable, no host sync);
    * ``dynamic``: the NTK base grows with the longest sequence seen by this model (state kept
      across forwards, as transformers' ``max_seq_len_cached``) and returns to the trained one
      when a forward is shorter than ``max_position_embeddings``;
    * the other types: fixed frequencies.

    A plain object, not a module: ``model.to(bfloat16)`` must not round the frequencies.

    >>> rot = RotaryFrequencies(8, 1.0, 10000.0, {"rope_type": "dynamic", "factor": 2.0,
    ...                                           "max_position_embeddings": 16})
    >>> rot.frequencies(torch.arange(40)[None])[1] < rot.initial[1], rot.longest
    (tensor(True), 40)
    >>> _ = rot.frequencies(torch.arange(20)[None]); rot.longest  # shorter but above 16: kept
    40
    >>> _ = rot.frequencies(torch.arange(8)[None]); rot.longest  # below the trained length: reset
    16
    """

    def __init__(self, head_size: int, fraction: float, theta: float, scaling: dict[str, Any] | None) -> None:
        self.args = (head_size, fraction, theta, scaling)
        self.rope_type = (scaling or {}).get("rope_type", "default")
        self.scale = attention_factor(scaling)
        self.initial = inverse_frequencies(*self.args)
        self.long = None
        if self.rope_type == "longrope":
            self.switch = scaling["original_max_position_embeddings"]
            self.long = inverse_frequencies(*self.args, seq_len=self.switch + 1)
        # PhiMoE: cos and sin times long_attention_factor (its long_mscale) past the switch
        self.long_scale = (scaling or {}).get("long_attention_factor")
        self.trained = self.longest = (scaling or {}).get("max_position_embeddings")
        self._grown: torch.Tensor | None = None  # dynamic: the frequencies for ``longest``

    def frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        """The inverse frequencies for a forward over ``positions`` (batch, tokens; -1 = padding)."""
        if self.initial.device != positions.device:  # moved once, not copied at every forward
            self.initial = self.initial.to(positions.device)
            self.long = None if self.long is None else self.long.to(positions.device)
            self._grown = None if self._grown is None else self._grown.to(positions.device)
        if self.rope_type == "longrope":
            return torch.where(positions.max() + 1 > self.switch, self.long, self.initial)
        if self.rope_type == "dynamic":
            return self._dynamic(int(positions.max()) + 1, positions.device)
        return self.initial

    def scale_at(self, positions: torch.Tensor) -> float | torch.Tensor:
        """The factor on cos and sin for a forward over ``positions``: :attr:`scale`, or for PhiMoE's
        LongRoPE (``long_attention_factor``) the long one where the sequence passes the switch."""
        if self.long_scale is None:
            return self.scale
        past = positions.max() + 1 > self.switch
        return torch.where(past, self.long_scale, self.scale).float()

    def _dynamic(self, seq_len: int, device: torch.device) -> torch.Tensor:
        if seq_len > self.longest:  # growth
            self.longest = seq_len
            self._grown = inverse_frequencies(*self.args, seq_len=seq_len).to(device)
        elif seq_len < self.trained < self.longest:  # back within the trained length: reset
            self.longest, self._grown = self.trained, None
        return self.initial if self._grown is None else self._grown


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x`` (batch, heads, tokens, head_size): as two halves,
    or (``interleaved``: Cohere, GPT-J) as adjacent pairs."""
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    half = n // 2
    if interleaved:
        rotated = torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out
