"""Convert a Llama-family GGUF file into a cached Hugging Face checkpoint directory.

The directory holds ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` and ``generation_config.json`` with the values and tensor names that
``transformers`` derives from the same GGUF file, so the rest of lucidlm only has to read one
checkpoint layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from lucidlm.errors import GGUFError

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TOKENIZERS = ("gpt2",)
GGUF_MAGIC = b"GGUF"

# Bump when the layout or content of the converted directory changes, so stale caches are ignored.
FORMAT_VERSION = 1

# Quantisations that gguf.quants.dequantize implements and that we have checked by hand.
SUPPORTED_QUANTS = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp stores precomputed RoPE frequency factors; transformers recomputes them from the config.
_IGNORED_TENSORS = frozenset({"rope_freqs.weight"})
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")

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


# ----------------------------------------------------------------------------- public API


def gguf_to_hf_dir(
    path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> pathlib.Path:
    """Convert a Llama-family GGUF file into a Hugging Face checkpoint directory, cached.

    Args:
        path: the ``.gguf`` file.
        cache_dir: where converted checkpoints live; defaults to ``$LUCIDLM_CACHE`` or
            ``~/.cache/lucidlm``.
        dtype: floating dtype of the tensors written to ``model.safetensors``.
        progress: show a tqdm bar while dequantising tensors.

    Returns:
        The converted directory. A second call with an unchanged file returns it without work.

    Raises:
        GGUFError: the file is missing, not a GGUF, truncated, of an unsupported architecture,
            quantisation or tokenizer, or holds unexpected tensors.
    """
    gguf_path = pathlib.Path(path).expanduser()
    _check_magic(gguf_path)
    root = cache_root(cache_dir)
    target = root / _cache_key(gguf_path, dtype)
    if _is_complete(target):
        return target
    reader = _open_reader(gguf_path)
    _validate(reader, gguf_path)
    return _build_atomically(reader, gguf_path, root, target, dtype, progress)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The cache directory: ``cache_dir``, else ``$LUCIDLM_CACHE``, else ``~/.cache/lucidlm``."""
    if cache_dir is None:
        cache_dir = os.environ.get("LUCIDLM_CACHE") or pathlib.Path.home() / ".cache" / "lucidlm"
    return pathlib.Path(cache_dir).expanduser()


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
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path} holds a model of architecture {arch!r}, which lucidlm cannot convert; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    _check_bounds(reader, path)
    _check_quants(reader, path)
    for tensor in reader.tensors:
        if tensor.name not in _IGNORED_TENSORS:
            _hf_name(tensor.name, path)


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


# ----------------------------------------------------------------------------- cache


def _cache_key(path: pathlib.Path, dtype: torch.dtype) -> str:
    """Folder name: file stem plus a hash of what makes the conversion's result unique."""
    resolved = path.resolve()
    stat = resolved.stat()
    ident = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|v{FORMAT_VERSION}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:20]
    return f"{resolved.stem}-{digest}"


_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _is_complete(target: pathlib.Path) -> bool:
    # The directory only appears through an atomic rename, so existence means complete;
    # the file check guards against a directory someone else put there by hand.
    return target.is_dir() and all((target / name).is_file() for name in _REQUIRED_FILES)


def _build_atomically(reader, path, root, target, dtype, progress) -> pathlib.Path:
    """Build in a temp dir inside ``root``, then rename it into place; never leave debris."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        _write_hf_dir(reader, path, tmp, dtype, progress)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first: use theirs.
            if not _is_complete(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ----------------------------------------------------------------------------- conversion


def _write_hf_dir(reader, path: pathlib.Path, out: pathlib.Path, dtype: torch.dtype, progress: bool) -> None:
    """Write every file of the Hugging Face layout into ``out``."""
    from safetensors.torch import save_file

    meta = _metadata(reader)
    names = [t.name for t in reader.tensors]
    config = _hf_config(meta, names, dtype)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(meta))
    tokenizer = build_tokenizer(meta, path)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(meta))
    tensors = _convert_tensors(reader, path, config, dtype, progress)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _metadata(reader) -> dict[str, Any]:
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _hf_config(meta: dict[str, Any], tensor_names: list[str], dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` for LlamaForCausalLM with the values transformers derives from the GGUF."""
    arch = meta["general.architecture"]

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    hidden, heads = key("embedding_length"), key("attention.head_count")
    rope_theta = float(key("rope.freq_base", 10000.0))
    dtype_name = str(dtype).removeprefix("torch.")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        # transformers takes head_dim from the RoPE width, which equals it for Llama models
        "head_dim": key("rope.dimension_count", hidden // heads),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "max_position_embeddings": key("context_length"),
        "vocab_size": key("vocab_size", len(meta.get("tokenizer.ggml.tokens", ()))),
        "hidden_act": "silu",
        "attention_bias": any(n.endswith(".attn_q.bias") for n in tensor_names),
        "mlp_bias": any(n.endswith(".ffn_up.bias") for n in tensor_names),
        # llama.cpp writes output.weight only when it differs from the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    return config | _special_ids(meta)


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
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
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


def _hf_name(gguf_name: str, path: pathlib.Path) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if match := _BLOCK_RE.fullmatch(gguf_name):
        layer, leaf, suffix = match.groups()
        if leaf in _BLOCK_TENSORS:
            return f"model.layers.{layer}.{_BLOCK_TENSORS[leaf]}.{suffix}"
    elif match := _GLOBAL_RE.fullmatch(gguf_name):
        leaf, suffix = match.groups()
        if leaf in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[leaf]}.{suffix}"
    raise GGUFError(f"{path} holds tensor {gguf_name!r}, which has no place in a Llama model")


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


def _convert_tensors(reader, path, config: dict, dtype: torch.dtype, progress: bool) -> dict[str, torch.Tensor]:
    """Dequantise, rename and un-permute every tensor into an HF state dict."""
    from tqdm.auto import tqdm

    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out: dict[str, torch.Tensor] = {}
    tensors: Iterable = tqdm(
        reader.tensors, desc=f"Converting {path.name}", unit="tensor", disable=not progress
    )
    for tensor in tensors:
        if tensor.name in _IGNORED_TENSORS:
            continue
        value = torch.from_numpy(_dequantize(tensor))
        leaf = tensor.name.split(".")[-2]
        if leaf in heads:
            value = _unpermute_rows(value, heads[leaf])
        out[_hf_name(tensor.name, path)] = value.to(dtype).contiguous()
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
        GGUFError: the GGUF describes a tokenizer model other than byte-level BPE (``gpt2``).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZERS:
        raise GGUFError(
            f"{path} describes a {kind!r} tokenizer; supported tokenizer models: {', '.join(SUPPORTED_TOKENIZERS)}"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
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
    types = list(meta.get("tokenizer.ggml.token_type", []))
    specials = [t for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
    specials += [t for t in _special_tokens(meta).values() if t not in specials and set(t) <= alphabet]
    # Without these, "<|im_start|>" in text would be cut into pieces instead of kept whole.
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    tokenizer.post_processor = _post_processor(meta)
    return tokenizer


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
    bos = special.get("bos_token") if meta.get("tokenizer.ggml.add_bos_token") else None
    eos = special.get("eos_token") if meta.get("tokenizer.ggml.add_eos_token") else None
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    pairs = [(bos, ids["bos_token_id"])] if bos else []
    pairs += [(eos, ids["eos_token_id"])] if eos else []
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=pairs)
