"""One dataclass describes every architecture; a family is a set of field values.

Hugging Face ``config.json`` files map onto :class:`Config` through :data:`FAMILIES` (one entry per
``architectures[0]``: the fixed traits of the family) plus the generic keys read by
:meth:`Config.from_hf`. Adding a family is one entry in :data:`FAMILIES` and, if its weights are
laid out differently, one entry in ``checkpoints/hf.py``.

>>> cfg = Config.from_name("tiny-llama")
>>> cfg.n_layer, cfg.n_query_groups, cfg.mlp
(2, 2, 'glu')
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError, UnsupportedArchitectureError


@dataclasses.dataclass
class Config:
    """Architecture switches. Names follow LitGPT where a LitGPT field exists."""

    name: str = "custom"
    family: str = "llama"  # key in FAMILIES (also decides the checkpoint layout)
    vocab_size: int = 32000
    n_embd: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_query_groups: int | None = None  # KV heads (grouped-query attention); None = n_head
    head_size: int | None = None  # None = n_embd // n_head
    intermediate_size: int | None = None  # None = 4 * n_embd
    block_size: int = 4096  # context length (max_position_embeddings)
    # embeddings / head
    position_embedding: Literal["rope", "learned"] = "rope"
    scale_embeddings: bool = False  # Gemma: multiply embeddings by sqrt(n_embd)
    tie_embeddings: bool = False
    lm_head_bias: bool = False
    final_logit_softcapping: float | None = None
    # norms
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # Gemma: scale by (1 + weight)
    pre_norm: bool = True  # False: OLMo-2 normalises only the sublayer outputs
    post_attention_norm: bool = False  # Gemma 2/3, OLMo-2 sandwich norms
    post_mlp_norm: bool = False
    shared_attention_norm: bool = False  # Phi-2: one norm feeds both attention and MLP
    parallel_residual: bool = False  # GPT-NeoX, Phi-2: x + attn(.) + mlp(.)
    # attention
    attn_bias: bool = False  # bias on q, k, v
    attn_out_bias: bool = False  # bias on the output projection
    qk_norm: Literal[None, "head", "full"] = None  # Qwen3/Gemma3: per head; OLMo-2: whole projection
    attention_scale: float | None = None  # None = head_size ** -0.5 (Gemma: query_pre_attn_scalar)
    attn_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention"/"sliding_attention"
    # rotary embeddings
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0  # partial rotary (NeoX rotary_pct, Phi partial_rotary_factor)
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", ...}
    rope_local_theta: float | None = None  # Gemma 3: base of the sliding-window layers
    # MLP
    mlp: Literal["glu", "mlp", "moe"] = "glu"
    activation: str = "silu"  # silu | gelu | gelu_tanh | relu
    mlp_bias: bool = False
    n_expert: int = 0
    n_expert_per_token: int = 0
    # the Hugging Face config this came from, kept verbatim so saving writes it back
    hf_config: dict[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_size = self.n_embd // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.n_head % self.n_query_groups:
            raise ConfigError(
                f"n_head={self.n_head} must be a multiple of n_query_groups={self.n_query_groups}"
            )
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.n_layer:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries, expected n_layer={self.n_layer}")
        if self.mlp == "moe" and not (0 < self.n_expert_per_token <= self.n_expert):
            raise ConfigError("a 'moe' MLP needs 0 < n_expert_per_token <= n_expert")

    # ---- derived -------------------------------------------------------------------------
    @property
    def rope_n_elem(self) -> int:
        """Number of rotated dimensions per head.

        transformers builds ``dim = int(head_size * fraction)`` inverse frequencies
        ``base ** -(arange(0, dim, 2) / dim)`` and rotates ``2 * ceil(dim / 2)`` dimensions, i.e.
        an odd ``dim`` rotates the next even number of dimensions (with frequencies still divided
        by the odd ``dim``). We follow that convention exactly; see ``model/rope.py``.
        """
        return 2 * math.ceil(int(self.head_size * self.rotary_fraction) / 2)

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` uses sliding-window attention."""
        if self.sliding_window is None:
            return False
        if self.layer_types is None:
            return True
        return self.layer_types[layer] == "sliding_attention"

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        """A registered config by name (see :data:`REGISTRY`), with optional field overrides."""
        if name not in REGISTRY:
            raise ConfigError(f"unknown config name {name!r}; registered: {', '.join(sorted(REGISTRY))}")
        return cls(**{**REGISTRY[name], **overrides})

    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict[str, Any]) -> "Config":
        """Map a Hugging Face ``config.json`` (a path, a directory holding it, or the dict)."""
        hf, source = _read_hf_config(path_or_dict)
        arch = (hf.get("architectures") or [None])[0]
        if arch not in FAMILIES:
            raise UnsupportedArchitectureError(
                f"{source}: architecture {arch!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
            )
        family = FAMILIES[arch]
        fields = {**family["traits"], **_generic_fields(hf, family["traits"])}
        fields.update(family.get("extra", lambda h: {})(hf))
        fields = {k: v for k, v in fields.items() if v is not None or k in _NULLABLE}
        try:
            return cls(name=hf.get("_name_or_path") or arch, family=family["layout"], hf_config=hf, **fields)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from exc


