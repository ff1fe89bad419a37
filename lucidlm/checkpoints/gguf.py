"""Convert a GGUF file into a cached Hugging Face checkpoint directory.

The directory holds ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` and ``generation_config.json`` with the values and tensor names that
``transformers`` derives from the same GGUF file, so the rest of lucidlm only has to read one
checkpoint layout.

Each GGUF ``general.architecture`` that llama.cpp exports and transformers' GGUF loader reads, and
that lucidlm's model implements, has one :class:`_Family` entry in :data:`_FAMILIES`: the
``config.json`` it becomes, the Hugging Face name of every GGUF tensor, and the undoing of what
llama.cpp's converter did to the weights (Llama's Q/K row permutation, Gemma's ``1 + w`` norms,
GPT-2's transposed Conv1D matrices, Falcon's ``query_key_value`` regrouped into ``[q; k; v]``). Where transformers' loader drops a value the file carries
(Qwen3/Gemma ``attention.key_length``, Gemma soft-caps, linear RoPE scaling, Phi-3 partial
rotary) we read it as llama.cpp does; the two agree on every checkpoint those families publish.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from lucidlm.checkpoints import conversion_cache
from lucidlm.checkpoints.conversion_cache import cache_root
from lucidlm.errors import GGUFError, LucidError
from lucidlm.fileio import atomic_path, temp_dir

SUPPORTED_TOKENIZERS = ("gpt2", "llama")
GGUF_MAGIC = b"GGUF"

# The converted directory's format version: bump conversion_cache.FORMAT_VERSION when the layout
# or content of what _write_hf_dir writes changes, so stale cache entries are ignored.
FORMAT_VERSION = conversion_cache.FORMAT_VERSION

# Quantisations that gguf.quants.dequantize implements and that we have checked by hand.
SUPPORTED_QUANTS = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")

# Tensors that change what the model computes in a way lucidlm cannot reproduce: refuse the file
# rather than silently drop them (transformers' loader drops them).
_UNSUPPORTED_TENSORS = {
    "rope_factors_long.weight": "LongRoPE scaling (Phi-3 128k context)",
    "rope_factors_short.weight": "LongRoPE scaling (Phi-3 128k context)",
}

# Pre-tokenizer regexes for the GGUF ``tokenizer.ggml.pre`` values whose merges were not learned
# with GPT-2's split; the same table transformers uses. Unlisted values keep GPT-2's ByteLevel split.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    name: _LLAMA3_SPLIT
    for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral")
}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_SPACE = "\u2581"  # SentencePiece's spelling of a space ("▁")
# Architectures whose SentencePiece tokenizer differs from Llama's, as transformers rebuilds them.
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


# ----------------------------------------------------------------------------- metadata


_REQUIRED = object()


class _Keys:
    """``{arch}.<name>`` lookups in a GGUF's metadata.

    A required key that is missing, or a value of the wrong type, raises GGUFError naming the file
    and the full key.
    """

    def __init__(self, meta: Mapping[str, Any], path: str | os.PathLike[str]):
        self.meta, self.path = meta, path
        self.arch = meta["general.architecture"]

    def integer(self, name: str, default: Any = _REQUIRED) -> Any:
        return self._get(name, default, (int,), "one integer")

    def number(self, name: str, default: Any = _REQUIRED) -> Any:
        value = self._get(name, default, (int, float), "one number")
        return value if value is default else float(value)

    def text(self, name: str, default: Any = _REQUIRED) -> Any:
        return self._get(name, default, (str,), "a string")

    def flag(self, name: str, default: Any = _REQUIRED) -> Any:
        return self._get(name, default, (bool,), "true or false")

    def error(self, name: str, value: Any, expected: str) -> GGUFError:
        return GGUFError(f"{self.path}: metadata key '{self.arch}.{name}' is {value!r}; expected {expected}")

    def _get(self, name: str, default: Any, types: tuple[type, ...], expected: str) -> Any:
        key = f"{self.arch}.{name}"
        if key not in self.meta:
            if default is _REQUIRED:
                raise GGUFError(f"{self.path} lacks the metadata key {key!r}, which a {self.arch!r} model needs")
            return default
        value = self.meta[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):  # bool is no int here
            raise self.error(name, value, expected)
        return value


# ----------------------------------------------------------------------------- families: config.json


def _has(names: frozenset[str], leaf: str) -> bool:
    """Whether any block holds ``leaf`` (``"attn_q.bias"``)."""
    return any(name.endswith("." + leaf) for name in names)


def _rope_parameters(k: _Keys, theta: float) -> dict[str, Any]:
    """RoPE settings from ``rope.scaling.*``: none or linear (what llama.cpp writes for those)."""
    kind = k.text("rope.scaling.type", "linear" if k.number("rope.scale_linear", None) else "none")
    if kind == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        factor = k.number("rope.scaling.factor", None) or k.number("rope.scale_linear")
        return {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    raise k.error("rope.scaling.type", kind, "'none' or 'linear' (lucidlm implements no other RoPE scaling)")


def _decoder_config(k: _Keys, names: frozenset[str]) -> dict[str, Any]:
    """The keys every RoPE decoder family (Llama, Qwen, Phi-3, Gemma) spells alike."""
    hidden, heads = k.integer("embedding_length"), k.integer("attention.head_count")
    theta = k.number("rope.freq_base", 10000.0)
    return {
        "hidden_size": hidden,
        "intermediate_size": k.integer("feed_forward_length"),
        "num_hidden_layers": k.integer("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": k.integer("attention.head_count_kv", heads),
        "head_dim": k.integer("attention.key_length", hidden // heads),
        "rms_norm_eps": k.number("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": theta,
        "rope_parameters": _rope_parameters(k, theta),
        "max_position_embeddings": k.integer("context_length", None),
    }


def _llama_config(k: _Keys, names: frozenset[str]) -> dict[str, Any]:
    config = _decoder_config(k, names)
    # older files name the head size only through the RoPE width, which equals it for Llama models
    head_dim = k.integer("attention.key_length", k.integer("rope.dimension_count", config["head_dim"]))
    return config | {
        "head_dim": head_dim,
        "hidden_act": "silu",
        "attention_bias": _has(names, "attn_q.bias"),
        "mlp_bias": _has(names, "ffn_up.bias"),
    }


def _qwen_config(k: _Keys, names: frozenset[str]) -> dict[str, Any]:
    # Qwen2 always has q/k/v biases; Qwen3 has none unless the file holds them. llama.cpp ignores
    # sliding windows for both (Qwen ships them disabled).
    return _decoder_config(k, names) | {
        "hidden_act": "silu",
        "attention_bias": _has(names, "attn_q.bias"),
        "use_sliding_window": False,
    }


def _phi3_config(k: _Keys, names: frozenset[str]) -> dict[str, Any]:
    config = _decoder_config(k, names)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    config |= {"head_dim": head_dim, "hidden_act": "silu"}
    # Phi-4-mini rotates part of each head; llama.cpp and transformers both ignore Phi-3's
    # ``attention.sliding_window`` (0 on Phi-4)
    rotary = k.integer("rope.dimension_count", head_dim)
    if rotary != head_dim:
        config["partial_rotary_factor"] = rotary / head_dim
        config["rope_parameters"]["partial_rotary_factor"] = rotary / head_dim
    return config


def _layer_types(n_layer: int, every: int) -> list[str]:
    """Every ``every``-th layer global, the others sliding (llama.cpp's ``set_swa_pattern``)."""
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layer)]


