"""One dataclass describes every architecture; a family is a set of field values.

:class:`Config` is plain data: its fields are the architecture switches the model reads. It is
built from a Hugging Face ``config.json`` (:meth:`Config.from_hf`, through the family table of
:mod:`lucidlm.families`), by name (:meth:`Config.from_name`: a config registered with
:func:`register_config`, or a real checkpoint of :mod:`lucidlm.catalogue`), or directly. Adding a
family is one :class:`~lucidlm.families.Family` and, if its weights are named differently, one
layout in ``checkpoints/layouts.py``; from outside the package, :func:`lucidlm.register_family`
registers both.

>>> cfg = Config.from_name("tiny-llama")
>>> cfg.n_layer, cfg.n_query_groups, cfg.mlp
(2, 2, 'glu')
>>> Config.from_name("SmolLM2-135M-Instruct").n_embd  # the catalogue's published config.json
576
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

from .catalogue import CATALOGUE, CONFIGS
from .errors import ConfigError, UnsupportedArchitectureError
from .families import (COMPONENTS, FAMILIES, REGISTRY, Family, architecture_of, qualified_name,
                        register_component, register_family)
from .families.deepseek import check_deepseek
from .families.fields import read_hf_config

# the registries and the family type, where they were always imported from (lucidlm.families holds them)
__all__ = ["COMPONENTS", "FAMILIES", "REGISTRY", "Config", "Family", "qualified_name", "register_component",
           "register_config", "register_family"]


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
    norm_unit_offset: bool = False  # Gemma (RMSNorm), Nemotron (LayerNorm1P): scale by (1 + weight)
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
    qk_norm: Literal[None, "head", "full", "layernorm_per_head", "layernorm_head_weights", "layernorm_head"] = None
    # Qwen3/Gemma3: RMSNorm per head; OLMo-2: over the whole projection; StableLM: a bias-free LayerNorm
    # module per head; Cohere: one bias-free LayerNorm over head_size with a (heads, head_size) weight
    clip_qkv: float | None = None  # OLMo: clamp q, k and v to [-clip_qkv, clip_qkv]
    attention_scale: float | None = None  # None = head_size ** -0.5 (Gemma: query_pre_attn_scalar)
    attn_logit_softcapping: float | None = None
    attn_sinks: bool = False  # gpt-oss: a learned per-head logit in every softmax that takes mass, adds no value
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention"/"sliding_attention"
    # rotary embeddings
    rope_theta: float = 10000.0
    rope_interleaved: bool = False  # Cohere, GPT-J: rotate pairs (0,1), (2,3) ... instead of halves
    rotary_fraction: float = 1.0  # partial rotary (NeoX rotary_pct, Phi partial_rotary_factor)
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"llama3"|"yarn"|"longrope"|"dynamic", ...}
    rope_local_theta: float | None = None  # Gemma 3: base of the sliding-window layers
    rope_layers: tuple[bool, ...] | None = None  # per layer: whether it rotates (SmolLM3); None = all
    # MLP
    mlp: Literal["glu", "mlp", "moe", "clamped_moe", "deepseek_moe", "dbrx_moe", "jetmoe_moe"] = "glu"
    # clamped_moe: gpt-oss's experts; dbrx_moe / jetmoe_moe: DBRX's and JetMoE's stacked GLU experts
    activation: str = "silu"  # silu | gelu | gelu_tanh | relu | relu2 | xielu
    mlp_bias: bool = False
    n_expert: int = 0
    n_expert_per_token: int = 0
    moe_intermediate_size: int | None = None  # each expert's hidden size; None = intermediate_size
    moe_norm_topk: bool = True  # renormalise the top-k routing weights (Mixtral; Qwen-MoE norm_topk_prob)
    moe_norm_p: float = 1.0  # DBRX (dbrx_moe): ... by their p-norm (moe_normalize_expert_weights)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a shared GLU expert times sigmoid(gate(x)); 0 = none
    moe_layers: tuple[bool, ...] | None = None  # per layer: sparse MoE (True) or a dense GLU; None = all MoE
    # how mlp="moe" routes (lucidlm.model.mlp.MoE.route): the top-k of the softmax (Mixtral, Qwen-MoE, OLMoE), the
    # softmax of the top-k logits (GraniteMoE), or PhiMoE's sparsemixer top-2 with its threshold moe_jitter_eps
    moe_routing: Literal["softmax_topk", "topk_softmax", "sparsemixer"] = "softmax_topk"
    moe_jitter_eps: float = 0.01  # PhiMoE router_jitter_noise: experts within 2 * eps (relative) of the best
    swiglu_alpha: float = 1.702  # gpt-oss clamped SwiGLU: gate * sigmoid(alpha * gate) * (up + 1)
    swiglu_limit: float = 7.0  # ... with gate clamped above and up on both sides at this limit
    # DeepSeek's MoE (mlp="deepseek_moe", lucidlm.model.mlp.DeepSeekMoE): grouped top-k routing
    moe_scoring: Literal["softmax", "sigmoid"] = "softmax"  # V2 softmax | V3 sigmoid + e_score_correction_bias
    topk_method: Literal["greedy", "group_limited_greedy"] = "greedy"  # V2's choice among groups (V3: grouped)
    n_group: int = 1  # experts in n_group groups, the top-k taken within the best topk_group groups
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # the routing weights times this
    n_shared_experts: int = 0  # an always-on GLU of moe_intermediate_size * n_shared_experts
    # multi-head latent attention (DeepSeek-V2/V3, lucidlm.model.mla); kv_lora_rank None = not MLA
    q_lora_rank: int | None = None  # None: a full-rank q_proj (V2-Lite)
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 0  # per-head key dims without RoPE (from the latent)
    qk_rope_head_dim: int = 0  # the rotary key dims, one key shared by all heads
    v_head_dim: int = 0
    # JetMoE's mixture of attention heads (lucidlm.model.moa): n_expert query/output projection pairs, the
    # router's n_expert_per_token chosen per token, each a head group over the n_query_groups shared k/v heads
    moa: bool = False
    block_norm_eps: float | None = None  # the blocks' norms' eps where it differs from the final norm's (JetMoE)
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
        routed = self.mlp in ("moe", "clamped_moe", "deepseek_moe", "dbrx_moe", "jetmoe_moe")
        if (routed or self.moa) and not (0 < self.n_expert_per_token <= self.n_expert):
            raise ConfigError(f"a {'mixture of attention heads' if self.moa else repr(self.mlp) + ' MLP'} needs "
                              f"0 < n_expert_per_token <= n_expert, got {self.n_expert_per_token} and {self.n_expert}")
        if self.moe_routing == "sparsemixer" and self.mlp == "moe" and self.n_expert_per_token != 2:
            raise ConfigError(f"n_expert_per_token={self.n_expert_per_token}: sparsemixer routing picks exactly 2")
        if self.activation == "xielu" and self.mlp != "mlp":  # its slopes are learned per plain MLP
            raise ConfigError(f"activation='xielu' needs mlp='mlp' (Apertus' MLP), got mlp={self.mlp!r}")
        check_deepseek(self)

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

    def kv_slot_sizes(self) -> tuple[int, int, int]:
        """What one KV-cache slot of a layer holds: (groups, key size, value size): full keys and
        values per KV head, or for multi-head latent attention (:mod:`lucidlm.model.mla`) the
        latent and the shared rotary key, with no values.

        >>> Config.from_name("tiny-llama").kv_slot_sizes()
        (2, 16, 16)
        """
        if self.kv_lora_rank is not None:  # MLA: one latent + shared rotary key for all heads, no values
            return 1, self.kv_lora_rank + self.qk_rope_head_dim, 0
        return self.n_query_groups, self.head_size, self.head_size

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` uses sliding-window attention."""
        if self.sliding_window is None:
            return False
        if self.layer_types is None:
            return True
        return self.layer_types[layer] == "sliding_attention"

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        """A config by name: registered (:data:`REGISTRY`, :func:`register_config`) or a real
        checkpoint of the catalogue (:mod:`lucidlm.catalogue`), with optional field overrides. A
        config registered as an instance keeps its own class."""
        if name in REGISTRY:
            entry = REGISTRY[name]
            if isinstance(entry, Config):
                return dataclasses.replace(entry, **overrides)
            return cls(**{**entry, **overrides})
        if name in CATALOGUE:
            return dataclasses.replace(Config.from_hf(CONFIGS / f"{name}.json"), **{"name": name, **overrides})
        raise ConfigError(f"unknown config name {name!r}; registered: {', '.join(sorted(REGISTRY))}; "
                          f"catalogue: {', '.join(sorted(CATALOGUE))}")

    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict[str, Any]) -> Config:
        """Map a Hugging Face ``config.json`` (a path, a directory holding it, or the dict).

        Keys missing from the file take the family's transformers default (``Family.defaults``),
        so a sparse config means what it means to transformers.
        """
        raw, source = read_hf_config(path_or_dict)
        arch = architecture_of(raw)
        if arch not in FAMILIES:
            raise UnsupportedArchitectureError(
                f"{source}: architecture {arch!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
            )
        fields = FAMILIES[arch].read(raw, source)
        try:
            return cls(name=raw.get("_name_or_path") or arch, hf_config=raw, **fields)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        except (TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
            raise ConfigError(f"{source}: {type(exc).__name__}: {exc}") from exc


def register_config(config: Config | dict[str, Any], name: str | None = None) -> Config | dict[str, Any]:
    """Make ``config`` available as ``Config.from_name(name)`` (default: ``config.name``) and
    ``lucidlm models``; its class and custom components become loadable from checkpoints.

    >>> @dataclasses.dataclass
    ... class Mine(Config):
    ...     custom_param: float = 0.1
    >>> with REGISTRY.scoped(), COMPONENTS.scoped():  # registered until the block ends
    ...     _ = register_config(Mine(name="mine-tiny", vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    ...     Config.from_name("mine-tiny").custom_param
    0.1
    >>> "mine-tiny" in REGISTRY
    False
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
