"""One dataclass describes every architecture; a family is a set of field values.

Hugging Face ``config.json`` files map onto :class:`Config` through :data:`FAMILIES` (one typed
:class:`Family` per ``architectures[0]``: the fixed traits of the family) plus the generic keys read
by :meth:`Config.from_hf`. Adding a family is one :class:`Family` and, if its weights are named
differently, one layout in ``checkpoints/layouts.py``; from outside the package,
:func:`lucidlm.register_family` registers both.

>>> cfg = Config.from_name("tiny-llama")
>>> cfg.n_layer, cfg.n_query_groups, cfg.mlp
(2, 2, 'glu')
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

from .errors import ConfigError, UnsupportedArchitectureError
from .fileio import read_json


@dataclasses.dataclass
class Config:
    """Architecture switches. Names follow LitGPT where a LitGPT field exists."""

    name: str = "custom"
    family: str = "llama"  # the checkpoint layout (checkpoints/layouts.py): how the weights are named
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
    embedding_multiplier: float = 1.0  # Granite: embeddings times this constant
    residual_multiplier: float = 1.0  # Granite: each sublayer's output times this before the residual add
    logit_scale: float = 1.0  # Cohere: logits times this; Granite: 1 / logits_scaling
    tie_embeddings: bool = False
    lm_head_bias: bool = False
    final_logit_softcapping: float | None = None
    # norms
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # Gemma: scale by (1 + weight)
    norm_affine: bool = True  # False: OLMo's LayerNorm with neither weight nor bias
    norm_bias: bool = True  # LayerNorm: False for Cohere's bias-free LayerNorm
    pre_norm: bool = True  # False: OLMo-2 normalises only the sublayer outputs
    post_attention_norm: bool = False  # Gemma 2/3, OLMo-2 sandwich norms
    post_mlp_norm: bool = False
    shared_attention_norm: bool = False  # Phi-2: one norm feeds both attention and MLP
    parallel_residual: bool = False  # GPT-NeoX, Phi-2: x + attn(.) + mlp(.)
    # attention
    attn_bias: bool = False  # bias on q, k, v
    attn_out_bias: bool = False  # bias on the output projection
    qk_norm: Literal[None, "head", "full", "layernorm_per_head", "layernorm_head_weights"] = None
    # Qwen3/Gemma3: RMSNorm per head; OLMo-2: over the whole projection; StableLM: a bias-free LayerNorm
    # module per head; Cohere: one bias-free LayerNorm over head_size with a (heads, head_size) weight
    clip_qkv: float | None = None  # OLMo: clamp q, k and v to [-clip_qkv, clip_qkv]
    attention_scale: float | None = None  # None = head_size ** -0.5 (Gemma: query_pre_attn_scalar)
    attn_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention"/"sliding_attention"
    # rotary embeddings
    rope_theta: float = 10000.0
    rope_interleaved: bool = False  # Cohere, GPT-J: rotate pairs (0,1), (2,3) ... instead of halves
    rotary_fraction: float = 1.0  # partial rotary (NeoX rotary_pct, Phi partial_rotary_factor)
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", ...}
    rope_local_theta: float | None = None  # Gemma 3: base of the sliding-window layers
    rope_layers: tuple[bool, ...] | None = None  # per layer: whether it rotates (SmolLM3); None = all
    # MLP
    mlp: Literal["glu", "mlp", "moe"] = "glu"
    activation: str = "silu"  # silu | gelu | gelu_tanh | relu
    mlp_bias: bool = False
    n_expert: int = 0
    n_expert_per_token: int = 0
    moe_intermediate_size: int | None = None  # each expert's hidden size; None = intermediate_size
    moe_norm_topk: bool = True  # renormalise the top-k routing weights (Mixtral; Qwen-MoE norm_topk_prob)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a shared GLU expert times sigmoid(gate(x)); 0 = none
    moe_layers: tuple[bool, ...] | None = None  # per layer: sparse MoE (True) or a dense GLU; None = all MoE
    # custom components (see docs/custom-models.md): classes built as cls(config, layer) for
    # attention and blocks, cls(config) for the MLP; None = the built-in ones
    attention_class: type | None = None
    mlp_class: type | None = None
    block_class: type | None = None
    # the Hugging Face config this came from, kept verbatim so saving writes it back
    hf_config: dict[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_sizes()
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
        if self.rope_layers is not None:
            self.rope_layers = tuple(bool(r) for r in self.rope_layers)
            if len(self.rope_layers) != self.n_layer:
                raise ConfigError(f"rope_layers has {len(self.rope_layers)} entries, expected n_layer={self.n_layer}")
        if self.moe_layers is not None:
            self.moe_layers = tuple(bool(m) for m in self.moe_layers)
            if len(self.moe_layers) != self.n_layer:
                raise ConfigError(f"moe_layers has {len(self.moe_layers)} entries, expected n_layer={self.n_layer}")
        if self.mlp == "moe" and not (0 < self.n_expert_per_token <= self.n_expert):
            raise ConfigError("a 'moe' MLP needs 0 < n_expert_per_token <= n_expert")

    def _check_sizes(self) -> None:
        """The sizes are positive integers (a string or a negative count from a config.json would
        otherwise fail deep inside torch, or build an empty model)."""
        for name in ("vocab_size", "n_embd", "n_layer", "n_head", "n_query_groups", "head_size",
                     "intermediate_size", "block_size"):
            value = getattr(self, name)
            if value is None and name in ("n_query_groups", "head_size", "intermediate_size"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}: expected a positive integer")

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
        """A config by name: registered (:data:`REGISTRY`, :func:`register_config`) or a real
        checkpoint of the catalogue (:mod:`lucidlm.catalogue`), with optional field overrides. A
        config registered as an instance keeps its own class."""
        if name not in REGISTRY:
            from .catalogue import CATALOGUE, config

            if name in CATALOGUE:
                return dataclasses.replace(config(name), **overrides)
            raise ConfigError(f"unknown config name {name!r}; registered: {', '.join(sorted(REGISTRY))}; "
                              f"catalogue: {', '.join(sorted(CATALOGUE))}")
        entry = REGISTRY[name]
        if isinstance(entry, Config):
            return dataclasses.replace(entry, **overrides)
        return cls(**{**entry, **overrides})

    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict[str, Any]) -> "Config":
        """Map a Hugging Face ``config.json`` (a path, a directory holding it, or the dict).

        Keys missing from the file take the family's transformers default (``Family.defaults``),
        so a sparse config means what it means to transformers.
        """
        raw, source = _read_hf_config(path_or_dict)
        arch = _architecture_of(raw)
        if arch not in FAMILIES:
            raise UnsupportedArchitectureError(
                f"{source}: architecture {arch!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
            )
        family = FAMILIES[arch]
        hf = {**family.defaults, **raw}
        try:
            fields = {**family.traits, **_generic_fields(hf, family.traits)}
            for reader in family.readers:
                fields.update(reader(hf))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        # a value of the wrong type (a string for a number, a number for a dict...) fails inside
        # a reader's arithmetic: name the file and say what went wrong, not where
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError,
                OverflowError) as exc:
            raise ConfigError(f"{source}: a field has a value of the wrong type or range "
                              f"({type(exc).__name__}: {exc})") from exc
        fields = {k: v for k, v in fields.items() if v is not None or k in _NULLABLE}
        fields.setdefault("family", family.layout)  # a reader may pick a layout variant (Falcon's norms)
        try:
            return cls(name=raw.get("_name_or_path") or arch, hf_config=raw, **fields)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        except (TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
            raise ConfigError(f"{source}: {type(exc).__name__}: {exc}") from exc


_NULLABLE = {"sliding_window", "layer_types", "rope_scaling", "attn_logit_softcapping",
             "final_logit_softcapping", "attention_scale", "qk_norm", "rope_local_theta", "clip_qkv",
             "rope_layers", "moe_layers", "moe_intermediate_size"}


def _read_hf_config(path_or_dict: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict), "config dict"
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    return read_json(path, ConfigError, "a Hugging Face config.json"), str(path)


def _first(hf: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings with transformers' precedence: ``rope_scaling`` (4.x), else ``rope_parameters``
    (5.x; per layer type for Gemma 3), then the top-level ``rope_theta``/``partial_rotary_factor``."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if "full_attention" in params:  # per layer type (Gemma 3)
        params = params["full_attention"]
    params = dict(params)
    params.setdefault("rope_theta", _first(hf, "rope_theta", "rotary_emb_base", default=10000.0))
    fraction = _first(hf, "partial_rotary_factor", "rotary_pct")
    if fraction is not None:
        params.setdefault("partial_rotary_factor", fraction)
    params["rope_type"] = params.get("rope_type", params.pop("type", "default"))
    return params


_SUPPORTED_ROPE = ("default", "llama3", "linear")


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    params = _rope_parameters(hf)
    rope_type = params["rope_type"]
    if rope_type not in _SUPPORTED_ROPE:
        raise ConfigError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(_SUPPORTED_ROPE)}")
    scaling = None if rope_type == "default" else {
        k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return {"rope_theta": float(params["rope_theta"]),
            "rotary_fraction": float(params.get("partial_rotary_factor", 1.0)), "rope_scaling": scaling}


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}


def _activation(hf: dict[str, Any]) -> str:
    name = _first(hf, "hidden_activation", "hidden_act", "activation_function", default="silu")
    if name not in _ACTIVATIONS:
        raise ConfigError(f"activation {name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _generic_fields(hf: dict[str, Any], traits: dict[str, Any]) -> dict[str, Any]:
    """Keys that mean the same thing in every family's config.json (sliding windows, biases and
    soft-caps are read per family: transformers ignores them where the family has no such option)."""
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
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "activation": _activation(hf),
    }
    if traits.get("position_embedding", "rope") == "rope":
        fields.update(_rope_fields(hf))
    return fields


# ---- per-family readers: each returns the fields one family derives from its own keys ----------
def _n_layer(hf: dict[str, Any]) -> int:
    return _first(hf, "num_hidden_layers", "n_layer")


def _bias(hf: dict[str, Any]) -> dict[str, Any]:  # attention_bias: q, k, v and o
    return {"attn_bias": bool(hf.get("attention_bias")), "attn_out_bias": bool(hf.get("attention_bias"))}


def _mlp_bias(hf: dict[str, Any]) -> dict[str, Any]:
    return {"mlp_bias": bool(hf.get("mlp_bias"))}


def _window_everywhere(hf: dict[str, Any]) -> dict[str, Any]:
    # Mistral, Mixtral, Phi-3: the window, when set, applies to every layer (layer_types is ignored)
    return {"sliding_window": hf.get("sliding_window"), "layer_types": None}


def _qwen_windows(hf: dict[str, Any]) -> dict[str, Any]:
    # the window only counts with use_sliding_window, and then for layers >= max_window_layers
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    first = hf.get("max_window_layers", 28)
    types = hf.get("layer_types") or ["sliding_attention" if window is not None and i >= first
                                      else "full_attention" for i in range(_n_layer(hf))]
    return {"sliding_window": window, "layer_types": types}


def _gemma(hf: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2/3: every ``sliding_window_pattern``-th layer is global (Gemma 2: every 2nd)."""
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=True is not supported (lucidlm is causal only)")
    pattern = hf["sliding_window_pattern"]
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                      for i in range(_n_layer(hf))]
    return {"sliding_window": hf.get("sliding_window"), "layer_types": types,
            "attn_logit_softcapping": hf.get("attn_logit_softcapping"),
            "final_logit_softcapping": hf.get("final_logit_softcapping"),
            "attention_scale": float(hf["query_pre_attn_scalar"]) ** -0.5}


