"""Loading a GGUF file with its Q8_0, Q4_0 and Q4_1 weights kept as blocks (``keep_quantized=True``).

Each kept tensor's raw bytes are read from the file on their own (no memory map over the whole file
stays resident) and split into the storage of :mod:`lucidlm.model.qlinear`:

* Q8_0, 34 bytes per 32 weights: a float16 scale ``d``, then 32 int8 values -> ``qs`` int8 (n, k),
  ``scales`` float16 (n, k // 32);
* Q4_0, 18 bytes: ``d``, then 16 bytes of nibbles -> ``qs`` uint8 (n, k // 2), ``scales``;
* Q4_1, 20 bytes: ``d``, a float16 minimum ``m``, 16 bytes of nibbles -> ``qs``, ``scales``, ``mins``.

The layers that read them are :class:`~lucidlm.model.qmodules.QuantLinear` and
:class:`~lucidlm.model.qmodules.QuantEmbedding`. What llama.cpp's converter did to a tensor is undone
on its rows (Llama's Q/K permutation, fused matrices split into ours): each kept tensor is first run
through the float path as a column of row numbers, and its blocks are gathered by the rows that come
out. A tensor whose undoing is not a row reordering (GPT-2's transposed matrices, stacked experts) and
every other block type (Q4_K, Q6_K, ...) is dequantised to float as :func:`~lucidlm.checkpoints.gguf
.gguf_to_hf_dir` does, with a :class:`KeptFloatWarning` naming the types and tensor counts.

>>> import numpy as np
>>> raw = np.zeros((2, 34), np.uint8)        # two rows of one Q8_0 block each
>>> raw[:, :2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
>>> raw[1, 2:] = 2
>>> qs, scales, mins = split_blocks(raw, "Q8_0", 2, 32)
>>> qs.dtype, qs[1, 0].item(), scales.dtype, scales.tolist(), mins
(torch.int8, 2, torch.float16, [[0.5], [0.5]], None)
"""

from __future__ import annotations

import json
import pathlib
import warnings
from collections import Counter

import numpy as np
import torch
from torch import nn

from ...config import Config
from ...errors import CheckpointError
from ...model import GPT
from ...model.qmodules import QuantEmbedding, QuantLinear
from ..layouts import hf_to_ours
from .header import TensorInfo, tensor_infos
from .tensors import GGUF_FAMILIES, _hf_name, _restore

__all__ = ["KEPT_TYPES", "KeptFloatWarning", "load_keep_quantized", "split_blocks"]

#: block type -> (bytes per 32-weight block, whether it carries a minimum, bits per weight)
KEPT_TYPES = {"Q8_0": (34, False, 8), "Q4_0": (18, False, 4), "Q4_1": (20, True, 4)}
_FLOAT_TYPES = ("F32", "F16", "BF16")
_BLOCK = 32
_READ_BYTES = 4 << 20  # a kept tensor is read in slices of about this many bytes

Blocks = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


class KeptFloatWarning(UserWarning):
    """``keep_quantized=True`` dequantised some weights to float (a block type without a kernel)."""


def split_blocks(raw: np.ndarray, kind: str, rows: int, cols: int) -> Blocks:
    """``(qs, scales, mins)`` of a ``kind`` tensor of ``rows`` x ``cols`` weights from its raw bytes."""
    size, has_min, bits = KEPT_TYPES[kind]
    blocks = raw.reshape(rows, cols // _BLOCK, size)
    scales = torch.from_numpy(blocks[:, :, 0:2].copy().view(np.float16).reshape(rows, -1))
    mins = torch.from_numpy(blocks[:, :, 2:4].copy().view(np.float16).reshape(rows, -1)) if has_min else None
    data = blocks[:, :, 4 if has_min else 2:].copy()
    qs = torch.from_numpy(data.view(np.int8) if bits == 8 else data).reshape(rows, -1)
    return qs, scales, mins


def load_keep_quantized(path: pathlib.Path, directory: pathlib.Path, dtype: torch.dtype,
                        device: str | torch.device = "cpu") -> GPT:
    """The model of GGUF ``path`` with its Q8_0/Q4_0/Q4_1 weights kept as blocks (``directory``: the
    file's converted Hugging Face directory, for its ``config.json``).

    Raises:
        CheckpointError: the architecture regroups tensors across files (gpt-oss, DeepSeek-V2), or a
            tensor the model needs is missing.
    """
    hf_config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    config = Config.from_hf(hf_config)
    arch, infos = tensor_infos(path)
    family = GGUF_FAMILIES[arch].for_names(info.name for info in infos)
    if family.regroup is not None:
        raise CheckpointError(f"{path}: keep_quantized=True does not support {arch!r} models (their tensors are "
                              "regrouped on loading); load without keep_quantized")
    kept, floats, dequantised = _read_tensors(infos, path, family, hf_config, config, dtype)
    if dequantised:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(dequantised.items()))
        warnings.warn(f"keep_quantized: {path.name}: {counts} tensor(s) dequantised to float "
                      f"(kept as blocks: {', '.join(KEPT_TYPES)})", KeptFloatWarning, stacklevel=3)
    return _build(config, kept, floats, dtype, device, path)