_NULLABLE = {"sliding_window", "layer_types", "rope_scaling", "attn_logit_softcapping",
             "final_logit_softcapping", "attention_scale", "qk_norm", "rope_local_theta"}


def _read_hf_config(path_or_dict: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict), "config dict"
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (expected a Hugging Face config.json)")
    try:
        return json.loads(path.read_text()), str(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc


def _first(hf: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in ``rope_parameters``; 4.x used rope_theta/rope_scaling."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per layer type (Gemma 3)
        params = params["full_attention"]
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", _first(hf, "rope_theta", "rotary_emb_base", default=10000.0))
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
    return params


_SUPPORTED_ROPE = ("default", "llama3", "linear")


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    params = _rope_parameters(hf)
    rope_type = params.get("rope_type", "default")
    if rope_type not in _SUPPORTED_ROPE:
        raise ConfigError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(_SUPPORTED_ROPE)}")
    fraction = _first(hf, "partial_rotary_factor", "rotary_pct", default=params.get("partial_rotary_factor", 1.0))
    scaling = None if rope_type == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_theta": float(params.get("rope_theta", 10000.0)), "rotary_fraction": float(fraction),
            "rope_scaling": scaling}


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}


def _activation(hf: dict[str, Any]) -> str:
    name = _first(hf, "hidden_activation", "hidden_act", "activation_function", default="silu")
    if name not in _ACTIVATIONS:
        raise ConfigError(f"activation {name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _generic_fields(hf: dict[str, Any], traits: dict[str, Any]) -> dict[str, Any]:
    """Keys that mean the same thing in every family's config.json."""
    n_embd = _first(hf, "hidden_size", "n_embd")
    n_head = _first(hf, "num_attention_heads", "n_head")
    fields = {
        "vocab_size": hf.get("vocab_size"),
        "n_embd": n_embd,
        "n_layer": _first(hf, "num_hidden_layers", "n_layer"),
        "n_head": n_head,
        "n_query_groups": _first(hf, "num_key_value_heads", default=n_head),
        "head_size": hf.get("head_dim"),
        "intermediate_size": _first(hf, "intermediate_size", "n_inner"),
        "block_size": _first(hf, "max_position_embeddings", "n_positions", default=4096),
        "norm_eps": _first(hf, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=1e-5),
        "tie_embeddings": hf.get("tie_word_embeddings", True),
        "activation": _activation(hf),
        "sliding_window": hf.get("sliding_window"),
        "layer_types": hf.get("layer_types"),
        "attn_logit_softcapping": hf.get("attn_logit_softcapping"),
        "final_logit_softcapping": hf.get("final_logit_softcapping"),
    }
    if "attention_bias" in hf and "attn_bias" not in traits:
        fields["attn_bias"] = fields["attn_out_bias"] = bool(hf["attention_bias"])
    if "mlp_bias" in hf and "mlp_bias" not in traits:
        fields["mlp_bias"] = bool(hf["mlp_bias"])
    if traits.get("position_embedding", "rope") == "rope":
        fields.update(_rope_fields(hf))
    if hf.get("query_pre_attn_scalar"):
        fields["attention_scale"] = float(hf["query_pre_attn_scalar"]) ** -0.5
    if not (hf.get("sliding_window") and hf.get("use_sliding_window", True)):
        fields["sliding_window"] = None
    return fields


def _qwen2_extra(hf: dict[str, Any]) -> dict[str, Any]:
    # Qwen2 uses the window only above max_window_layers when use_sliding_window is set
    if not hf.get("use_sliding_window") or not hf.get("sliding_window"):
        return {"sliding_window": None, "layer_types": None}
    return {}


def _gemma3_extra(hf: dict[str, Any]) -> dict[str, Any]:
    params = hf.get("rope_parameters") or {}
    local = params.get("sliding_attention", {}).get("rope_theta") if isinstance(params, dict) else None
    return {"rope_local_theta": float(local or hf.get("rope_local_base_freq") or 10000.0)}


def _moe_extra(hf: dict[str, Any]) -> dict[str, Any]:
    return {"n_expert": hf.get("num_local_experts"), "n_expert_per_token": hf.get("num_experts_per_tok")}


def _mistral_extra(hf: dict[str, Any]) -> dict[str, Any]:
    return {"layer_types": None}  # Mistral: the window, when set, applies to every layer


def _gpt2_extra(hf: dict[str, Any]) -> dict[str, Any]:
    return {"tie_embeddings": True}


_LLAMA = dict(norm="rmsnorm", mlp="glu")
_GEMMA = dict(norm="rmsnorm", mlp="glu", norm_unit_offset=True, scale_embeddings=True,
              post_attention_norm=True, post_mlp_norm=True)

#: Hugging Face ``architectures[0]`` -> fixed traits of the family and its checkpoint layout.
FAMILIES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"layout": "llama", "traits": _LLAMA},
    "MistralForCausalLM": {"layout": "llama", "traits": _LLAMA, "extra": _mistral_extra},
    "MixtralForCausalLM": {"layout": "mixtral", "traits": dict(_LLAMA, mlp="moe"),
                           "extra": lambda hf: {**_moe_extra(hf), **_mistral_extra(hf)}},
    "Qwen2ForCausalLM": {"layout": "llama", "traits": dict(_LLAMA, attn_bias=True), "extra": _qwen2_extra},
    "Qwen3ForCausalLM": {"layout": "llama", "traits": dict(_LLAMA, qk_norm="head"), "extra": _qwen2_extra},
    "Gemma2ForCausalLM": {"layout": "gemma", "traits": _GEMMA},
    "Gemma3ForCausalLM": {"layout": "gemma", "traits": dict(_GEMMA, qk_norm="head"), "extra": _gemma3_extra},
    "Olmo2ForCausalLM": {"layout": "olmo2", "traits": dict(_LLAMA, pre_norm=False, post_attention_norm=True,
                                                         post_mlp_norm=True, qk_norm="full")},
    "PhiForCausalLM": {"layout": "phi", "traits": dict(norm="layernorm", mlp="mlp", attn_bias=True, attn_out_bias=True,
                                                      mlp_bias=True, lm_head_bias=True, parallel_residual=True,
                                                      shared_attention_norm=True)},
    "Phi3ForCausalLM": {"layout": "phi3", "traits": _LLAMA},
    "GPT2LMHeadModel": {"layout": "gpt2", "traits": dict(norm="layernorm", mlp="mlp", position_embedding="learned",
                                                        attn_bias=True, attn_out_bias=True, mlp_bias=True),
                        "extra": _gpt2_extra},
    "GPTNeoXForCausalLM": {"layout": "gpt_neox", "traits": dict(norm="layernorm", mlp="mlp", attn_bias=True,
                                                               attn_out_bias=True, mlp_bias=True)},
}


