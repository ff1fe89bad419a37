"""Write a Hugging Face model (config, state dict, tokenizer) as one GGUF file, the way llama.cpp's
``convert_hf_to_gguf.py`` does, with the ``gguf`` package's own writer and quantisers.

Which type each tensor gets follows the converter (``ModelBase.prepare_tensors``): 1-D tensors,
norms, biases and GPT-2's position table stay F32; every other matrix takes the file type, and a
matrix whose rows do not split into 32-value blocks falls back to F16 for Q8_0 and Q4_0. Q4_0 is
what ``llama-quantize --pure`` writes (every matrix, embedding and output included, in Q4_0).

>>> [tensor_type("blk.0.attn_q.weight", (64, 64), t).name for t in ("f16", "bf16", "q8_0", "q4_0")]
['F16', 'BF16', 'Q8_0', 'Q4_0']
>>> tensor_type("blk.0.attn_norm.weight", (64,), "q4_0").name, tensor_type("position_embd.weight", (8, 64), "f16").name
('F32', 'F32')
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ...dtypes import GGUF_EXPORT_TYPES
from ...errors import ExportError
from ...fileio import atomic_path

EXPORT_TYPES = GGUF_EXPORT_TYPES  # the torch-free list the command line offers
# --type -> (ggml tensor type, llama.cpp's general.file_type)
_FILE_TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2)}
# tensors the converter keeps in F32 whatever the file type (MODEL_TENSOR.POS_EMBD, TOKEN_TYPES)
_ALWAYS_F32 = ("position_embd.weight", "token_types.weight")
_ALWAYS_F32_LEAVES = (".ffn_gate_inp.weight", ".ffn_gate_inp_shexp.weight")  # the MoE routers
_QUANT_VERSION = 2  # gguf.GGML_QUANT_VERSION


def check_type(kind: str) -> str:
    """``kind`` lower-cased, or ExportError naming the supported types."""
    if str(kind).lower() not in EXPORT_TYPES:
        raise ExportError(f"type={kind!r}: expected one of {', '.join(EXPORT_TYPES)}")
    return str(kind).lower()


def tensor_type(name: str, shape: tuple[int, ...], kind: str):
    """The ggml type llama.cpp's converter gives tensor ``name`` in a ``kind`` file."""
    from gguf import GGMLQuantizationType

    if len(shape) <= 1 or name.endswith(("_norm.weight", *_ALWAYS_F32_LEAVES)) or not name.endswith(".weight") or (
            name in _ALWAYS_F32):
        return GGMLQuantizationType.F32
    return GGMLQuantizationType[_FILE_TYPES[kind][0]]


def _encode(name: str, value: torch.Tensor, kind: str) -> tuple[np.ndarray, Any]:
    """The bytes (or floats) to store for one tensor, and their ggml type."""
    from gguf import GGMLQuantizationType, QuantError
    from gguf.quants import quantize

    array = value.detach().to(torch.float32).contiguous().numpy()
    qtype = tensor_type(name, array.shape, kind)
    try:
        return quantize(array, qtype), qtype
    except QuantError:  # rows not divisible into 32-value blocks: the converter's fallback
        return quantize(array, GGMLQuantizationType.F16), GGMLQuantizationType.F16


def _add_value(writer, key: str, value: Any) -> None:
    """One metadata key, typed as llama.cpp reads it (integers uint32, arrays by their items)."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise ExportError(f"metadata key {key!r}: cannot store a {type(value).__name__}")


def write_gguf(
    path: str | os.PathLike[str],
    arch: str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    kind: str = "f16",
    bar=None,
) -> pathlib.Path:
    """Write ``tensors`` (GGUF names, llama.cpp's layout: see :func:`.tensors.gguf_tensors`) and
    ``metadata`` (full keys, ``general.architecture`` and ``general.file_type`` aside) to ``path``,
    atomically: a failure leaves no file and no temporary one. ``bar``: a progress bar advanced by
    one per tensor."""
    from gguf import GGUFWriter

    kind = check_type(kind)
    writer = GGUFWriter(path=None, arch=arch)
    writer.add_type("model")
    for key, value in metadata.items():
        _add_value(writer, key, value)
    writer.add_file_type(_FILE_TYPES[kind][1])
    writer.add_quantization_version(_QUANT_VERSION)
    for name, value in tensors.items():
        data, qtype = _encode(name, value, kind)
        writer.add_tensor(name, data, raw_dtype=qtype)
        if bar is not None:
            bar.update(1)
    with atomic_path(path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return pathlib.Path(path)