def _read_tensors(infos: list[TensorInfo], path, family, hf_config: dict, config: Config, dtype: torch.dtype):
    """(kept blocks by our name, float tensors by our name, dequantised block types counted)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as ggml_dequantize

    kept: dict[str, Blocks] = {}
    hf_floats: dict[str, torch.Tensor] = {}
    dequantised: Counter[str] = Counter()
    with open(path, "rb") as handle:
        for info in infos:
            if info.name in family.ignored:
                continue
            rows = _row_map(info.name, info.shape, family, hf_config, config) if info.kind in KEPT_TYPES else None
            if rows is not None:
                blocks = _read_blocks(handle, info)
                kept.update({name: _gather(blocks, index) for name, index in rows.items()})
                continue
            raw = _read_bytes(handle, info.offset, info.nbytes)
            if info.kind not in _FLOAT_TYPES:
                dequantised[info.kind] += 1
            values = ggml_dequantize(raw, GGMLQuantizationType[info.kind]).astype(np.float32, copy=False)
            value = _restore(torch.from_numpy(values.reshape(info.shape)), info.name, family, hf_config)
            name = _hf_name(info.name, family)
            if "{}" in name:  # one stacked tensor -> one per expert (or head)
                hf_floats.update({name.format(i): part.to(dtype).contiguous() for i, part in enumerate(value)})
            else:
                hf_floats[name] = value.to(dtype).contiguous()
    floats, unknown = hf_to_ours(hf_floats, config)
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensors for {config.family!r} layout: {', '.join(unknown[:5])}")
    return kept, floats, dequantised


def _row_map(name: str, shape: list[int], family, hf_config: dict, config: Config) -> dict[str, torch.Tensor] | None:
    """Our tensor names -> the rows of GGUF tensor ``name`` each holds, or None where restoring the
    tensor is more than a reordering of whole rows (then it is dequantised instead)."""
    hf_name = _hf_name(name, family)
    if len(shape) != 2 or hf_name is None or "{}" in hf_name or shape[1] % _BLOCK:
        return None
    proxy = torch.arange(shape[0], dtype=torch.float64)[:, None]  # exact row numbers through the float path
    restored = _restore(proxy, name, family, hf_config)
    ours, unknown = hf_to_ours({hf_name: restored}, config)
    if unknown or not ours or any(t.dim() != 2 or t.shape[1] != 1 for t in ours.values()):
        return None
    return {our: index[:, 0].long() for our, index in ours.items()}


def _gather(blocks: Blocks, rows: torch.Tensor) -> Blocks:
    if torch.equal(rows, torch.arange(blocks[0].shape[0])):  # the common case: nothing to reorder, no copy
        return blocks
    return tuple(None if t is None else t[rows].contiguous() for t in blocks)  # type: ignore[return-value]


def _read_blocks(handle, info: TensorInfo) -> Blocks:
    """A kept tensor's blocks, read a slice of rows at a time into their final tensors (the raw bytes of
    the whole tensor never exist beside them)."""
    rows, cols = info.shape
    row_bytes = info.nbytes // rows
    step = max(1, _READ_BYTES // row_bytes)
    out: list | None = None
    for start in range(0, rows, step):
        count = min(step, rows - start)
        part = split_blocks(_read_bytes(handle, info.offset + start * row_bytes, count * row_bytes), info.kind,
                            count, cols)
        if count == rows:
            return part
        if out is None:
            out = [None if t is None else t.new_empty((rows, t.shape[1])) for t in part]
        for whole, piece in zip(out, part):
            if whole is not None:
                whole[start:start + count] = piece
    return tuple(out)  # type: ignore[arg-type, return-value]


def _read_bytes(handle, offset: int, size: int) -> np.ndarray:
    """``size`` bytes at ``offset``, read into a fresh buffer (no page of the file stays mapped)."""
    out = np.empty(size, dtype=np.uint8)
    handle.seek(offset)
    if handle.readinto(memoryview(out)) != size:
        raise CheckpointError(f"{handle.name} is truncated: {size} bytes expected at offset {offset}")
    return out


def _build(config: Config, kept: dict[str, Blocks], floats: dict[str, torch.Tensor], dtype: torch.dtype,
           device, path: pathlib.Path) -> GPT:
    """A GPT whose layers named in ``kept`` hold the blocks and whose other weights are ``floats``."""
    with torch.device("meta"):
        model = GPT(config).to(dtype)
    for name, (qs, scales, mins) in kept.items():
        module_name = name.removesuffix(".weight")
        module = model.get_submodule(module_name)
        blocks = tuple(None if t is None else t.to(device) for t in (qs, scales, mins))
        if isinstance(module, nn.Embedding):
            layer: nn.Module = QuantEmbedding(*blocks, dtype=dtype)
        elif isinstance(module, nn.Linear):
            bias = floats.pop(f"{module_name}.bias", None)
            layer = QuantLinear(*blocks, bias=None if bias is None else bias.to(device), dtype=dtype)
        else:
            raise CheckpointError(f"{path}: tensor {name} of {config.family!r} is no linear or embedding layer's "
                                  "weight; load without keep_quantized")
        parent, _, leaf = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)
    if config.tie_embeddings:
        floats.pop("lm_head.weight", None)
        if isinstance(model.embed, QuantEmbedding):
            bias = floats.pop("lm_head.bias", None)
            model.lm_head = QuantLinear.tied_to(model.embed, None if bias is None else bias.to(device))
        elif "embed.weight" in floats:
            floats["lm_head.weight"] = floats["embed.weight"]
    model.load_state_dict({k: v.to(device) for k, v in floats.items()}, strict=False, assign=True)
    if config.tie_embeddings and not isinstance(model.embed, QuantEmbedding):
        model.lm_head.weight = model.embed.weight
    for module in model.modules():  # non-persistent buffers (RoPE) were built on "meta"
        if hasattr(module, "reset_rope"):
            module.reset_rope()
    _check_materialised(model, path)
    return model.eval()


def _check_materialised(model: GPT, path: pathlib.Path) -> None:
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise CheckpointError(f"{path}: missing tensors for {model.config.name}: {', '.join(missing[:5])}")

