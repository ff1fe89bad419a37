"""Tensor tables: how each GGUF ``general.architecture`` names its tensors in a Hugging Face
checkpoint, and the undoing of what llama.cpp's converter did to the weights (Llama's Q/K row
permutation, Gemma's ``1 + w`` norms, GPT-2's transposed Conv1D matrices, Falcon's and GPT-NeoX's
``query_key_value`` regrouped into ``[q; k; v]``, StableLM's per-head norms and each layer's experts
stacked into one tensor: a ``{}`` in a module name marks the stacked index).

Each supported architecture is one :class:`GGUFFamily` in :data:`GGUF_FAMILIES`: the config builder
of :mod:`~.configs`, the Hugging Face name of every GGUF tensor, and the transformations to undo.

>>> _hf_name("blk.3.attn_q.weight", GGUF_FAMILIES["llama"])
'model.layers.3.self_attn.q_proj.weight'
>>> _hf_name("blk.0.attn_qkv.bias", GGUF_FAMILIES["gpt2"]), _hf_name("blk.0.mystery.weight", GGUF_FAMILIES["gpt2"])
('transformer.h.0.attn.c_attn.bias', None)
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ...errors import ExportError, GGUFError
from .configs import (cohere_config, falcon_config, gemma1_config, gemma2_config, gemma3_config, gpt2_config,
                      gptneox_config, granite_config, llama_config, olmo2_config, olmo_config, phi2_config, phi3_config,
                      nemotron_config, qwen2moe_config, qwen3moe_config, qwen_config, smollm3_config,
                      stablelm_config, starcoder2_config)
from .deepseek2 import DEEPSEEK2_BLOCKS, deepseek2_config, deepseek2_split, deepseek2_tensors
from .gpt_oss import GPT_OSS_BLOCKS, gpt_oss_config, gpt_oss_split, gpt_oss_tensors
from .reader import Keys, dequantize, field

_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")

# Tensors that change what the model computes in a way lucidlm cannot reproduce: refuse the file
# rather than silently drop them (transformers' loader drops them).
_UNSUPPORTED_TENSORS = {
    "rope_factors_long.weight": "LongRoPE scaling (Phi-3 128k context)",
    "rope_factors_short.weight": "LongRoPE scaling (Phi-3 128k context)",
}


_LLAMA_GLOBALS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_ATTENTION = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GLU = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_LLAMA_BLOCKS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", **_ATTENTION, **_GLU}
# Phi-3 keeps transformers' fused matrices: attn_qkv = [q; k; v], ffn_up = [gate; up]
_PHI3_BLOCKS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma's sandwich norms: GGUF's ffn_norm is the norm *before* the MLP
_GEMMA_BLOCKS = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    **_ATTENTION,
    **_GLU,
}
# OLMo 2 normalises after attention and MLP (no pre-norms), and the whole of q and k
_OLMO2_BLOCKS = {
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    **_ATTENTION,
    **_QK_NORMS,
    **_GLU,
}
# StableLM 2 12B normalises each head separately; llama.cpp stacks those norms into one (heads, head_dim)
_STABLELM_BLOCKS = {
    **_LLAMA_BLOCKS,
    "attn_q_norm": "self_attn.q_layernorm.norms.{}",
    "attn_k_norm": "self_attn.k_layernorm.norms.{}",
}
_GPT2_GLOBALS = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
_GPT2_BLOCKS = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_STARCODER2_BLOCKS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", **_ATTENTION,
                      "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
# Command-R: one norm before a parallel attention and MLP
_COHERE_BLOCKS = {"attn_norm": "input_layernorm", **_ATTENTION, **_QK_NORMS, **_GLU}
_PHI2_GLOBALS = {"token_embd": "model.embed_tokens", "output_norm": "model.final_layernorm", "output": "lm_head"}
_PHI2_BLOCKS = {
    "attn_norm": "input_layernorm",
    **_ATTENTION,
    "attn_output": "self_attn.dense",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}
_GPTNEOX_GLOBALS = {"token_embd": "gpt_neox.embed_in", "output_norm": "gpt_neox.final_layer_norm",
                    "output": "embed_out"}
_GPTNEOX_BLOCKS = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "attention.query_key_value",
    "attn_output": "attention.dense",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.dense_h_to_4h",
    "ffn_down": "mlp.dense_4h_to_h",
}
# llama.cpp stacks each layer's experts into one ffn_*_exps tensor (the router is ffn_gate_inp)
_MIXTRAL_BLOCKS = {
    "ffn_gate_inp": "block_sparse_moe.gate",
    "ffn_gate_exps": "block_sparse_moe.experts.{}.w1",
    "ffn_down_exps": "block_sparse_moe.experts.{}.w2",
    "ffn_up_exps": "block_sparse_moe.experts.{}.w3",
}
_QWEN_EXPERTS = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.{}.gate_proj",
    "ffn_up_exps": "mlp.experts.{}.up_proj",
    "ffn_down_exps": "mlp.experts.{}.down_proj",
}
_QWEN2MOE_BLOCKS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    **_ATTENTION,
    **_QWEN_EXPERTS,
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_QWEN3MOE_BLOCKS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", **_ATTENTION,
                    **_QK_NORMS, **_QWEN_EXPERTS}
_FALCON_GLOBALS = {"token_embd": "transformer.word_embeddings", "output_norm": "transformer.ln_f", "output": "lm_head"}
# falcon-7b's (and Falcon2's) one norm is input_layernorm; in a file with attn_norm_2 (falcon-40b)
# llama.cpp's converter made ln_mlp attn_norm and ln_attn attn_norm_2
# Nemotron: LayerNorm1P with biases, a ReLU² MLP without gate
_NEMOTRON_BLOCKS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", **_ATTENTION,
                    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_FALCON_BLOCKS = {
    "attn_norm": "input_layernorm",
    "attn_norm_2": "ln_attn",
    "attn_qkv": "self_attention.query_key_value",
    "attn_output": "self_attention.dense",
    "ffn_up": "mlp.dense_h_to_4h",
    "ffn_down": "mlp.dense_4h_to_h",
}


@dataclasses.dataclass(frozen=True)
class GGUFFamily:
    """How one GGUF ``general.architecture`` becomes a Hugging Face checkpoint."""

    architecture: str  # config.json ``architectures[0]``
    model_type: str
    config: Callable[[Keys, frozenset[str]], dict[str, Any]]  # the family's config.json keys
    blocks: Mapping[str, str]  # ``blk.N.<leaf>`` -> module under ``{layers}.N.``
    globals: Mapping[str, str] = dataclasses.field(default_factory=lambda: _LLAMA_GLOBALS)
    layers: str = "model.layers"
    permuted_qk: bool = False  # llama.cpp reordered Q/K rows for its interleaved RoPE
    norm_offset: float = 0.0  # GGUF ``*norm.weight`` = HF weight + offset (Gemma scales by 1 + w)
    conv1d: frozenset[str] = frozenset()  # leaves HF stores (in, out) and llama.cpp transposed
    ignored: frozenset[str] = frozenset()  # tensors transformers recomputes from the config
    grouped_qkv: bool = False  # llama.cpp reordered Falcon's per-KV-group [q_1..q_r|k|v] rows into [q; k; v]
    headwise_qkv: bool = False  # llama.cpp reordered GPT-NeoX's per-head [q|k|v] rows into [q; k; v]
    # (leaf, renames): a file holding ``blk.N.<leaf>`` names these block tensors differently
    variant: tuple[str, Mapping[str, str]] | None = None
    # (renamed state dict, config) -> HF state dict: puts back what llama.cpp split across tensors (gpt-oss's experts)
    regroup: Callable[[dict[str, torch.Tensor], dict], dict[str, torch.Tensor]] | None = None
    split: Callable[[dict[str, torch.Tensor], dict], dict[str, torch.Tensor]] | None = None  # regroup's inverse (export)

    def for_names(self, names: Iterable[str]) -> GGUFFamily:
        """This family with the block names of the variant ``names`` (a file's tensors) show."""
        if self.variant and any(_BLOCK_RE.fullmatch(n) and n.split(".")[2] == self.variant[0] for n in names):
            return dataclasses.replace(self, blocks={**self.blocks, **self.variant[1]})
        return self


GGUF_FAMILIES: dict[str, GGUFFamily] = {
    # Mistral and Mixtral GGUFs are "llama" too; llama.cpp keeps no sliding window for them, so
    # Mistral loads as Llama (transformers picks MistralForCausalLM only for general.name == "mistral",
    # with the same weights and, below its 4096-token default window, the same outputs) and a file
    # with stacked experts (ffn_*_exps) as Mixtral without a window
    "llama": GGUFFamily("LlamaForCausalLM", "llama", llama_config, _LLAMA_BLOCKS, permuted_qk=True,
                        ignored=frozenset({"rope_freqs.weight"}), variant=("ffn_gate_exps", _MIXTRAL_BLOCKS)),
    "smollm3": GGUFFamily("SmolLM3ForCausalLM", "smollm3", smollm3_config, _LLAMA_BLOCKS, permuted_qk=True),
    "granite": GGUFFamily("GraniteForCausalLM", "granite", granite_config, _LLAMA_BLOCKS, permuted_qk=True),
    # OLMo's LayerNorms have no parameters: no norm tensors
    "olmo": GGUFFamily("OlmoForCausalLM", "olmo", olmo_config, _LLAMA_BLOCKS, permuted_qk=True),
    "olmo2": GGUFFamily("Olmo2ForCausalLM", "olmo2", olmo2_config, _OLMO2_BLOCKS),
    "qwen2": GGUFFamily("Qwen2ForCausalLM", "qwen2", qwen_config, _LLAMA_BLOCKS),
    "qwen3": GGUFFamily("Qwen3ForCausalLM", "qwen3", qwen_config, {**_LLAMA_BLOCKS, **_QK_NORMS}),
    "qwen2moe": GGUFFamily("Qwen2MoeForCausalLM", "qwen2_moe", qwen2moe_config, _QWEN2MOE_BLOCKS),
    "qwen3moe": GGUFFamily("Qwen3MoeForCausalLM", "qwen3_moe", qwen3moe_config, _QWEN3MOE_BLOCKS),
    "phi3": GGUFFamily("Phi3ForCausalLM", "phi3", phi3_config, _PHI3_BLOCKS),
    "gemma": GGUFFamily("GemmaForCausalLM", "gemma", gemma1_config, _LLAMA_BLOCKS, norm_offset=1.0),
    "gemma2": GGUFFamily("Gemma2ForCausalLM", "gemma2", gemma2_config, _GEMMA_BLOCKS, norm_offset=1.0),
    "gemma3": GGUFFamily("Gemma3ForCausalLM", "gemma3_text", gemma3_config, {**_GEMMA_BLOCKS, **_QK_NORMS},
                         norm_offset=1.0),
    "stablelm": GGUFFamily("StableLmForCausalLM", "stablelm", stablelm_config, _STABLELM_BLOCKS),
    "starcoder2": GGUFFamily("Starcoder2ForCausalLM", "starcoder2", starcoder2_config, _STARCODER2_BLOCKS),
    # llama.cpp stores LayerNorm1P's weight as 1 + weight (Gemma's offset) and does not permute Q/K
    "nemotron": GGUFFamily("NemotronForCausalLM", "nemotron", nemotron_config, _NEMOTRON_BLOCKS, norm_offset=1.0),
    "command-r": GGUFFamily("CohereForCausalLM", "cohere", cohere_config, _COHERE_BLOCKS),
    "phi2": GGUFFamily("PhiForCausalLM", "phi", phi2_config, _PHI2_BLOCKS, globals=_PHI2_GLOBALS),
    "gptneox": GGUFFamily("GPTNeoXForCausalLM", "gpt_neox", gptneox_config, _GPTNEOX_BLOCKS,
                          globals=_GPTNEOX_GLOBALS, layers="gpt_neox.layers", headwise_qkv=True),
    "gpt2": GGUFFamily("GPT2LMHeadModel", "gpt2", gpt2_config, _GPT2_BLOCKS, globals=_GPT2_GLOBALS,
                       layers="transformer.h", conv1d=frozenset({"attn_qkv", "attn_output", "ffn_up", "ffn_down"})),
    "falcon": GGUFFamily("FalconForCausalLM", "falcon", falcon_config, _FALCON_BLOCKS, globals=_FALCON_GLOBALS,
                         layers="transformer.h", grouped_qkv=True,
                         variant=("attn_norm_2", {"attn_norm": "ln_mlp"})),
    "gpt-oss": GGUFFamily("GptOssForCausalLM", "gpt_oss", gpt_oss_config, {**_ATTENTION, **GPT_OSS_BLOCKS},
                          regroup=gpt_oss_tensors, split=gpt_oss_split),
    # DeepSeek-V2 (softmax router) and V3 (sigmoid router): multi-head latent attention
    "deepseek2": GGUFFamily("DeepseekV2ForCausalLM", "deepseek_v2", deepseek2_config, DEEPSEEK2_BLOCKS,
                            regroup=deepseek2_tensors, split=deepseek2_split),
}

SUPPORTED_ARCHITECTURES = tuple(GGUF_FAMILIES)


def check_names(names: list[str], arch: str, path: pathlib.Path) -> None:
    """Every tensor must have a place in the architecture's Hugging Face model."""
    for name in names:
        if name in _UNSUPPORTED_TENSORS:
            raise GGUFError(
                f"{path} holds tensor {name!r}: the model uses {_UNSUPPORTED_TENSORS[name]}, "
                "which lucidlm does not implement"
            )
    misplaced = [n for n in names if not _fits(n, GGUF_FAMILIES[arch].for_names(names))]
    if misplaced:
        # a file mislabelled by hand or by a custom exporter: say which architecture it looks like
        fits = [a for a, family in GGUF_FAMILIES.items()
                if a != arch and all(_fits(n, family.for_names(names)) for n in names)]
        hint = f"; its tensor names fit these supported architectures instead: {', '.join(fits)}" if fits else ""
        raise GGUFError(f"{path} holds tensor {misplaced[0]!r}, which has no place in a {arch!r} model{hint}")


def _fits(name: str, family: GGUFFamily) -> bool:
    return name in family.ignored or _hf_name(name, family) is not None


def _hf_name(gguf_name: str, family: GGUFFamily) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if it has no place."""
    if match := _BLOCK_RE.fullmatch(gguf_name):
        layer, leaf, suffix = match.groups()
        if leaf in family.blocks:
            return f"{family.layers}.{layer}.{family.blocks[leaf]}.{suffix}"
    elif match := _GLOBAL_RE.fullmatch(gguf_name):
        leaf, suffix = match.groups()
        if leaf in family.globals:
            return f"{family.globals[leaf]}.{suffix}"
    return None


def _permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row permutation (``LlamaModel.permute``): each head's "two halves" rows
    become interleaved pairs. :func:`_unpermute_rows` undoes it."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _unpermute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation.

    llama.cpp reorders each head's rows from HF's "two halves" RoPE layout to interleaved
    pairs; swapping the (half, pair) axes back restores HF's layout. Works for biases too.
    """
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _restore(value: torch.Tensor, name: str, family: GGUFFamily, config: dict) -> torch.Tensor:
    """Undo what llama.cpp's converter did to one tensor of ``family`` (float32 in, float32 out)."""
    leaf = name.split(".")[-2]
    if family.permuted_qk and leaf in ("attn_q", "attn_k"):
        heads = config["num_attention_heads"] if leaf == "attn_q" else config["num_key_value_heads"]
        value = _unpermute_rows(value, heads)
    if family.norm_offset and name.endswith("norm.weight"):
        value = value - family.norm_offset
    if leaf in family.conv1d and value.ndim == 2:
        value = value.t()
    if family.grouped_qkv and leaf == "attn_qkv" and config.get("new_decoder_architecture"):
        value = _regroup_qkv(value, config["num_attention_heads"], config["num_kv_heads"])
    if family.headwise_qkv and leaf == "attn_qkv":
        value = _headwise_qkv(value, config["num_attention_heads"])
    return value


def _headwise_qkv(value: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's GPT-NeoX ``[q; k; v]``: back to ``[head][q | k | v]`` (weights and biases)."""
    return value.reshape(3, n_head, -1, *value.shape[1:]).transpose(0, 1).reshape(value.shape)


def _split_qkv(value: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's GPT-NeoX reordering: ``[head][q | k | v]`` rows into ``[q; k; v]`` (the inverse of
    :func:`_headwise_qkv`)."""
    return value.reshape(n_head, 3, -1, *value.shape[1:]).transpose(0, 1).reshape(value.shape)


def _regroup_qkv(value: torch.Tensor, n_head: int, n_kv: int) -> torch.Tensor:
    """Undo llama.cpp's Falcon ``[q; k; v]``: back to ``[group][q_1..q_r | k | v]`` (weights and biases)."""
    head_dim, rest = value.shape[0] // (n_head + 2 * n_kv), value.shape[1:]
    q, k, v = value.split([n_head * head_dim, n_kv * head_dim, n_kv * head_dim])
    parts = [q.reshape(n_kv, n_head // n_kv, head_dim, *rest), k.reshape(n_kv, 1, head_dim, *rest),
             v.reshape(n_kv, 1, head_dim, *rest)]
    return torch.cat(parts, dim=1).reshape(value.shape)


def _ungroup_qkv(value: torch.Tensor, n_head: int, n_kv: int) -> torch.Tensor:
    """llama.cpp's Falcon regrouping: ``[group][q_1..q_r | k | v]`` rows into ``[q; k; v]`` (the
    inverse of :func:`_regroup_qkv`)."""
    per_group = value.reshape(n_kv, n_head // n_kv + 2, -1, *value.shape[1:])
    parts = [per_group[:, :-2].flatten(0, 2), per_group[:, -2].flatten(0, 1), per_group[:, -1].flatten(0, 1)]
    return torch.cat(parts).reshape(value.shape)


def _apply(value: torch.Tensor, name: str, family: GGUFFamily, config: dict) -> torch.Tensor:
    """Do to one tensor what llama.cpp's converter does (the inverse of :func:`_restore`)."""
    leaf = name.split(".")[-2]
    if family.grouped_qkv and leaf == "attn_qkv" and config.get("new_decoder_architecture"):
        value = _ungroup_qkv(value, config["num_attention_heads"], config["num_kv_heads"])
    if family.headwise_qkv and leaf == "attn_qkv":
        value = _split_qkv(value, config["num_attention_heads"])
    if leaf in family.conv1d and value.ndim == 2:
        value = value.t()
    if family.norm_offset and name.endswith("norm.weight"):
        value = value + family.norm_offset
    if family.permuted_qk and leaf in ("attn_q", "attn_k"):
        heads = config["num_attention_heads"] if leaf == "attn_q" else config["num_key_value_heads"]
        value = _permute_rows(value, heads)
    return value


def _gguf_names(family: GGUFFamily) -> list[tuple[re.Pattern[str], str]]:
    """Hugging Face name patterns -> GGUF name templates: the family's tables read backwards."""
    prefix = re.escape(family.layers)
    pairs = [(re.compile(rf"{prefix}\.(\d+)\.{_module_pattern(hf)}\.(weight|bias)"),
              f"blk.{{0}}.{leaf}.{{{2 if '{}' in hf else 1}}}") for leaf, hf in family.blocks.items()]
    pairs += [(re.compile(rf"{re.escape(hf)}\.(weight|bias)"), f"{leaf}.{{0}}") for leaf, hf in family.globals.items()]
    return pairs


def _module_pattern(hf: str) -> str:
    """A module name as a regex; a stacked module's ``{}`` (expert or head) becomes a ``(\\d+)`` group."""
    return re.escape(hf).replace(r"\{\}", r"(\d+)")


def gguf_tensors(state: Mapping[str, torch.Tensor], arch: str, config: dict) -> dict[str, torch.Tensor]:
    """An HF state dict of architecture ``arch`` as llama.cpp's converter writes it: GGUF names, and
    its changes to the weights (float32 out). Per-head norms are stacked into one tensor. The reader
    (:func:`convert_tensors`) turns the result back into ``state``.

    Raises:
        ExportError: a tensor has no GGUF name in this architecture.
    """
    base = GGUF_FAMILIES[arch]
    state = base.split(state, config) if base.split else state
    names = {f"blk.0.{base.variant[0]}.weight"} if base.variant and _has_variant(state, base) else set()
    family = base.for_names(names)
    patterns = _gguf_names(family)
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    for hf_name, tensor in state.items():
        name, index = _gguf_name(hf_name, patterns)
        if index is not None:  # one of the tensors llama.cpp stacks (experts, StableLM's per-head norms)
            stacks.setdefault(name, {})[index] = tensor.detach().float()
            continue
        if name is None:
            raise ExportError(f"tensor {hf_name!r} has no GGUF name in a {arch!r} model")
        out[name] = _apply(tensor.detach().float(), name, family, config)
    for name, parts in stacks.items():
        out[name] = _apply(torch.stack([parts[i] for i in sorted(parts)]), name, family, config)
    return out


def _has_variant(state: Mapping[str, torch.Tensor], family: GGUFFamily) -> bool:
    """Whether ``state`` holds the HF module that only the family's variant names (Falcon-40B's ln_attn)."""
    module = {**family.blocks, **family.variant[1]}[family.variant[0]].split("{}")[0].rstrip(".")
    return any(f".{module}." in name for name in state)


def _gguf_name(hf_name: str, patterns: list[tuple[re.Pattern[str], str]]) -> tuple[str | None, int | None]:
    """(GGUF name, index in its stack or None); (None, None) if ``hf_name`` has no place."""
    for pattern, template in patterns:
        if match := pattern.fullmatch(hf_name):
            groups = match.groups()
            return template.format(*groups), int(groups[1]) if len(groups) == 3 else None
    return None, None


def convert_tensors(reader, path, config: dict, dtype: torch.dtype, bar=None) -> dict[str, torch.Tensor]:
    """Dequantise, rename and restore every tensor into an HF state dict (``bar``: a tqdm bar
    advanced by one per tensor)."""
    family = GGUF_FAMILIES[field(reader, "general.architecture")].for_names(t.name for t in reader.tensors)
    out: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if bar is not None:
            bar.update(1)
        if tensor.name in family.ignored:
            continue
        value = _restore(torch.from_numpy(dequantize(tensor)), tensor.name, family, config)
        name = _hf_name(tensor.name, family)
        if "{}" in name:  # one stacked tensor -> one per expert (or head)
            out.update({name.format(i): part.to(dtype).contiguous() for i, part in enumerate(value)})
        else:
            out[name] = value.to(dtype).contiguous()
    return family.regroup(out, config) if family.regroup else out
