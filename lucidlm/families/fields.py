"""The ``config.json`` keys every family spells alike, read into :class:`~lucidlm.config.Config` fields.

A family's own keys are read by its readers (:mod:`lucidlm.families.readers`); these helpers are
shared by both.

>>> generic_fields({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
...                 "vocab_size": 100, "hidden_act": "gelu_new"}, traits={})["activation"]
'gelu_tanh'
>>> first({"n_embd": 768}, "hidden_size", "n_embd")
768
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fileio import read_json

#: Config fields whose None is a value ("no sliding window"), not "take the default"
NULLABLE = frozenset({"sliding_window", "layer_types", "rope_scaling", "attn_logit_softcapping",
                      "final_logit_softcapping", "attention_scale", "qk_norm", "rope_local_theta", "clip_qkv",
                      "rope_layers", "moe_layers", "moe_intermediate_size"})


def read_hf_config(path_or_dict: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``(config dict, where it came from)`` of a ``config.json`` path, a directory holding one, or a dict."""
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict), "config dict"
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    return read_json(path, ConfigError, "a Hugging Face config.json"), str(path)


def first(hf: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The value of the first of ``keys`` that ``hf`` holds and is not None, else ``default``."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def n_layer(hf: dict[str, Any]) -> int:
    """The number of layers, under any spelling (DBRX: ``n_layers``)."""
    return first(hf, "num_hidden_layers", "n_layer", "n_layers")


def width(hf: dict[str, Any]) -> int:
    """The hidden size, under any spelling (GPT-2: ``n_embd``, DBRX: ``d_model``)."""
    return first(hf, "hidden_size", "n_embd", "d_model")


def heads(hf: dict[str, Any]) -> int:
    """The number of query heads, under any spelling (DBRX: ``n_heads``)."""
    return first(hf, "num_attention_heads", "n_head", "n_heads")


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings with transformers' precedence: ``rope_scaling`` (4.x), else ``rope_parameters``
    (5.x; per layer type for Gemma 3), then the top-level ``rope_theta``/``partial_rotary_factor``."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if "full_attention" in params:  # per layer type (Gemma 3)
        params = params["full_attention"]
    params = dict(params)
    params.setdefault("rope_theta", first(hf, "rope_theta", "rotary_emb_base", default=10000.0))
    fraction = first(hf, "partial_rotary_factor", "rotary_pct")
    if fraction is not None:
        params.setdefault("partial_rotary_factor", fraction)
    params["rope_type"] = params.get("rope_type", params.pop("type", "default"))
    return params


_SUPPORTED_ROPE = ("default", "dynamic", "linear", "llama3", "longrope", "yarn")


def rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """``rope_theta``, ``rotary_fraction`` and ``rope_scaling`` (None, or the scaling parameters,
    completed as transformers completes them: ``original_max_position_embeddings``, a missing YaRN
    or LongRoPE ``factor``, dynamic NTK's ``max_position_embeddings``).

    >>> fields = rope_fields({"head_dim": 8, "max_position_embeddings": 64,
    ...                       "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    >>> fields["rope_theta"], fields["rope_scaling"]
    (10000.0, {'rope_type': 'yarn', 'factor': 2.0, 'original_max_position_embeddings': 64})
    """
    params = _rope_parameters(hf)
    rope_type = params["rope_type"]
    if rope_type not in _SUPPORTED_ROPE:
        raise ConfigError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(_SUPPORTED_ROPE)}")
    fraction = float(params.get("partial_rotary_factor", 1.0))
    scaling = None if rope_type == "default" else {
        k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling is not None:
        _complete_scaling(scaling, hf, _rotary_dim(hf, fraction))
    return {"rope_theta": float(params["rope_theta"]), "rotary_fraction": fraction, "rope_scaling": scaling}


def _rotary_dim(hf: dict[str, Any], fraction: float) -> int:
    head_size = first(hf, "head_dim", "kv_channels") or width(hf) // heads(hf)
    return int(head_size * fraction)


def _complete_scaling(s: dict[str, Any], hf: dict[str, Any], dim: int) -> None:
    """Fill in what transformers derives (``standardize_rope_params`` and the init functions) and
    refuse what it cannot compute, naming the field."""
    rope_type = s["rope_type"]
    trained = first(hf, "max_position_embeddings", "n_positions", "max_seq_len", default=4096)
    if rope_type in ("llama3", "yarn", "longrope"):
        # a top-level original_max_position_embeddings (Phi-3) wins, as in transformers
        s["original_max_position_embeddings"] = first(hf, "original_max_position_embeddings", default=None) \
            or s.get("original_max_position_embeddings") or trained
    if rope_type in ("yarn", "longrope") and s.get("factor") is None:
        s["factor"] = trained / s["original_max_position_embeddings"]
    if rope_type == "dynamic":
        s["max_position_embeddings"] = trained
    factor = s.get("factor")
    if rope_type != "longrope" and not (isinstance(factor, (int, float)) and factor > 0):
        raise ConfigError(f"rope_scaling.factor={factor!r} for rope_type {rope_type!r}: expected a number > 0")
    if rope_type == "yarn" and dim % 2:
        raise ConfigError(f"partial_rotary_factor: yarn needs an even rotary dimension, got {dim} "
                          "(transformers fails on it too)")
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            got = s.get(key)
            if not isinstance(got, (list, tuple)) or len(got) != (dim + 1) // 2:
                n = len(got) if isinstance(got, (list, tuple)) else got
                raise ConfigError(f"rope_scaling.{key} has {n!r} entries, expected {(dim + 1) // 2} "
                                  f"(one per rotated pair: rotary dimension {dim} / 2)")


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu",
                "relu2": "relu2", "xielu": "xielu"}


def activation(hf: dict[str, Any]) -> str:
    """The activation's name in :class:`~lucidlm.config.Config`'s vocabulary."""
    name = first(hf, "hidden_activation", "hidden_act", "activation_function", default="silu")
    if name not in _ACTIVATIONS:
        raise ConfigError(f"activation {name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def generic_fields(hf: dict[str, Any], traits: dict[str, Any]) -> dict[str, Any]:
    """Keys that mean the same thing in every family's config.json (sliding windows, biases and
    soft-caps are read per family: transformers ignores them where the family has no such option)."""
    n_embd, n_head = width(hf), heads(hf)
    fields = {
        "vocab_size": hf.get("vocab_size"),
        "n_embd": n_embd,
        "n_layer": n_layer(hf),
        "n_head": n_head,
        "n_query_groups": first(hf, "num_key_value_heads", default=n_head),
        "head_size": first(hf, "head_dim", "kv_channels"),  # JetMoE: kv_channels
        "intermediate_size": first(hf, "intermediate_size", "n_inner"),
        "block_size": first(hf, "max_position_embeddings", "n_positions", "max_seq_len", default=4096),
        "norm_eps": first(hf, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=1e-5),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "activation": activation(hf),
    }
    if traits.get("position_embedding", "rope") == "rope":
        fields.update(rope_fields(hf))
        scaling = fields["rope_scaling"] or {}
        if scaling.get("rope_type") == "dynamic":  # dynamic NTK exists to run past the trained length
            fields["block_size"] = int(fields["block_size"] * max(scaling["factor"], 1.0))
    return fields
