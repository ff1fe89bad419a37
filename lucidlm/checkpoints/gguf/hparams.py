"""A Hugging Face ``config.json`` as the ``{arch}.*`` metadata llama.cpp's ``convert_hf_to_gguf.py``
writes: the inverse of :mod:`~.configs`, which reads those keys back into the same config.

Which GGUF architecture a model becomes comes from :data:`~.tensors.GGUF_FAMILIES` (each family's
``model_type``; Mistral and Mixtral are exported as ``llama``, as llama.cpp does). A setting that
llama.cpp cannot express (YaRN RoPE scaling, Llama-3 RoPE outside a ``llama`` model, a Gemma
attention scale other than the one llama.cpp derives from the layer count, a layer pattern it does
not know, a dense layer in a Qwen MoE) is an :class:`ExportError` rather than a file that computes
something else.

>>> hf = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128,
...       "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
>>> gguf_architecture(hf), architecture_keys(hf, "gpt2")["feed_forward_length"]
('gpt2', 256)
>>> gguf_architecture({"model_type": "bert"})
Traceback (most recent call last):
lucidlm.errors.ExportError: a 'bert' model cannot be exported to GGUF; supported model types: cohere, deepseek_v2, deepseek_v3, falcon, gemma, gemma2, gemma3_text, gpt2, gpt_neox, gpt_oss, granite, llama, mistral, mixtral, nemotron, olmo, olmo2, phi, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe, smollm3, stablelm, starcoder2
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ExportError
from .configs import gemma_attention_scalar, layer_types
from .deepseek2 import deepseek2_keys
from .gpt_oss import SWIGLU_ALPHA, SWIGLU_LIMIT
from .rope_freqs import llama3_factors
from .tensors import GGUF_FAMILIES
from .yarn import yarn_keys

# model types llama.cpp's converter writes as another family's architecture
_ALIASES = {"mistral": "llama", "mixtral": "llama", "deepseek_v3": "deepseek2"}


def _architectures() -> dict[str, str]:
    return {family.model_type: arch for arch, family in GGUF_FAMILIES.items()} | _ALIASES


SUPPORTED_MODEL_TYPES = tuple(sorted(_architectures()))


def gguf_architecture(hf: dict[str, Any]) -> str:
    """The GGUF ``general.architecture`` of an HF config; ExportError naming the supported list."""
    model_type = hf.get("model_type")
    arch = _architectures().get(model_type)
    if arch is None:
        raise ExportError(f"a {model_type!r} model cannot be exported to GGUF; supported model types: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return arch


def architecture_keys(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """``{arch}.<name>`` values (names without the ``{arch}.`` prefix) for an HF config."""
    return _BUILDERS[arch](hf)


# ----------------------------------------------------------------------------- RoPE


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings in transformers 5's ``rope_parameters`` spelling, from either spelling."""
    params = dict(hf.get("rope_parameters") or {})
    old = dict(hf.get("rope_scaling") or {})
    params.setdefault("rope_type", old.pop("type", old.get("rope_type", "default")))
    for key, value in old.items():
        params.setdefault(key, value)
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in hf:
        params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    return params


def _rope_keys(params: dict[str, Any], model: str, llama3: bool = False) -> dict[str, Any]:
    """``rope.freq_base`` and, for linear scaling, ``rope.scaling.*``: what :mod:`.configs` reads.
    ``llama3``: the family carries Llama 3's scaling as the ``rope_freqs`` tensor (:mod:`.rope_freqs`)."""
    keys = {"rope.freq_base": float(params.get("rope_theta", 10000.0))}
    kind = params.get("rope_type", "default")
    if kind == "linear":
        keys |= {"rope.scaling.type": "linear", "rope.scaling.factor": float(params["factor"])}
    elif kind != "default" and not (kind == "llama3" and llama3):
        raise ExportError(f"a {model!r} model with {kind!r} RoPE scaling cannot be exported to GGUF: lucidlm "
                          "reads back only unscaled or linear RoPE, and Llama 3's in a 'llama' model")
    return keys


def rope_freqs(hf: dict[str, Any], arch: str) -> torch.Tensor | None:
    """The ``rope_freqs`` tensor llama.cpp's converter adds to a Llama model with Llama 3 RoPE, else None."""
    params = _rope(hf)
    if arch != "llama" or params["rope_type"] != "llama3":
        return None
    return llama3_factors(params, _head_dim(hf))


