"""Convert a GGUF file into a cached Hugging Face checkpoint directory.

The directory holds ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` and ``generation_config.json`` with the values and tensor names that
``transformers`` derives from the same GGUF file, so the rest of lucidlm only has to read one
checkpoint layout. This module drives the conversion and its cache; the pieces are:

* :mod:`~lucidlm.checkpoints.gguf.reader`: the file's header checks, metadata and dequantised tensors;
* :mod:`~lucidlm.checkpoints.gguf.configs`: each architecture's ``config.json``;
* :mod:`~lucidlm.checkpoints.gguf.tensors`: each architecture's tensor names, and the undoing of
  what llama.cpp's converter did to the weights;
* :mod:`~lucidlm.checkpoints.gguf.tokenizer`: the tokenizer files.

Each GGUF ``general.architecture`` that llama.cpp exports and transformers' GGUF loader reads, and
that lucidlm's model implements, is one entry of :data:`~.tensors.GGUF_FAMILIES`
(:data:`SUPPORTED_ARCHITECTURES`).

>>> "llama" in SUPPORTED_ARCHITECTURES and "Q4_K" in SUPPORTED_QUANTS
True
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
from typing import Any

import torch

import lucidlm.checkpoints.conversion_cache as conversion_cache

from ...errors import GGUFError, LucidError
from ...fileio import atomic_path, cache_root, temp_dir
from .reader import (GGUF_MAGIC, SUPPORTED_QUANTS, Keys, check_bounds, check_magic, check_quants, dequantize, field,
                     metadata, open_reader)
from .rope_freqs import llama3_parameters
from .tensors import GGUF_FAMILIES, SUPPORTED_ARCHITECTURES, check_names, convert_tensors
from .tokenizer import SUPPORTED_TOKENIZERS, build_tokenizer, generation_config, special_ids, tokenizer_config

__all__ = ["FORMAT_VERSION", "GGUF_MAGIC", "SUPPORTED_ARCHITECTURES", "SUPPORTED_QUANTS", "SUPPORTED_TOKENIZERS",
           "build_tokenizer", "cache_root", "gguf_to_hf_dir", "read_metadata"]

# The converted directory's format version: bump conversion_cache.FORMAT_VERSION when the layout
# or content of what _write_hf_dir writes changes, so stale cache entries are ignored.
FORMAT_VERSION = conversion_cache.FORMAT_VERSION


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
    check_magic(gguf_path)
    root = cache_root(cache_dir)
    content = conversion_cache.fingerprint(gguf_path)  # None: a header our quick walk cannot read
    found = content and _cached(root, content, dtype)
    if found:
        return found
    if progress:  # the header alone can take seconds to parse: say what is going on first
        print(f"lucidlm: converting {gguf_path.name} to a {str(dtype).removeprefix('torch.')} Hugging Face "
              f"checkpoint in {root} (once per file; `lucidlm cache list` shows the cache)",
              file=sys.stderr, flush=True)
    reader = open_reader(gguf_path)
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
    check_magic(gguf_path)
    return metadata(open_reader(gguf_path))


def _validate(reader, path: pathlib.Path) -> None:
    """Check architecture, tensor bounds, quantisations and names before writing anything."""
    arch = field(reader, "general.architecture")
    if arch not in GGUF_FAMILIES:
        raise GGUFError(
            f"{path} holds a model of architecture {arch!r}, which lucidlm cannot convert; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    check_bounds(reader, path)
    check_quants(reader, path)
    check_names([t.name for t in reader.tensors], arch, path)


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

    meta = metadata(reader)
    names = [t.name for t in reader.tensors]
    config = _with_rope_freqs(_hf_config(meta, names, dtype, path), reader, path)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation_config(meta))
    tokenizer = build_tokenizer(meta, path)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config(meta))
    with tqdm(total=len(reader.tensors), desc=f"Converting {path.name}", unit="tensor", disable=not progress) as bar:
        tensors = convert_tensors(reader, path, config, dtype, bar)
        bar.set_postfix_str("writing model.safetensors")
        with atomic_path(out / "model.safetensors") as tmp:  # and the umask's mode: save_file makes 0600
            save_file(tensors, str(tmp), metadata={"format": "pt"})


def _with_rope_freqs(config: dict[str, Any], reader, path: pathlib.Path) -> dict[str, Any]:
    """``config`` with the RoPE scaling a ``rope_freqs`` tensor (Llama 3.1's) stands for."""
    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return config
    params = config["rope_parameters"]
    if params["rope_type"] != "default":
        raise GGUFError(f"{path} scales RoPE both by rope.scaling.type {params['rope_type']!r} and by a rope_freqs "
                        "tensor: lucidlm implements one or the other")
    factors = torch.from_numpy(dequantize(tensor))
    return config | {"rope_parameters": llama3_parameters(factors, params["rope_theta"], config["head_dim"], path)}


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _hf_config(
    meta: dict[str, Any], tensor_names: list[str], dtype: torch.dtype, path: str | os.PathLike[str] = "<gguf>"
) -> dict[str, Any]:
    """``config.json`` of the architecture's transformers model, from the GGUF metadata.

    Raises:
        GGUFError: a key the architecture needs is missing or of the wrong type, or the file asks
            for RoPE scaling lucidlm does not implement.
    """
    keys = Keys(meta, path)
    family = GGUF_FAMILIES[keys.arch]
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
        **special_ids(meta),
    }