def _neox_extra(hf: dict[str, Any]) -> dict[str, Any]:
    return {"parallel_residual": hf.get("use_parallel_residual", True), "tie_embeddings": hf.get("tie_word_embeddings", False)}


FAMILIES["GPTNeoXForCausalLM"]["extra"] = _neox_extra


def _phi_extra(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("qk_layernorm"):
        raise ConfigError("PhiForCausalLM with qk_layernorm=True is not supported")
    return {"tie_embeddings": hf.get("tie_word_embeddings", False)}


FAMILIES["PhiForCausalLM"]["extra"] = _phi_extra

#: Named configs (``lucidlm models`` lists them). Real sizes of the families we test against.
REGISTRY: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(name="tiny-llama", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_query_groups=2,
                       intermediate_size=128, block_size=256),
    "SmolLM2-135M": dict(name="SmolLM2-135M", vocab_size=49152, n_embd=576, n_layer=30, n_head=9,
                         n_query_groups=3, intermediate_size=1536, block_size=8192, rope_theta=100000.0,
                         norm_eps=1e-5, tie_embeddings=True),
    "Llama-3.2-1B": dict(name="Llama-3.2-1B", vocab_size=128256, n_embd=2048, n_layer=16, n_head=32,
                         n_query_groups=8, head_size=64, intermediate_size=8192, block_size=131072,
                         rope_theta=500000.0, tie_embeddings=True,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "Qwen2.5-0.5B": dict(name="Qwen2.5-0.5B", vocab_size=151936, n_embd=896, n_layer=24, n_head=14,
                         n_query_groups=2, intermediate_size=4864, block_size=32768, attn_bias=True,
                         rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True),
    "pythia-160m": dict(name="pythia-160m", family="gpt_neox", vocab_size=50304, n_embd=768, n_layer=12,
                        n_head=12, intermediate_size=3072, block_size=2048, norm="layernorm", mlp="mlp",
                        activation="gelu", attn_bias=True, attn_out_bias=True, mlp_bias=True,
                        parallel_residual=True, rotary_fraction=0.25),
    "gpt2": dict(name="gpt2", family="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12,
                 block_size=1024, norm="layernorm", mlp="mlp", activation="gelu_tanh", position_embedding="learned",
                 attn_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True),
}