def _gemma_config(k: _Keys, names: frozenset[str], layers_27b: int) -> dict[str, Any]:
    config = _decoder_config(k, names)
    # llama.cpp scales attention by 1/sqrt(head_dim), except in the 27B models (recognised by
    # their layer count), which use 1/sqrt(hidden / heads): Gemma's query_pre_attn_scalar
    scalar = config["head_dim"]
    if config["num_hidden_layers"] == layers_27b:
        scalar = config["hidden_size"] // config["num_attention_heads"]
    return config | {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar}


def _gemma2_config(k: _Keys, names: frozenset[str]) -> dict[str, Any]:
    config = _gemma_config(k, names, layers_27b=46)
    return config | {
        "sliding_window": k.integer("attention.sliding_window", 4096),
        "layer_types": _layer_types(config["num_hidden_layers"], every=2),
        # llama.cpp's defaults when the keys are absent
        "attn_logit_softcapping": k.number("attn_logit_softcapping", 50.0),
        "final_logit_softcapping": k.number("final_logit_softcapping", 30.0),
    }


def _gemma3_config(k: _Keys, names: frozenset[str]) -> dict[str, Any]:
    config = _gemma_config(k, names, layers_27b=62)
    window = k.integer("attention.sliding_window", 0)
    # five sliding layers per global one when the file names a window, else all global; the
    # sliding layers use RoPE base 10000 without scaling (llama.cpp hard-codes both)
    local = {"rope_type": "default", "rope_theta": k.number("rope.freq_base_swa", 10000.0)}
    config |= {
        "layer_types": _layer_types(config["num_hidden_layers"], every=6 if window > 0 else 1),
        "rope_parameters": {"sliding_attention": local, "full_attention": config["rope_parameters"]},
        "attn_logit_softcapping": None,
        "final_logit_softcapping": k.number("final_logit_softcapping", None),
    }
    return config | ({"sliding_window": window} if window > 0 else {})


