"""Export a loaded model to GGUF: the weights in llama.cpp's layout (:func:`.tensors.gguf_tensors`),
its hyper-parameters (:mod:`.hparams`), its tokenizer and chat template (:mod:`.vocab`, or the
source file's own keys when the model came from a GGUF file) and ``general.*`` metadata, written by
:func:`.writer.write_gguf`. :meth:`lucidlm.LLM.export_gguf` and ``lucidlm export`` call
:func:`export_gguf`.

>>> general_keys({}, "HuggingFaceTB/SmolLM2-135M-Instruct")["general.source.repo_url"]
'https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct'
>>> general_keys({"general.name": "SmolLM2"}, "HuggingFaceTB/SmolLM2-135M-Instruct")["general.source.repo_url"]
'https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct'
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import torch

from ...errors import ExportError
from ..layouts import ours_to_hf
from ..origin import GGUF_SOURCE_KEYS
from .hparams import architecture_keys, gguf_architecture, rope_freqs
from .tensors import gguf_tensors
from .vocab import tokenizer_keys
from .writer import check_type, write_gguf

# general.* keys of a source GGUF that describe the file, not the model: the writer sets its own
_FILE_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.type",
              "general.alignment")


def export_gguf(
    model,
    path: str | os.PathLike[str],
    kind: str = "f16",
    *,
    tokenizer_dir: pathlib.Path | None,
    source: str | None = None,
    name: str | None = None,
    progress: bool = False,
) -> pathlib.Path:
    """Write ``model`` (a :class:`~lucidlm.model.GPT` loaded from a Hugging Face config) to the GGUF
    file ``path`` as type ``kind`` (f32, f16, bf16, q8_0, q4_0), atomically.

    ``source``: where the model was loaded from; a ``.gguf`` source lends its tokenizer and
    ``general.*`` keys verbatim. ``name``: the model's name (``org/name`` for a hub id).

    Raises:
        ExportError: an unsupported family or setting, no tokenizer, or an unknown type.
    """
    kind = check_type(kind)
    hf = model.config.hf_config
    if hf is None:
        raise ExportError(f"{model.config.name}: only models loaded from a Hugging Face config can be exported "
                          "to GGUF")
    arch = gguf_architecture(hf)
    source_meta = _gguf_metadata(source)
    metadata = general_keys(source_meta, name)
    metadata |= {f"{arch}.{k}": v for k, v in architecture_keys(hf, arch).items()}
    metadata |= _tokenizer(source_meta, tokenizer_dir, arch, hf)
    tensors = _tensors(model, arch, hf)
    from ...progress import progress as progress_bar

    with progress_bar(len(tensors), f"Exporting {kind}", unit="tensor", disable=not progress) as bar:
        return write_gguf(path, arch, tensors, metadata, kind, bar=bar)


def _tensors(model, arch: str, hf: dict[str, Any]) -> dict[str, torch.Tensor]:
    state = ours_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()}, model.config)
    heads = hf.get("num_attention_heads")
    tensors = gguf_tensors(state, arch, {**hf, "num_key_value_heads": hf.get("num_key_value_heads") or heads})
    factors = rope_freqs(hf, arch)
    return tensors if factors is None else {"rope_freqs.weight": factors, **tensors}


def _gguf_metadata(source: str | None) -> dict[str, Any]:
    """The metadata of a ``.gguf`` source, else ``{}``."""
    if not source or not pathlib.Path(source).is_file():
        return {}
    with open(source, "rb") as handle:
        if handle.read(4) != b"GGUF":
            return {}
    from . import read_metadata

    return read_metadata(source)


def general_keys(source_meta: dict[str, Any], name: str | None) -> dict[str, Any]:
    """``general.*``: the source GGUF's own (name, organization, license...) or, for a Hugging Face
    model, its name and organization; a hub id ``org/name`` also becomes ``general.source.repo_url``
    (llama.cpp's key for the repository a file was converted from) unless the source names one, so
    that the file, and an adapter trained on it, still name their base on another machine."""
    keys = {k: v for k, v in source_meta.items() if k.startswith("general.") and k not in _FILE_KEYS}
    organization, _, base = (name or "").rpartition("/")
    if not keys and name:
        keys["general.name"] = base
        if organization and "/" not in organization:
            keys["general.organization"] = organization
    if organization and "/" not in organization and not any(k in keys for k in GGUF_SOURCE_KEYS):
        keys["general.source.repo_url"] = f"https://huggingface.co/{name}"
    return keys


def _tokenizer(source_meta: dict[str, Any], directory: pathlib.Path | None, arch: str,
               hf: dict[str, Any]) -> dict[str, Any]:
    if any(k.startswith("tokenizer.") for k in source_meta):
        return {k: v for k, v in source_meta.items() if k.startswith("tokenizer.")}
    if directory is None:
        raise ExportError("the model has no tokenizer files: a GGUF file must carry its tokenizer")
    return tokenizer_keys(pathlib.Path(directory), arch, hf)