# ----------------------------------------------------------------------------- families


def _head_dim(hf: dict[str, Any]) -> int:
    return hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]


def _decoder(hf: dict[str, Any], llama3: bool = False, rope_keys: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keys every RoPE decoder family writes alike (``TextModel.set_gguf_parameters``);
    ``rope_keys``: a family's own ``rope.*`` keys instead of :func:`_rope_keys`' (gpt-oss's YaRN)."""
    heads, head_dim = hf["num_attention_heads"], _head_dim(hf)
    return {
        "context_length": hf["max_position_embeddings"],
        "embedding_length": hf["hidden_size"],
        "block_count": hf["num_hidden_layers"],
        "feed_forward_length": hf["intermediate_size"],
        "attention.head_count": heads,
        "attention.head_count_kv": hf.get("num_key_value_heads") or heads,
        **(_rope_keys(_rope(hf), hf["model_type"], llama3) if rope_keys is None else rope_keys),
    } | ({"attention.layer_norm_rms_epsilon": float(hf["rms_norm_eps"])} if "rms_norm_eps" in hf else {}) | (
        # the converter names the head size only where config.json does (else it is hidden / heads)
        {"attention.key_length": head_dim, "attention.value_length": head_dim} if hf.get("head_dim") else {})


def _llama(hf: dict[str, Any], llama3: bool = True) -> dict[str, Any]:
    keys = _decoder(hf, llama3) | {"vocab_size": hf["vocab_size"], "rope.dimension_count": _head_dim(hf)}
    return keys | (_experts(hf) if hf["model_type"] == "mixtral" else {})


def _experts(hf: dict[str, Any]) -> dict[str, Any]:
    count = hf.get("num_local_experts") or hf["num_experts"]  # the converter reads either name
    return {"expert_count": count, "expert_used_count": hf["num_experts_per_tok"]}


def _qwen_moe(hf: dict[str, Any], normalised: bool) -> dict[str, Any]:
    model = hf["model_type"]
    if (hf.get("decoder_sparse_step") or 1) != 1 or hf.get("mlp_only_layers"):
        raise ExportError(f"a {model!r} model with dense layers (decoder_sparse_step, mlp_only_layers) cannot be "
                          "exported to GGUF: llama.cpp runs every layer as a mixture of experts")
    if bool(hf.get("norm_topk_prob", normalised)) != normalised:
        raise ExportError(f"a {model!r} model with norm_topk_prob={hf['norm_topk_prob']} cannot be exported to "
                          f"GGUF: llama.cpp runs it with norm_topk_prob={normalised}")
    keys = _qwen(hf) | _experts(hf) | {"expert_feed_forward_length": hf["moe_intermediate_size"]}
    if "shared_expert_intermediate_size" in hf:
        keys["expert_shared_feed_forward_length"] = hf["shared_expert_intermediate_size"]
    return keys


def _granite(hf: dict[str, Any]) -> dict[str, Any]:
    keys = {k: v for k, v in _llama(hf, llama3=False).items()
            if k not in ("attention.key_length", "attention.value_length")}
    scales = {"attention_multiplier": "attention.scale", "embedding_multiplier": "embedding_scale",
              "residual_multiplier": "residual_scale", "logits_scaling": "logit_scale"}
    return keys | {key: float(hf[name]) for name, key in scales.items() if hf.get(name)}


def _smollm3(hf: dict[str, Any]) -> dict[str, Any]:
    interval = hf.get("no_rope_layer_interval", 4)
    if hf.get("use_sliding_window") or interval != 4 or hf.get("no_rope_layers") not in (
            None, [int((i + 1) % 4 != 0) for i in range(hf["num_hidden_layers"])]):
        raise ExportError("a 'smollm3' model with a sliding window or a RoPE-free layer other than every 4th "
                          "cannot be exported to GGUF: llama.cpp runs SmolLM3 without RoPE in every 4th layer only")
    return _llama(hf, llama3=False)


def _olmo(hf: dict[str, Any]) -> dict[str, Any]:
    keys = _decoder(hf) | {"attention.layer_norm_epsilon": 1e-5}
    return keys | ({"attention.clamp_kqv": float(hf["clip_qkv"])} if hf.get("clip_qkv") is not None else {})


def _olmo2(hf: dict[str, Any]) -> dict[str, Any]:
    if "sliding_attention" in (hf.get("layer_types") or []):
        raise ExportError("an 'olmo2' model with sliding-window layers cannot be exported to GGUF by lucidlm")
    return _decoder(hf)


def _qwen(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("use_sliding_window"):
        raise ExportError(f"a {hf['model_type']!r} model with use_sliding_window=true cannot be exported to GGUF: "
                          "llama.cpp runs Qwen without a sliding window")
    return _decoder(hf)


def _phi3(hf: dict[str, Any]) -> dict[str, Any]:
    keys = _decoder(hf)
    keys.pop("attention.key_length", None), keys.pop("attention.value_length", None)  # llama.cpp derives them
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    rotary = int(_rope(hf).get("partial_rotary_factor", 1.0) * head_dim)
    original = _rope(hf).get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    return keys | {"rope.dimension_count": rotary, "attention.sliding_window": hf.get("sliding_window") or 0,
                   "rope.scaling.original_context_length": original or hf["max_position_embeddings"]}


def _check_gemma_scale(hf: dict[str, Any], layers_27b: int) -> None:
    expected = gemma_attention_scalar(hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"],
                                      _head_dim(hf), layers_27b)
    if hf.get("query_pre_attn_scalar", expected) != expected:
        raise ExportError(f"a {hf['model_type']!r} model with query_pre_attn_scalar={hf['query_pre_attn_scalar']} "
                          f"cannot be exported to GGUF: llama.cpp scales attention by 1/sqrt({expected}) for this "
                          "shape")


def _check_layers(hf: dict[str, Any], expected: list[str]) -> None:
    found = hf.get("layer_types")
    if found is not None and list(found) != expected:
        raise ExportError(f"a {hf['model_type']!r} model with layer_types={found} cannot be exported to GGUF: "
                          f"llama.cpp knows only the pattern {expected}")


def _gemma2(hf: dict[str, Any]) -> dict[str, Any]:
    _check_gemma_scale(hf, layers_27b=46)
    _check_layers(hf, layer_types(hf["num_hidden_layers"], every=2))
    return _decoder(hf) | {
        "attn_logit_softcapping": float(hf.get("attn_logit_softcapping") or 50.0),
        "final_logit_softcapping": float(hf.get("final_logit_softcapping") or 30.0),
        "attention.sliding_window": hf["sliding_window"],
    }


def _gemma3_rope(hf: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """(global RoPE, local base) from transformers 5's per-layer-type parameters or the older keys."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention", {}).get("rope_theta", 10000.0)
    return _rope(hf), hf.get("rope_local_base_freq", 10000.0)


def _gemma3(hf: dict[str, Any]) -> dict[str, Any]:
    _check_gemma_scale(hf, layers_27b=62)
    n_layer = hf["num_hidden_layers"]
    sliding = "sliding_attention" in (hf.get("layer_types") or ["sliding_attention"])
    _check_layers(hf, layer_types(n_layer, every=6 if sliding else 1))
    if hf.get("attn_logit_softcapping") is not None:
        raise ExportError("a 'gemma3' model with attn_logit_softcapping cannot be exported to GGUF: llama.cpp "
                          "runs Gemma 3 without it")
    full, local = _gemma3_rope(hf)
    keys = {k: v for k, v in _decoder(hf).items() if not k.startswith("rope.")}
    keys |= _rope_keys(full, "gemma3") | {"rope.freq_base_swa": float(local)}
    if sliding:
        keys["attention.sliding_window"] = hf["sliding_window"]
    if hf.get("final_logit_softcapping") is not None:
        keys["final_logit_softcapping"] = float(hf["final_logit_softcapping"])
    return keys


def _starcoder2(hf: dict[str, Any]) -> dict[str, Any]:
    # the converter's generic keys; the LayerNorm eps under norm_epsilon; no sliding window (llama.cpp runs none)
    return _decoder(hf) | {"attention.layer_norm_epsilon": float(hf.get("norm_epsilon", 1e-5))}


def _nemotron(hf: dict[str, Any]) -> dict[str, Any]:
    # NemotronModel: the generic keys (its norm_eps also as the RMS eps), the LayerNorm eps, the vocabulary
    # size, the rotated dims of a head and an explicit scaling type. The converter computes the dims as
    # int(fraction * hidden) // heads, which equals int(fraction * head_dim) whenever head_dim is hidden / heads
    # (every published Nemotron); lucidlm writes the dims its model rotates
    params, eps = _rope(hf), float(hf.get("norm_eps", 1e-5))
    keys = _decoder(hf) | {"vocab_size": hf["vocab_size"], "attention.layer_norm_rms_epsilon": eps,
                           "attention.layer_norm_epsilon": eps,
                           "rope.dimension_count": int(params.get("partial_rotary_factor", 0.5) * _head_dim(hf))}
    return keys if "rope.scaling.type" in keys else keys | {"rope.scaling.type": "none"}


def _stablelm(hf: dict[str, Any]) -> dict[str, Any]:
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    _default_rope_base(hf, "stablelm")
    keys = {k: v for k, v in _decoder(hf).items() if not k.startswith(("attention.", "rope.freq_base"))}
    return keys | {
        "rope.dimension_count": int(_rope(hf).get("partial_rotary_factor", 0.25) * head_dim),
        "attention.head_count": hf["num_attention_heads"],
        "attention.head_count_kv": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "use_parallel_residual": bool(hf.get("use_parallel_residual", False)),
        "attention.layer_norm_epsilon": float(hf.get("layer_norm_eps", 1e-5)),
    }


def _default_rope_base(hf: dict[str, Any], model: str) -> None:
    """The families whose converter writes no RoPE base: llama.cpp runs them with 10000."""
    if (theta := float(_rope(hf).get("rope_theta", 10000.0))) != 10000.0:
        raise ExportError(f"a {model!r} model with rope_theta={theta} cannot be exported to GGUF: llama.cpp runs "
                          "it with 10000")


def _gpt2(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("activation_function", "gelu_new") != "gelu_new" or (hf.get("n_inner") or 4 * hf["n_embd"]) != 4 * hf[
            "n_embd"]:
        raise ExportError("a 'gpt2' model with activation_function other than gelu_new, or n_inner other than "
                          "4 * n_embd, cannot be exported to GGUF: llama.cpp runs GPT-2 with those")
    return {
        "block_count": hf["n_layer"],
        "context_length": hf.get("n_ctx") or hf["n_positions"],
        "embedding_length": hf["n_embd"],
        "feed_forward_length": 4 * hf["n_embd"],
        "attention.head_count": hf["n_head"],
        "attention.layer_norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
    }


def _falcon(hf: dict[str, Any]) -> dict[str, Any]:
    new = bool(hf.get("new_decoder_architecture"))
    if hf.get("alibi") or not hf.get("parallel_attn", True) or not (new or hf.get("multi_query", True)):
        raise ExportError("a 'falcon' model with ALiBi, a sequential block or multi-head KV (falcon-rw) cannot be "
                          "exported to GGUF: lucidlm reads back RoPE Falcons with parallel blocks only")
    hidden = hf["hidden_size"]
    _default_rope_base(hf, "falcon")
    if (hf.get("ffn_hidden_size") or 4 * hidden) != 4 * hidden:
        raise ExportError("a 'falcon' model with ffn_hidden_size other than 4 * hidden_size cannot be exported to "
                          "GGUF: llama.cpp's converter writes 4 * hidden_size")
    return {
        "tensor_data_layout": "jploski",  # the [q; k; v] regrouping (tensors.py)
        "context_length": 2048,  # what llama.cpp's converter writes for every Falcon
        "embedding_length": hidden,
        "feed_forward_length": 4 * hidden,
        "block_count": hf["num_hidden_layers"],
        "attention.head_count": hf["num_attention_heads"],
        "attention.head_count_kv": hf["num_kv_heads"] if new else 1,
        "attention.layer_norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
    }


def _cohere(hf: dict[str, Any]) -> dict[str, Any]:
    if (kind := _rope(hf)["rope_type"]) != "default":
        raise ExportError(f"a 'cohere' model with {kind!r} RoPE scaling cannot be exported to GGUF: llama.cpp's "
                          "converter writes Command-R without RoPE scaling")
    keys = _decoder(hf) | {"logit_scale": float(hf["logit_scale"]), "rope.scaling.type": "none"}
    return keys | {"attention.layer_norm_epsilon": float(hf.get("layer_norm_eps", 1e-5))}


def _rotary_dims(hf: dict[str, Any], head_dim: int) -> int:
    return int(_rope(hf).get("partial_rotary_factor", hf.get("rotary_pct", 1.0)) * head_dim)


def _phi2(hf: dict[str, Any]) -> dict[str, Any]:
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    _default_rope_base(hf, "phi")
    grouped = (hf.get("num_key_value_heads") or heads) != heads
    if hf["intermediate_size"] != 4 * hidden or hf.get("qk_layernorm") or grouped:
        raise ExportError("a 'phi' model with intermediate_size other than 4 * hidden_size, qk_layernorm or grouped "
                          "KV heads cannot be exported to GGUF: llama.cpp runs Phi-2 without them")
    fraction = _rope(hf).get("partial_rotary_factor", 0.5)
    return {
        "context_length": hf["max_position_embeddings"],
        "embedding_length": hidden,
        "feed_forward_length": 4 * hidden,
        "block_count": hf["num_hidden_layers"],
        "attention.head_count": heads,
        "attention.head_count_kv": heads,
        "attention.layer_norm_epsilon": float(hf.get("layer_norm_eps", 1e-5)),
        "rope.dimension_count": int(fraction * hidden) // heads,
    }


def _gptneox(hf: dict[str, Any]) -> dict[str, Any]:
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    _default_rope_base(hf, "gpt_neox")
    return {
        "context_length": hf["max_position_embeddings"],
        "embedding_length": hidden,
        "block_count": hf["num_hidden_layers"],
        "feed_forward_length": hf["intermediate_size"],
        "rope.dimension_count": _rotary_dims(hf, hidden // heads),
        "attention.head_count": heads,
        "use_parallel_residual": bool(hf.get("use_parallel_residual", True)),
        "attention.layer_norm_epsilon": float(hf.get("layer_norm_eps", 1e-5)),
    }


def _gpt_oss(hf: dict[str, Any]) -> dict[str, Any]:
    # llama.cpp runs gpt-oss with a fixed SwiGLU, even layers sliding, and YaRN read back untruncated
    if (float(hf["swiglu_limit"]), float(hf["swiglu_alpha"])) != (SWIGLU_LIMIT, SWIGLU_ALPHA):
        raise ExportError(f"a 'gpt_oss' model with swiglu_limit={hf['swiglu_limit']} or swiglu_alpha="
                          f"{hf['swiglu_alpha']} cannot be exported to GGUF: llama.cpp runs {SWIGLU_LIMIT} and "
                          f"{SWIGLU_ALPHA}")
    _check_layers(hf, layer_types(hf["num_hidden_layers"], every=2))
    head_dim = _head_dim(hf)
    return _decoder(hf, rope_keys=_yarn_keys(_rope(hf))) | {
        "attention.layer_norm_rms_epsilon": float(hf["rms_norm_eps"]),
        "expert_count": hf["num_local_experts"],
        "expert_used_count": hf["num_experts_per_tok"],
        "attention.key_length": head_dim,  # always, where _decoder writes it only for a config's head_dim
        "attention.value_length": head_dim,
        "attention.sliding_window": hf["sliding_window"],
        "expert_feed_forward_length": hf["intermediate_size"],
    }


def _yarn_keys(params: dict[str, Any]) -> dict[str, Any]:
    """``rope.*`` of unscaled or YaRN RoPE, as the converter writes them (what :mod:`.yarn` reads back)."""
    kind, base = params.get("rope_type", "default"), {"rope.freq_base": float(params.get("rope_theta", 10000.0))}
    if kind == "default":
        return base
    if kind != "yarn" or params.get("truncate", True):
        raise ExportError(f"a 'gpt_oss' model with {kind!r} RoPE scaling (truncate={params.get('truncate', True)}) "
                          "cannot be exported to GGUF: lucidlm reads gpt-oss back with untruncated YaRN only")
    return yarn_keys(params) | base


_BUILDERS = {
    "llama": _llama, "granite": _granite, "smollm3": _smollm3, "olmo": _olmo, "olmo2": _olmo2, "qwen2": _qwen, "qwen3": _qwen, "phi3": _phi3, "gemma": _decoder, "gemma2": _gemma2,
    "gemma3": _gemma3, "stablelm": _stablelm, "starcoder2": _starcoder2, "nemotron": _nemotron, "gpt2": _gpt2, "falcon": _falcon, "command-r": _cohere,
    "phi2": _phi2, "gptneox": _gptneox, "qwen2moe": lambda hf: _qwen_moe(hf, normalised=False),
    "qwen3moe": lambda hf: _qwen_moe(hf, normalised=True), "gpt-oss": _gpt_oss,
    "deepseek2": deepseek2_keys,
}  # fmt: skip
