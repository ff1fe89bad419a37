"""YaRN RoPE scaling from a GGUF file's ``rope.scaling.*`` keys, as transformers' ``rope_parameters``.

llama.cpp's converter writes the type, the factor, the original context and, where the config sets
them, ``yarn_beta_fast``/``yarn_beta_slow``, ``yarn_attn_factor`` and ``yarn_ext_factor``. What the file
does not say (whether the correction range is rounded to whole dimensions, ``truncate``) each
family's reader passes in.

>>> meta = {"general.architecture": "gpt-oss", "gpt-oss.rope.scaling.type": "yarn",
...         "gpt-oss.rope.scaling.factor": 32.0, "gpt-oss.rope.scaling.original_context_length": 4096}
>>> params = yarn_parameters(Keys(meta, "x.gguf"), 150000.0, truncate=False)
>>> params["rope_type"], params["factor"], params["original_max_position_embeddings"], params["truncate"]
('yarn', 32.0, 4096, False)
>>> yarn_parameters(Keys({"general.architecture": "gpt-oss"}, "x.gguf"), 1e4)
{'rope_type': 'default', 'rope_theta': 10000.0}
"""

from __future__ import annotations

from typing import Any

from .reader import Keys


def yarn_parameters(k: Keys, theta: float, truncate: bool | None = None) -> dict[str, Any]:
    """``rope_parameters`` from ``rope.scaling.*``: none, or YaRN (``truncate``: whether the model rounds
    the correction range to whole dimensions; None leaves transformers' default, True).

    Raises:
        GGUFError: another scaling type, or an extrapolation factor transformers' YaRN does not have.
    """
    kind = k.text("rope.scaling.type", "none")
    if kind == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if kind != "yarn":
        raise k.error("rope.scaling.type", kind, "'none' or 'yarn'")
    if (extrapolation := k.number("rope.scaling.yarn_ext_factor", 1.0)) != 1.0:
        raise k.error("rope.scaling.yarn_ext_factor", extrapolation, "1.0 (transformers' YaRN has no other)")
    params = {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": k.number("rope.scaling.factor"),
        "original_max_position_embeddings": k.integer("rope.scaling.original_context_length"),
        "beta_fast": k.number("rope.scaling.yarn_beta_fast", 32.0),
        "beta_slow": k.number("rope.scaling.yarn_beta_slow", 1.0),
    }
    if truncate is not None:
        params["truncate"] = truncate
    attention = k.number("rope.scaling.yarn_attn_factor", None)
    return params if attention is None else params | {"attention_factor": attention}


def yarn_keys(params: dict[str, Any]) -> dict[str, Any]:
    """``rope.scaling.*`` of YaRN ``rope_parameters``, as llama.cpp's converter writes them (the inverse
    of :func:`yarn_parameters`; ``truncate`` and DeepSeek's mscales are each family's to check or write)."""
    keys = {"rope.scaling.type": "yarn", "rope.scaling.factor": float(params["factor"]),
            "rope.scaling.original_context_length": params["original_max_position_embeddings"]}
    for key, name in (("attention_factor", "yarn_attn_factor"), ("beta_fast", "yarn_beta_fast"),
                      ("beta_slow", "yarn_beta_slow")):
        if params.get(key) is not None:
            keys[f"rope.scaling.{name}"] = float(params[key])
    return keys