def _gemma1_config(k: _Keys, names: frozenset[str]) -> dict[str, Any]:
    return _decoder_config(k, names) | {"hidden_act": "gelu_pytorch_tanh"}


def _stablelm_config(k: _Keys, names: frozenset[str]) -> dict[str, Any]:
    config = _decoder_config(k, names)
    del config["rms_norm_eps"]  # StableLM normalises with LayerNorm
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    fraction = k.integer("rope.dimension_count", head_dim // 4) / head_dim
    config["rope_parameters"]["partial_rotary_factor"] = fraction
    # a parallel block has no norm before its MLP, so older files without the key still say which
    parallel = k.flag("use_parallel_residual", not _has(names, "ffn_norm.weight"))
    return config | {
        "head_dim": head_dim,
        "partial_rotary_factor": fraction,
        "layer_norm_eps": k.number("attention.layer_norm_epsilon", 1e-5),
        "hidden_act": "silu",
        "use_qkv_bias": _has(names, "attn_q.bias"),
        "use_parallel_residual": parallel,
        "qk_layernorm": _has(names, "attn_q_norm.weight"),
    }


def _falcon_config(k: _Keys, names: frozenset[str]) -> dict[str, Any]:
    # llama.cpp runs every Falcon as a parallel block whose attention reads attn_norm_2 when the file
    # has it (falcon-40b/180B's ln_attn; attn_norm is then ln_mlp) and attn_norm otherwise; one KV head without
    # attn_norm_2 is falcon-7b's multi-query model, anything else the new decoder architecture
    # (Falcon2-11B: grouped KV heads, one shared norm). transformers' loader reads neither (it always
    # builds falcon-7b), nor layer_norm_epsilon (it looks for layer_norm_rms_epsilon).
    hidden, heads = k.integer("embedding_length"), k.integer("attention.head_count")
    kv, two_norms = k.integer("attention.head_count_kv", 1), _has(names, "attn_norm_2.weight")
    new = two_norms or kv != 1
    theta = k.number("rope.freq_base", 10000.0)
    return {
        "hidden_size": hidden,
        "ffn_hidden_size": k.integer("feed_forward_length", 4 * hidden),
        "num_hidden_layers": k.integer("block_count"),
        "num_attention_heads": heads,
        "num_kv_heads": kv if new else heads,  # transformers' value for multi-query (it uses one)
        "multi_query": not new,
        "new_decoder_architecture": new,
        "num_ln_in_parallel_attn": (2 if two_norms else 1) if new else None,
        "parallel_attn": True,
        "alibi": False,
        "bias": _has(names, "attn_qkv.bias"),
        "activation": "gelu",
        "layer_norm_epsilon": k.number("attention.layer_norm_epsilon", 1e-5),
        "rope_theta": theta,
        "rope_parameters": _rope_parameters(k, theta),
        "max_position_embeddings": k.integer("context_length", 2048),
    }


def _gpt2_config(k: _Keys, names: frozenset[str]) -> dict[str, Any]:
    context = k.integer("context_length")
    return {
        "n_embd": k.integer("embedding_length"),
        "n_layer": k.integer("block_count"),
        "n_head": k.integer("attention.head_count"),
        "n_positions": context,
        "n_ctx": context,
        "n_inner": k.integer("feed_forward_length", None),
        "layer_norm_epsilon": k.number("attention.layer_norm_epsilon", 1e-5),
        "activation_function": "gelu_new",
    }


# ----------------------------------------------------------------------------- families: tensors


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
# StableLM 2 12B normalises each head separately; llama.cpp stacks those norms into one (heads, head_dim)
_STABLELM_BLOCKS = {
    **_LLAMA_BLOCKS,
    "attn_q_norm": "self_attn.q_layernorm.norms",
    "attn_k_norm": "self_attn.k_layernorm.norms",
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
_FALCON_GLOBALS = {"token_embd": "transformer.word_embeddings", "output_norm": "transformer.ln_f", "output": "lm_head"}
# falcon-7b's (and Falcon2's) one norm is input_layernorm; in a file with attn_norm_2 (falcon-40b)
# llama.cpp's converter made ln_mlp attn_norm and ln_attn attn_norm_2
_FALCON_BLOCKS = {
    "attn_norm": "input_layernorm",
    "attn_norm_2": "ln_attn",
    "attn_qkv": "self_attention.query_key_value",
    "attn_output": "self_attention.dense",
    "ffn_up": "mlp.dense_h_to_4h",
    "ffn_down": "mlp.dense_4h_to_h",
}


@dataclasses.dataclass(frozen=True)
class _Family:
    """How one GGUF ``general.architecture`` becomes a Hugging Face checkpoint."""

    architecture: str  # config.json ``architectures[0]``
    model_type: str
    config: Callable[[_Keys, frozenset[str]], dict[str, Any]]  # the family's config.json keys
    blocks: Mapping[str, str]  # ``blk.N.<leaf>`` -> module under ``{layers}.N.``
    globals: Mapping[str, str] = dataclasses.field(default_factory=lambda: _LLAMA_GLOBALS)
    layers: str = "model.layers"
    permuted_qk: bool = False  # llama.cpp reordered Q/K rows for its interleaved RoPE
    norm_offset: float = 0.0  # GGUF ``*norm.weight`` = HF weight + offset (Gemma scales by 1 + w)
    conv1d: frozenset[str] = frozenset()  # leaves HF stores (in, out) and llama.cpp transposed
    per_head: frozenset[str] = frozenset()  # leaves llama.cpp stacked from HF's ``<module>.<head>`` tensors
    ignored: frozenset[str] = frozenset()  # tensors transformers recomputes from the config
    grouped_qkv: bool = False  # llama.cpp reordered Falcon's per-KV-group [q_1..q_r|k|v] rows into [q; k; v]
    # (leaf, renames): a file holding ``blk.N.<leaf>`` names these block tensors differently
    variant: tuple[str, Mapping[str, str]] | None = None

    def for_names(self, names: Iterable[str]) -> _Family:
        """This family with the block names of the variant ``names`` (a file's tensors) show."""
        if self.variant and any(_BLOCK_RE.fullmatch(n) and n.split(".")[2] == self.variant[0] for n in names):
            return dataclasses.replace(self, blocks={**self.blocks, **self.variant[1]})
        return self


_FAMILIES: dict[str, _Family] = {
    # Mistral and Mixtral GGUFs are "llama" too; llama.cpp keeps no sliding window for them, so
    # they load as Llama (transformers picks MistralForCausalLM only for general.name == "mistral",
    # with the same weights and, below its 4096-token default window, the same outputs)
    "llama": _Family("LlamaForCausalLM", "llama", _llama_config, _LLAMA_BLOCKS, permuted_qk=True,
                     ignored=frozenset({"rope_freqs.weight"})),
    "qwen2": _Family("Qwen2ForCausalLM", "qwen2", _qwen_config, _LLAMA_BLOCKS),
    "qwen3": _Family("Qwen3ForCausalLM", "qwen3", _qwen_config, {**_LLAMA_BLOCKS, **_QK_NORMS}),
    "phi3": _Family("Phi3ForCausalLM", "phi3", _phi3_config, _PHI3_BLOCKS),
    "gemma": _Family("GemmaForCausalLM", "gemma", _gemma1_config, _LLAMA_BLOCKS, norm_offset=1.0),
    "gemma2": _Family("Gemma2ForCausalLM", "gemma2", _gemma2_config, _GEMMA_BLOCKS, norm_offset=1.0),
    "gemma3": _Family("Gemma3ForCausalLM", "gemma3_text", _gemma3_config, {**_GEMMA_BLOCKS, **_QK_NORMS},
                      norm_offset=1.0),
    "stablelm": _Family("StableLmForCausalLM", "stablelm", _stablelm_config, _STABLELM_BLOCKS,
                        per_head=frozenset({"attn_q_norm", "attn_k_norm"})),
    "gpt2": _Family("GPT2LMHeadModel", "gpt2", _gpt2_config, _GPT2_BLOCKS, globals=_GPT2_GLOBALS,
                    layers="transformer.h", conv1d=frozenset({"attn_qkv", "attn_output", "ffn_up", "ffn_down"})),
    "falcon": _Family("FalconForCausalLM", "falcon", _falcon_config, _FALCON_BLOCKS, globals=_FALCON_GLOBALS,
                      layers="transformer.h", grouped_qkv=True,
                      variant=("attn_norm_2", {"attn_norm": "ln_mlp"})),
}

SUPPORTED_ARCHITECTURES = tuple(_FAMILIES)


# ----------------------------------------------------------------------------- public API


def gguf_to_hf_dir(
    path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> pathlib.Path:
    """Convert a GGUF file (see :data:`SUPPORTED_ARCHITECTURES`) into a Hugging Face checkpoint directory, cached.

    Args:
        path: the ``.gguf`` file.
        cache_dir: where converted checkpoints live; defaults to ``$LUCIDLM_CACHE`` or
            ``~/.cache/lucidlm``.
        dtype: floating dtype of the tensors written to ``model.safetensors``.
        progress: say on stderr that a conversion starts, and show a tqdm bar (stderr) while
            dequantising tensors.

    Returns:
        The converted directory. Any later call with a file of the same content (this one, a
        copy, the same file in another virtual environment) returns it without work: the cache
        is keyed by a content fingerprint, the dtype and the converter's format version (see
        :mod:`lucidlm.checkpoints.conversion_cache`), never by the file's path or mtime.

    Raises:
        GGUFError: the file is missing, not a GGUF, truncated, of an unsupported architecture,
            quantisation or tokenizer, or holds unexpected tensors.
    """
    gguf_path = pathlib.Path(path).expanduser()
    _check_magic(gguf_path)
    root = cache_root(cache_dir)
    content = conversion_cache.fingerprint(gguf_path)  # None: a header our quick walk cannot read
    found = content and _cached(root, content, dtype)
    if found:
        return found
    if progress:  # the header alone can take seconds to parse: say what is going on first
        print(f"lucidlm: converting {gguf_path.name} to a {str(dtype).removeprefix('torch.')} Hugging Face "
              f"checkpoint in {root} (once per file; `lucidlm cache list` shows the cache)",
              file=sys.stderr, flush=True)
    reader = _open_reader(gguf_path)
    try:
        return _convert(reader, gguf_path, root, content, dtype, progress)
    except LucidError:
        raise
    # damage the header checks cannot see (a string that is not UTF-8, a value of the wrong
    # shape inside an array...) surfaces from numpy, struct or str as one of these
    # (a head count of 0 divides by zero; sizes that do not fit the tensors fail a torch reshape)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, AttributeError, ZeroDivisionError,
            RuntimeError) as exc:
        raise GGUFError(f"{gguf_path} is corrupt: {type(exc).__name__}: {exc}") from exc


def _convert(reader, gguf_path: pathlib.Path, root: pathlib.Path, content: str | None, dtype: torch.dtype,
             progress: bool) -> pathlib.Path:
    _validate(reader, gguf_path)
    if content is None:  # ... but gguf's reader does: hash the whole file instead
        content = conversion_cache.full_fingerprint(gguf_path)
        found = _cached(root, content, dtype)
        if found:
            return found
    target = root / conversion_cache.entry_name(gguf_path, conversion_cache.entry_digest(content, str(dtype)))
    return _build_atomically(reader, gguf_path, root, target, dtype, progress, content)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All metadata key/values of a valid GGUF file as plain Python values."""
    gguf_path = pathlib.Path(path).expanduser()
    _check_magic(gguf_path)
    return _metadata(_open_reader(gguf_path))


# ----------------------------------------------------------------------------- validation


def _check_magic(path: pathlib.Path) -> None:
    """Fail early, with the path, on a missing file or one that is not GGUF at all."""
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file: it starts with {magic!r}, expected {GGUF_MAGIC!r}")


def _open_reader(path: pathlib.Path):
    """Parse the header; a corrupt or truncated header surfaces as GGUFError naming the file."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    # GGUFReader reports damage through whichever error numpy or struct hits first
    # (ValueError, IndexError, KeyError, OverflowError...), so every one of them means "corrupt".
    except Exception as exc:  # noqa: BLE001
        raise GGUFError(f"{path} is truncated or corrupt: it cannot be parsed as GGUF ({exc})") from exc


def _validate(reader, path: pathlib.Path) -> None:
    """Check architecture, tensor bounds, quantisations and names before writing anything."""
    arch = _field(reader, "general.architecture")
    if arch not in _FAMILIES:
        raise GGUFError(
            f"{path} holds a model of architecture {arch!r}, which lucidlm cannot convert; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    _check_bounds(reader, path)
    _check_quants(reader, path)
    _check_names([t.name for t in reader.tensors], arch, path)


def _check_bounds(reader, path: pathlib.Path) -> None:
    """A truncated file can still parse; its tensor data then runs past the end of the file."""
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise GGUFError(
                f"{path} is truncated: tensor {tensor.name!r} needs bytes up to {end}, "
                f"but the file has only {size} bytes"
            )


def _check_quants(reader, path: pathlib.Path) -> None:
    """Name every tensor type we cannot dequantise, rather than failing halfway through."""
    bad = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type.name not in SUPPORTED_QUANTS})
    if bad:
        raise GGUFError(
            f"{path} uses unsupported quantisation {', '.join(bad)}; supported: {', '.join(SUPPORTED_QUANTS)}"
        )


def _check_names(names: list[str], arch: str, path: pathlib.Path) -> None:
    """Every tensor must have a place in the architecture's Hugging Face model."""
    for name in names:
        if name in _UNSUPPORTED_TENSORS:
            raise GGUFError(
                f"{path} holds tensor {name!r}: the model uses {_UNSUPPORTED_TENSORS[name]}, "
                "which lucidlm does not implement"
            )
    misplaced = [n for n in names if not _fits(n, _FAMILIES[arch])]
    if misplaced:
        # a file mislabelled by hand or by a custom exporter: say which architecture it looks like
        fits = [a for a, family in _FAMILIES.items() if a != arch and all(_fits(n, family) for n in names)]
        hint = f"; its tensor names fit these supported architectures instead: {', '.join(fits)}" if fits else ""
        raise GGUFError(f"{path} holds tensor {misplaced[0]!r}, which has no place in a {arch!r} model{hint}")


def _fits(name: str, family: _Family) -> bool:
    return name in family.ignored or _hf_name(name, family) is not None


# ----------------------------------------------------------------------------- cache


def _cached(root: pathlib.Path, content: str, dtype: torch.dtype) -> pathlib.Path | None:
    """The entry converted from this content at this dtype, if any (its use recorded)."""
    found = conversion_cache.find(root, conversion_cache.entry_digest(content, str(dtype)))
    if found is not None:
        conversion_cache.touch(found)
    return found


def _build_atomically(reader, path, root, target, dtype, progress, content) -> pathlib.Path:
    """Build in a temp dir inside ``root``, then rename it into place; never leave debris.

    Two processes converting the same file both build; the first rename wins and the second
    process discards its own copy and uses the winner's."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(root, ".tmp-")
    try:
        _write_hf_dir(reader, path, tmp, dtype, progress)
        conversion_cache.write_source(tmp, path, str(dtype), content)
        # done meanwhile by another process, maybe from a copy of the file under another name
        winner = conversion_cache.find(root, conversion_cache.entry_digest(content, str(dtype)))
        if winner is None:
            try:
                os.rename(tmp, target)
                return target
            except OSError:
                winner = target if conversion_cache.is_complete(target) else None
                if winner is None:
                    raise
        shutil.rmtree(tmp, ignore_errors=True)
        return winner
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- conversion


def _write_hf_dir(reader, path: pathlib.Path, out: pathlib.Path, dtype: torch.dtype, progress: bool) -> None:
    """Write every file of the Hugging Face layout into ``out``."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    meta = _metadata(reader)
    names = [t.name for t in reader.tensors]
    config = _hf_config(meta, names, dtype, path)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(meta))
    tokenizer = build_tokenizer(meta, path)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(meta))
    with tqdm(total=len(reader.tensors), desc=f"Converting {path.name}", unit="tensor", disable=not progress) as bar:
        tensors = _convert_tensors(reader, path, config, dtype, bar)
        bar.set_postfix_str("writing model.safetensors")
        with atomic_path(out / "model.safetensors") as tmp:  # and the umask's mode: save_file makes 0600
            save_file(tensors, str(tmp), metadata={"format": "pt"})


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _metadata(reader) -> dict[str, Any]:
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _hf_config(
    meta: dict[str, Any], tensor_names: list[str], dtype: torch.dtype, path: str | os.PathLike[str] = "<gguf>"
) -> dict[str, Any]:
    """``config.json`` of the architecture's transformers model, from the GGUF metadata.

    Raises:
        GGUFError: a key the architecture needs is missing or of the wrong type, or the file asks
            for RoPE scaling lucidlm does not implement.
    """
    keys = _Keys(meta, path)
    family = _FAMILIES[keys.arch]
    names = frozenset(tensor_names)
    dtype_name = str(dtype).removeprefix("torch.")
    tokens = meta.get("tokenizer.ggml.tokens", ())
    return {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        **family.config(keys, names),
        "vocab_size": keys.integer("vocab_size", len(tokens)),
        # llama.cpp writes output.weight only when it differs from the embedding matrix (GPT-2: always)
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        **_special_ids(meta),
    }


