"""Differences between two GGUF files as ``gguf.GGUFReader`` reads them: tensor names, shapes, ggml
types and raw bytes, and metadata keys and values. Used by tests/test_gguf_export_llamacpp.py to hold
lucidlm's export against llama.cpp's own converter."""

from __future__ import annotations

import math
import pathlib
from typing import Any

import numpy as np


def metadata(reader) -> dict[str, Any]:
    """Every key's value, arrays as lists (strings decoded)."""
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.contents()
        out[name] = value
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and (
            a == b or (math.isnan(a) and math.isnan(b)))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _types(reader) -> dict[str, int]:
    return {name: field.types[0].value for name, field in reader.fields.items() if field.types}


def differences(ours: pathlib.Path, theirs: pathlib.Path, ignored_keys: frozenset[str] = frozenset()) -> list[str]:
    """What differs between ``ours`` and ``theirs``, one line per difference (empty: the same)."""
    import gguf

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    found: list[str] = []
    meta_a, meta_b = metadata(a), metadata(b)
    types_a, types_b = _types(a), _types(b)
    for key in sorted(set(meta_a) | set(meta_b)):
        if key in ignored_keys:
            continue
        if key not in meta_a or key not in meta_b:
            side = "ours" if key in meta_a else "llama.cpp's"
            found.append(f"key {key}: only in {side} ({_short(meta_a.get(key, meta_b.get(key)))})")
        elif not _same(meta_a[key], meta_b[key]):
            found.append(f"key {key}: ours {_short(meta_a[key])} != llama.cpp's {_short(meta_b[key])}")
        elif types_a[key] != types_b[key]:
            found.append(f"key {key}: type ours {types_a[key]} != llama.cpp's {types_b[key]}")
    tensors_a = {t.name: t for t in a.tensors}
    tensors_b = {t.name: t for t in b.tensors}
    for name in sorted(set(tensors_a) ^ set(tensors_b)):
        side = "ours" if name in tensors_a else "llama.cpp's"
        found.append(f"tensor {name}: only in {side}")
    for name in sorted(set(tensors_a) & set(tensors_b)):
        x, y = tensors_a[name], tensors_b[name]
        if x.tensor_type != y.tensor_type:
            found.append(f"tensor {name}: type ours {x.tensor_type.name} != llama.cpp's {y.tensor_type.name}")
        elif list(x.shape) != list(y.shape):
            found.append(f"tensor {name}: shape ours {list(x.shape)} != llama.cpp's {list(y.shape)}")
        elif not np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)):
            found.append(f"tensor {name}: bytes differ ({_value_gap(x, y)})")
    return found


def _value_gap(x, y) -> str:
    import gguf.quants

    dx = gguf.quants.dequantize(x.data, x.tensor_type).astype(np.float64)
    dy = gguf.quants.dequantize(y.data, y.tensor_type).astype(np.float64)
    return f"max |ours - llama.cpp's| = {np.abs(dx - dy).max():.3g}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 120 else text[:100] + f"... ({len(value) if hasattr(value, '__len__') else ''})"