def _gemma3_rope(hf: dict[str, Any]) -> dict[str, Any]:
    params = hf.get("rope_parameters") or {}
    local = params.get("sliding_attention", {}).get("rope_theta") if "sliding_attention" in params else None
    return {"rope_local_theta": float(local or hf["rope_local_base_freq"])}


def _moe(hf: dict[str, Any]) -> dict[str, Any]:
    return {"n_expert": hf.get("num_local_experts"), "n_expert_per_token": hf.get("num_experts_per_tok")}


def _gpt2(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ConfigError("GPT2LMHeadModel with scale_attn_by_inverse_layer_idx=True is not supported")
    # GPT-2 reads neither head_dim nor intermediate_size (n_inner or 4 * n_embd)
    return {"head_size": None, "intermediate_size": hf.get("n_inner"),
            "attention_scale": None if hf.get("scale_attn_weights", True) else 1.0}


def _gptj(hf: dict[str, Any]) -> dict[str, Any]:
    """GPT-J: ``rotary_dim`` dimensions of each head rotate (None: all of ``n_embd``, which only fits
    one head); neither head_dim nor intermediate_size is read (n_inner or 4 * n_embd)."""
    n_embd, n_head = _first(hf, "n_embd", "hidden_size"), _first(hf, "n_head", "num_attention_heads")
    head_size = n_embd // n_head
    rotary_dim = hf.get("rotary_dim") or n_embd
    if rotary_dim > head_size or rotary_dim % 2:
        raise ConfigError(f"GPTJForCausalLM with rotary_dim={rotary_dim} is not supported "
                          f"(expected an even number <= head size {head_size})")
    fraction = rotary_dim / head_size
    if int(head_size * fraction) != rotary_dim:
        raise ConfigError(f"GPTJForCausalLM: rotary_dim={rotary_dim} is not representable as a fraction of {head_size}")
    return {"head_size": None, "intermediate_size": hf.get("n_inner"), "rotary_fraction": fraction,
            "rope_theta": 10000.0, "rope_scaling": None}


def _qwen_moe(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-/Qwen3-MoE: layer i is sparse unless it is in ``mlp_only_layers`` or
    ``(i + 1) % decoder_sparse_step``; experts of ``moe_intermediate_size``; Qwen2-MoE adds a gated
    shared expert (``shared_expert_intermediate_size``)."""
    n_expert = _first(hf, "num_experts", "num_local_experts", default=0)  # Qwen3-MoE 5.x writes the latter
    dense = set(hf.get("mlp_only_layers") or ())
    step = hf["decoder_sparse_step"]
    sparse = [i not in dense and n_expert > 0 and (i + 1) % step == 0 for i in range(_n_layer(hf))]
    if not any(sparse):
        return {"mlp": "glu", "n_expert": 0, "n_expert_per_token": 0}
    return {"n_expert": n_expert, "n_expert_per_token": hf["num_experts_per_tok"],
            "moe_intermediate_size": hf["moe_intermediate_size"], "moe_norm_topk": bool(hf["norm_topk_prob"]),
            "shared_expert_intermediate_size": hf.get("shared_expert_intermediate_size") or 0,
            "moe_layers": None if all(sparse) else tuple(sparse)}


def _qwen2_moe_windows(hf: dict[str, Any]) -> dict[str, Any]:
    # Qwen2-MoE: with use_sliding_window, the even layers below max_window_layers slide
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    first = hf.get("max_window_layers", 28)
    types = hf.get("layer_types") or ["sliding_attention" if window and (i + 1) % 2 and i < first
                                      else "full_attention" for i in range(_n_layer(hf))]
    return {"sliding_window": window or None, "layer_types": types}


def _qwen3_moe_windows(hf: dict[str, Any]) -> dict[str, Any]:
    # Qwen3-MoE: the window, with use_sliding_window, applies to every layer
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    return {"sliding_window": window or None, "layer_types": None}


def _neox(hf: dict[str, Any]) -> dict[str, Any]:
    return {"parallel_residual": bool(hf["use_parallel_residual"]), "head_size": None, **_bias(hf)}


def _gemma1(hf: dict[str, Any]) -> dict[str, Any]:
    # GemmaConfig reads hidden_act only (not hidden_activation) and turns the legacy "gelu" into tanh
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=True is not supported (lucidlm is causal only)")
    act = hf.get("hidden_act") or "gelu_pytorch_tanh"
    return {"activation": _activation({"hidden_act": "gelu_pytorch_tanh" if act == "gelu" else act})}


def _stablelm(hf: dict[str, Any]) -> dict[str, Any]:
    # StableLM ignores head_dim; the shared input norm feeds both branches of the parallel block
    parallel = bool(hf.get("use_parallel_residual"))
    return {"head_size": None, "attn_bias": bool(hf.get("use_qkv_bias")), "parallel_residual": parallel,
            "shared_attention_norm": parallel, "qk_norm": "layernorm_per_head" if hf.get("qk_layernorm") else None}


def _smollm3(hf: dict[str, Any]) -> dict[str, Any]:
    """SmolLM3: ``no_rope_layers`` (1 = the layer rotates; default every ``no_rope_layer_interval``-th
    layer does not); sliding windows only on layers without RoPE, and only with use_sliding_window."""
    n = _n_layer(hf)
    interval = hf["no_rope_layer_interval"]
    rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    window = hf.get("sliding_window")
    types = hf.get("layer_types") or [
        "sliding_attention" if hf.get("use_sliding_window") and window is not None and not rope[i]
        else "full_attention" for i in range(n)]
    if "sliding_attention" not in types:
        window = None
    return {"rope_layers": tuple(bool(r) for r in rope[:n]), "sliding_window": window, "layer_types": types}


def _olmo(hf: dict[str, Any]) -> dict[str, Any]:
    # OlmoLayerNorm has a fixed eps of 1e-5 and no parameters
    clip = hf.get("clip_qkv")
    return {"norm_eps": 1e-5, "clip_qkv": None if clip is None else float(clip), **_bias(hf)}


def _granite(hf: dict[str, Any]) -> dict[str, Any]:
    return {"embedding_multiplier": float(hf["embedding_multiplier"]),
            "residual_multiplier": float(hf["residual_multiplier"]),
            "attention_scale": float(hf["attention_multiplier"]), "logit_scale": 1.0 / float(hf["logits_scaling"])}


def _cohere(hf: dict[str, Any]) -> dict[str, Any]:
    return {"logit_scale": float(hf["logit_scale"]), **_bias(hf),
            "qk_norm": "layernorm_head_weights" if hf.get("use_qk_norm") else None}


def _falcon(hf: dict[str, Any]) -> dict[str, Any]:
    """Falcon, as transformers' FalconDecoderLayer reads it: the old architecture (falcon-7b) is
    parallel with one shared ``input_layernorm`` (or sequential with ``parallel_attn=False``) and
    multi-query (one KV head) unless ``multi_query=False``; ``new_decoder_architecture`` (falcon-40b)
    has ``num_kv_heads`` groups and, with ``num_ln_in_parallel_attn`` 2 (its default), the norms
    ``ln_attn``/``ln_mlp`` (layout ``falcon_new``), with 1 one shared ``input_layernorm``."""
    if hf.get("alibi"):
        raise ConfigError("FalconForCausalLM with alibi=True is not supported (ALiBi positions)")
    n_head = hf["num_attention_heads"]
    kv = hf.get("num_kv_heads") or n_head
    parallel, n_ln = bool(hf.get("parallel_attn")), hf.get("num_ln_in_parallel_attn")
    layout = "falcon"
    if hf.get("new_decoder_architecture"):
        if not parallel:  # transformers builds input/post_attention norms and then calls ln_attn
            raise ConfigError("FalconForCausalLM with new_decoder_architecture=True and parallel_attn=False "
                              "is not supported (transformers cannot run it either)")
        if n_ln not in (None, 1, 2):
            raise ConfigError(f"FalconForCausalLM with num_ln_in_parallel_attn={n_ln} is not supported")
        groups, shared = kv, n_ln == 1
        layout = "falcon" if shared else "falcon_new"
    else:
        if parallel and n_ln == 2:  # transformers builds ln_attn/ln_mlp and then calls input_layernorm
            raise ConfigError("FalconForCausalLM with num_ln_in_parallel_attn=2 needs new_decoder_architecture")
        if not hf.get("multi_query") and kv != n_head:
            raise ConfigError(f"FalconForCausalLM with multi_query=False needs num_kv_heads={n_head}, got {kv}")
        groups, shared = (1 if hf.get("multi_query") else n_head), parallel
    bias = bool(hf.get("bias"))
    n_embd = _first(hf, "n_embed", "hidden_size")  # FalconConfig: the legacy n_embed wins
    return {"family": layout, "n_embd": n_embd, "n_query_groups": groups, "head_size": None,
            "intermediate_size": hf.get("ffn_hidden_size") or 4 * n_embd, "parallel_residual": parallel,
            "shared_attention_norm": shared, "attn_bias": bias, "attn_out_bias": bias, "mlp_bias": bias,
            "activation": _activation({"hidden_act": hf["activation"]})}


def _phi(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("qk_layernorm"):
        raise ConfigError("PhiForCausalLM with qk_layernorm=True is not supported")
    return {}


_LLAMA = dict(norm="rmsnorm", mlp="glu")
_GEMMA = dict(norm="rmsnorm", mlp="glu", norm_unit_offset=True, scale_embeddings=True,
              post_attention_norm=True, post_mlp_norm=True)
#: transformers' config-class defaults for the keys we read (a key missing from config.json)
_LLAMA_DEFAULTS = dict(tie_word_embeddings=False, rms_norm_eps=1e-6, hidden_act="silu")
_GEMMA_DEFAULTS = dict(tie_word_embeddings=True, rms_norm_eps=1e-6, head_dim=256, query_pre_attn_scalar=256,
                       hidden_activation="gelu_pytorch_tanh", sliding_window=4096)
_QWEN_DEFAULTS = dict(_LLAMA_DEFAULTS, sliding_window=4096, use_sliding_window=False, max_window_layers=28)


@dataclasses.dataclass(frozen=True)
class Family:
    """One Hugging Face architecture: how its ``config.json`` maps onto :class:`Config`.

    ``architecture``: ``architectures[0]`` in config.json; ``layout``: the weight-name layout
    (``checkpoints/layouts.py``, or one registered with :func:`lucidlm.register_family`);
    ``traits``: the Config fields every model of the family shares; ``defaults``: transformers'
    config-class defaults of the keys we read (a missing key means what it means there);
    ``readers``: functions ``config.json dict -> Config fields`` for the family's own keys;
    ``model_type``: its ``model_type`` (for a config.json that names no architecture).
    """

    architecture: str
    layout: str
    traits: dict[str, Any]
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    readers: tuple[Callable[[dict[str, Any]], dict[str, Any]], ...] = ()
    model_type: str | None = None


#: ``architectures[0]`` -> its :class:`Family` (the one family table; :func:`register_family` adds)
FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Teach :meth:`Config.from_hf` a new architecture. Its weight layout is registered with
    :func:`lucidlm.checkpoints.layouts.register_layout`; :func:`lucidlm.register_family` does both."""
    if not isinstance(family, Family):
        raise ConfigError(f"register_family: expected a Family, got {type(family).__name__}")
    FAMILIES[family.architecture] = family
    return family


for _family in (
    Family("LlamaForCausalLM", "llama", _LLAMA, _LLAMA_DEFAULTS, (_bias, _mlp_bias), "llama"),
    Family("MistralForCausalLM", "llama", _LLAMA, dict(_LLAMA_DEFAULTS, sliding_window=4096), (_window_everywhere,),
           "mistral"),
    Family("MixtralForCausalLM", "mixtral", dict(_LLAMA, mlp="moe"),
           dict(_LLAMA_DEFAULTS, rms_norm_eps=1e-5, rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2),
           (_moe, _window_everywhere), "mixtral"),
    Family("Qwen2ForCausalLM", "llama", dict(_LLAMA, attn_bias=True), _QWEN_DEFAULTS, (_qwen_windows,), "qwen2"),
    Family("Qwen3ForCausalLM", "llama", dict(_LLAMA, qk_norm="head"), dict(_QWEN_DEFAULTS, head_dim=128),
           (_bias, _qwen_windows), "qwen3"),
    Family("Gemma2ForCausalLM", "gemma", _GEMMA,
           dict(_GEMMA_DEFAULTS, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
           (_bias, lambda hf: _gemma({**hf, "sliding_window_pattern": 2})), "gemma2"),
    Family("Gemma3ForCausalLM", "gemma", dict(_GEMMA, qk_norm="head"),
           dict(_GEMMA_DEFAULTS, sliding_window_pattern=6, rope_theta=1e6, rope_local_base_freq=10000.0),
           (_bias, _gemma, _gemma3_rope), "gemma3_text"),
    Family("GemmaForCausalLM", "llama", dict(_LLAMA, norm_unit_offset=True, scale_embeddings=True),
           dict(tie_word_embeddings=True, rms_norm_eps=1e-6, head_dim=256, hidden_act="gelu_pytorch_tanh"),
           (_bias, _gemma1), "gemma"),
    Family("StableLmForCausalLM", "stablelm", dict(norm="layernorm", mlp="glu"),
           dict(tie_word_embeddings=False, layer_norm_eps=1e-5, hidden_act="silu", partial_rotary_factor=0.25,
                use_qkv_bias=False, qk_layernorm=False, use_parallel_residual=False),
           (_stablelm,), "stablelm"),
    Family("SmolLM3ForCausalLM", "llama", _LLAMA,
           dict(_LLAMA_DEFAULTS, tie_word_embeddings=True, no_rope_layer_interval=4, use_sliding_window=False),
           (_bias, _mlp_bias, _smollm3), "smollm3"),
    Family("OlmoForCausalLM", "llama", dict(_LLAMA, norm="layernorm", norm_affine=False),
           dict(tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=2048), (_olmo,), "olmo"),
    Family("GraniteForCausalLM", "llama", _LLAMA,
           dict(_LLAMA_DEFAULTS, max_position_embeddings=2048, embedding_multiplier=1.0, residual_multiplier=1.0,
                attention_multiplier=1.0, logits_scaling=1.0),
           (_bias, _mlp_bias, _granite), "granite"),
    Family("CohereForCausalLM", "llama",
           dict(norm="layernorm", norm_bias=False, mlp="glu", parallel_residual=True, shared_attention_norm=True,
                rope_interleaved=True),
           dict(tie_word_embeddings=True, layer_norm_eps=1e-5, hidden_act="silu", max_position_embeddings=8192,
                logit_scale=0.0625, use_qk_norm=False),
           (_cohere,), "cohere"),
    Family("Olmo2ForCausalLM", "olmo2",
           dict(_LLAMA, pre_norm=False, post_attention_norm=True, post_mlp_norm=True, qk_norm="full"),
           dict(_LLAMA_DEFAULTS, rms_norm_eps=1e-5), (_bias,), "olmo2"),
    Family("PhiForCausalLM", "phi",
           dict(norm="layernorm", mlp="mlp", attn_bias=True, attn_out_bias=True, mlp_bias=True, lm_head_bias=True,
                parallel_residual=True, shared_attention_norm=True),
           dict(tie_word_embeddings=False, layer_norm_eps=1e-5, hidden_act="gelu_new", partial_rotary_factor=0.5),
           (_phi,), "phi"),
    Family("Phi3ForCausalLM", "phi3", _LLAMA, dict(_LLAMA_DEFAULTS, rms_norm_eps=1e-5), (_window_everywhere,), "phi3"),
    Family("GPT2LMHeadModel", "gpt2",
           dict(norm="layernorm", mlp="mlp", position_embedding="learned", attn_bias=True, attn_out_bias=True,
                mlp_bias=True),
           dict(tie_word_embeddings=True, layer_norm_epsilon=1e-5, activation_function="gelu_new", n_positions=1024),
           (_gpt2,), "gpt2"),
    Family("GPTJForCausalLM", "gptj",
           dict(norm="layernorm", mlp="mlp", mlp_bias=True, lm_head_bias=True, parallel_residual=True,
                shared_attention_norm=True, rope_interleaved=True),
           dict(tie_word_embeddings=False, layer_norm_epsilon=1e-5, activation_function="gelu_new", n_positions=2048,
                rotary_dim=64),
           (_gptj,), "gptj"),
    Family("Qwen2MoeForCausalLM", "qwen_moe", dict(_LLAMA, mlp="moe", attn_bias=True),
           dict(_QWEN_DEFAULTS, rope_theta=10000.0, decoder_sparse_step=1, moe_intermediate_size=1408,
                shared_expert_intermediate_size=5632, num_experts_per_tok=4, num_experts=60, norm_topk_prob=False,
                qkv_bias=True),
           (lambda hf: {"attn_bias": bool(hf["qkv_bias"])}, _qwen_moe, _qwen2_moe_windows), "qwen2_moe"),
    Family("Qwen3MoeForCausalLM", "qwen_moe", dict(_LLAMA, mlp="moe", qk_norm="head"),
           dict(_QWEN_DEFAULTS, rope_theta=10000.0, decoder_sparse_step=1, moe_intermediate_size=768,
                num_experts_per_tok=8, num_local_experts=128, norm_topk_prob=False),
           (_bias, _qwen_moe, _qwen3_moe_windows), "qwen3_moe"),
    Family("FalconForCausalLM", "falcon", dict(norm="layernorm", mlp="mlp"),
           dict(vocab_size=65024, hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
                layer_norm_epsilon=1e-5, max_position_embeddings=2048, tie_word_embeddings=True, alibi=False,
                new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False,
                activation="gelu"),
           (_falcon,), "falcon"),
    Family("GPTNeoXForCausalLM", "gpt_neox", dict(norm="layernorm", mlp="mlp", mlp_bias=True),
           dict(tie_word_embeddings=False, layer_norm_eps=1e-5, hidden_act="gelu", rotary_pct=0.25,
                rotary_emb_base=10000, use_parallel_residual=True, attention_bias=True),
           (_neox,), "gpt_neox"),
):
    register_family(_family)


def _architecture_of(raw: dict[str, Any]) -> str | None:
    """``architectures[0]``, or the architecture registered for ``model_type``."""
    if raw.get("architectures"):
        return raw["architectures"][0]
    return next((f.architecture for f in FAMILIES.values() if f.model_type == raw.get("model_type")), None)

#: Named configs besides the catalogue's real checkpoints (``lucidlm models`` lists both).
REGISTRY: dict[str, dict[str, Any] | Config] = {
    "tiny-llama": dict(name="tiny-llama", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_query_groups=2,
                       intermediate_size=128, block_size=256),
}


#: classes a checkpoint may name (config subclasses and custom components), by qualified name;
#: filled by :func:`register_config`/:func:`register_component`. Loading never imports a module
#: a file names: an unregistered class is an error.
COMPONENTS: dict[str, type] = {}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_component(cls: type) -> type:
    """Allow checkpoints to name ``cls`` (a Config subclass or a custom module); usable as a decorator."""
    COMPONENTS[qualified_name(cls)] = cls
    return cls


def register_config(config: Config | dict[str, Any], name: str | None = None) -> Config | dict[str, Any]:
    """Make ``config`` available as ``Config.from_name(name)`` (default: ``config.name``) and
    ``lucidlm models``; its class and custom components become loadable from checkpoints.

    >>> @dataclasses.dataclass
    ... class Mine(Config):
    ...     custom_param: float = 0.1
    >>> _ = register_config(Mine(name="mine-tiny", vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    >>> Config.from_name("mine-tiny").custom_param
    0.1
    """
    if isinstance(config, Config):
        name = name or config.name
        register_component(type(config))
        for cls in (config.attention_class, config.mlp_class, config.block_class):
            if cls is not None:
                register_component(cls)
    elif isinstance(config, dict):
        name = name or config.get("name")
        Config(**config)  # validate now, not at first use
    else:
        raise ConfigError(f"register_config: expected a Config or a dict of its fields, got {type(config).__name__}")
    if not name:
        raise ConfigError("register_config: the config needs a name (pass name=...)")
    REGISTRY[name] = config
    return config