def _special_ids(meta: dict[str, Any]) -> dict[str, int]:
    pairs = {
        "bos_token_id": "bos_token_id",
        "eos_token_id": "eos_token_id",
        "pad_token_id": "padding_token_id",
        "unk_token_id": "unknown_token_id",
    }
    return {hf: int(meta[f"tokenizer.ggml.{g}"]) for hf, g in pairs.items() if f"tokenizer.ggml.{g}" in meta}


def _generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    ids = _special_ids(meta)
    return {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids}


def _special_tokens(meta: dict[str, Any]) -> dict[str, str]:
    """``{"bos_token": "<|im_start|>", ...}`` for the special ids the GGUF names."""
    tokens = meta.get("tokenizer.ggml.tokens", [])
    out = {}
    for hf, token_id in _special_ids(meta).items():
        if 0 <= token_id < len(tokens):
            out[hf.removesuffix("_id")] = tokens[token_id]
    return out


def _tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer_config.json``: special tokens, BOS/EOS flags and the chat template."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": _adds_bos(meta),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        **_special_tokens(meta),
    }
    arch = meta.get("general.architecture")
    if (context := meta.get(f"{arch}.context_length")) is not None:
        config["model_max_length"] = context
    if (template := meta.get("tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    return config


# ----------------------------------------------------------------------------- tensors


def _hf_name(gguf_name: str, family: _Family) -> str | None:
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


def _unpermute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation.

    llama.cpp reorders each head's rows from HF's "two halves" RoPE layout to interleaved
    pairs; swapping the (half, pair) axes back restores HF's layout. Works for biases too.
    """
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _dequantize(tensor) -> np.ndarray:
    """A tensor's values as float32, in torch (row-major, reversed ggml) shape."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if tensor.tensor_type == GGMLQuantizationType.F32:
        values = np.array(tensor.data, dtype=np.float32)  # copy out of the read-only memmap
    else:
        values = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def _restore(value: torch.Tensor, name: str, family: _Family, config: dict) -> torch.Tensor:
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
    return value


def _regroup_qkv(value: torch.Tensor, n_head: int, n_kv: int) -> torch.Tensor:
    """Undo llama.cpp's Falcon ``[q; k; v]``: back to ``[group][q_1..q_r | k | v]`` (weights and biases)."""
    head_dim, rest = value.shape[0] // (n_head + 2 * n_kv), value.shape[1:]
    q, k, v = value.split([n_head * head_dim, n_kv * head_dim, n_kv * head_dim])
    parts = [q.reshape(n_kv, n_head // n_kv, head_dim, *rest), k.reshape(n_kv, 1, head_dim, *rest),
             v.reshape(n_kv, 1, head_dim, *rest)]
    return torch.cat(parts, dim=1).reshape(value.shape)


def _convert_tensors(reader, path, config: dict, dtype: torch.dtype, bar=None) -> dict[str, torch.Tensor]:
    """Dequantise, rename and restore every tensor into an HF state dict (``bar``: a tqdm bar
    advanced by one per tensor)."""
    family = _FAMILIES[_field(reader, "general.architecture")].for_names(t.name for t in reader.tensors)
    out: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if bar is not None:
            bar.update(1)
        if tensor.name in family.ignored:
            continue
        value = _restore(torch.from_numpy(_dequantize(tensor)), tensor.name, family, config)
        name = _hf_name(tensor.name, family)
        if tensor.name.split(".")[-2] in family.per_head:  # one (heads, head_dim) -> heads tensors
            stem, suffix = name.rsplit(".", 1)
            out.update({f"{stem}.{h}.{suffix}": row.to(dtype).contiguous() for h, row in enumerate(value)})
        else:
            out[name] = value.to(dtype).contiguous()
    return out


# ----------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(meta: dict[str, Any], path: str | os.PathLike[str] = "<gguf>"):
    """A ``tokenizers.Tokenizer`` equal to the one transformers builds from GGUF metadata.

    Raises:
        GGUFError: the GGUF describes a tokenizer model other than byte-level BPE (``gpt2``) or
            SentencePiece (``llama``), or lacks a key that model needs.
    """
    from tokenizers import AddedToken

    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZERS:
        raise GGUFError(
            f"{path} describes a {kind!r} tokenizer; supported tokenizer models: {', '.join(SUPPORTED_TOKENIZERS)}"
        )
    tokens = [str(t) for t in _tokenizer_array(meta, "tokens", path)]
    if kind == "gpt2":
        tokenizer, keep = _byte_level_tokenizer(meta, tokens)
    else:
        tokenizer, keep = _sentencepiece_tokenizer(meta, tokens, path)
    types = list(meta.get("tokenizer.ggml.token_type", []))
    specials = [t for t, ty in zip(tokens, types) if ty == _CONTROL and keep(t)]
    specials += [t for t in _special_tokens(meta).values() if t not in specials and keep(t)]
    # Without these, "<|im_start|>" in text would be cut into pieces instead of kept whole.
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    tokenizer.post_processor = _post_processor(meta)
    return tokenizer


def _tokenizer_array(meta: dict[str, Any], name: str, path: str | os.PathLike[str]) -> list:
    """``tokenizer.ggml.<name>``, a list; GGUFError naming the file and key when absent or not a list."""
    key = f"tokenizer.ggml.{name}"
    if key not in meta:
        kind = meta.get("tokenizer.ggml.model")
        raise GGUFError(f"{path} lacks the metadata key {key!r}, which a {kind!r} tokenizer needs")
    value = meta[key]
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise GGUFError(f"{path}: metadata key {key!r} is {type(value).__name__}; expected an array")
    return list(value)


def _byte_level_tokenizer(meta: dict[str, Any], tokens: list[str]):
    """GPT-2 style byte-level BPE, and which tokens may be added as specials (those in its alphabet)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens stored in plain UTF-8 (not in the byte alphabet) are respelled, as transformers does.
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"), pre_tokenizers, Regex)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, lambda token: set(token) <= alphabet


def _sentencepiece_tokenizer(meta: dict[str, Any], tokens: list[str], path: str | os.PathLike[str]):
    """SentencePiece as BPE with byte fallback (``<0x41>``), merges from the file or from the scores.

    Llama/Mistral: "▁" stands for a space and one is prepended to the text (Metaspace). Phi-3 prepends
    it with a normalizer instead. Gemma spells runs of spaces as real spaces, ranks merges by token
    order (its scores do not follow merge order) and prepends nothing.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    arch = meta.get("general.architecture")
    gemma = arch in _GEMMA_ARCHS
    if gemma:
        tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        ranks = [-float(i) for i in range(len(tokens))]
    else:
        ranks = [float(s) for s in _tokenizer_array(meta, "scores", path)]
        if len(ranks) != len(tokens):
            raise GGUFError(
                f"{path}: metadata key 'tokenizer.ggml.scores' has {len(ranks)} entries for {len(tokens)} tokens"
            )
    vocab = {token: i for i, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_ranks(tokens, ranks, vocab)
    unk = _special_tokens(meta).get("unk_token", "<unk>") if gemma else None
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif arch == "phi3":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
        steps.append(decoders.Strip(content=" ", left=1))
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first", split=False)
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer, lambda token: True


def _merges_from_ranks(tokens: list[str], ranks: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    best-ranked first (ties: longer left, then longer right piece, then the order found)."""
    found = []
    rank_of = dict(zip(tokens, ranks))  # a repeated token keeps its last rank, as a dict would
    for token, rank in rank_of.items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        found += [(rank, left, right) for left, right in pairs]
    found.sort(key=lambda m: (-m[0], -len(m[1]), -len(m[2])))
    return [(left, right) for _, left, right in found]


def _pre_tokenizer(pre: str | None, pre_tokenizers, Regex):
    split = _PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _post_processor(meta: dict[str, Any]):
    """BOS/EOS insertion as the GGUF's add_bos_token / add_eos_token flags ask."""
    from tokenizers import processors

    special = _special_tokens(meta)
    ids = _special_ids(meta)
    bos = special.get("bos_token") if _adds_bos(meta) else None
    eos = special.get("eos_token") if meta.get("tokenizer.ggml.add_eos_token") else None
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    pairs = [(bos, ids["bos_token_id"])] if bos else []
    pairs += [(eos, ids["eos_token_id"])] if eos else []
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=pairs)


def _adds_bos(meta: dict[str, Any]) -> bool:
    """Whether encode() starts with BOS: the file's flag; SentencePiece vocabularies without one
    get BOS, as llama.cpp and transformers do."""
    default = meta.get("tokenizer.ggml.model") == "llama"
    return bool(meta.get("tokenizer.ggml.add_bos_token", default))
