"""Reading a GGUF file: its header checks, its metadata, and its tensors as float32.

The ``gguf`` package (llama.cpp's own reader) parses the file; this module turns what can go wrong
(a missing or truncated file, damage in the header, an unsupported quantisation, a missing or
mistyped metadata key) into :class:`~lucidlm.errors.GGUFError` naming the file.

>>> keys = Keys({"general.architecture": "llama", "llama.block_count": 2}, "x.gguf")
>>> keys.integer("block_count"), keys.number("rope.freq_base", 10000.0)
(2, 10000.0)
>>> keys.integer("embedding_length")
Traceback (most recent call last):
lucidlm.errors.GGUFError: x.gguf lacks the metadata key 'llama.embedding_length', which a 'llama' model needs
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...errors import GGUFError

GGUF_MAGIC = b"GGUF"

# Quantisations that gguf.quants.dequantize implements and that we have checked by hand.
SUPPORTED_QUANTS = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4",
)  # fmt: skip


_REQUIRED = object()


class Keys:
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


def check_magic(path: pathlib.Path) -> None:
    """Fail early, with the path, on a missing file or one that is not GGUF at all."""
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file: it starts with {magic!r}, expected {GGUF_MAGIC!r}")


def open_reader(path: pathlib.Path):
    """Parse the header; a corrupt or truncated header surfaces as GGUFError naming the file."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    # GGUFReader reports damage through whichever error numpy or struct hits first
    # (ValueError, IndexError, KeyError, OverflowError...), so every one of them means "corrupt".
    except Exception as exc:  # noqa: BLE001
        raise GGUFError(f"{path} is truncated or corrupt: it cannot be parsed as GGUF ({exc})") from exc


def check_bounds(reader, path: pathlib.Path) -> None:
    """A truncated file can still parse; its tensor data then runs past the end of the file."""
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise GGUFError(
                f"{path} is truncated: tensor {tensor.name!r} needs bytes up to {end}, "
                f"but the file has only {size} bytes"
            )


def check_quants(reader, path: pathlib.Path) -> None:
    """Name every tensor type we cannot dequantise, rather than failing halfway through."""
    bad = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type.name not in SUPPORTED_QUANTS})
    if bad:
        raise GGUFError(
            f"{path} uses unsupported quantisation {', '.join(bad)}; supported: {', '.join(SUPPORTED_QUANTS)}"
        )


def field(reader, key: str, default: Any = None) -> Any:
    """One metadata value as a plain Python value, or ``default`` when the file lacks ``key``."""
    found = reader.get_field(key)
    return default if found is None else found.contents()


def metadata(reader) -> dict[str, Any]:
    """All metadata key/values as plain Python values (without the reader's own ``GGUF.*`` fields)."""
    return {key: value.contents() for key, value in reader.fields.items() if not key.startswith("GGUF.")}


def dequantize(tensor) -> np.ndarray:
    """A tensor's values as float32, in torch (row-major, reversed ggml) shape."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as ggml_dequantize

    if tensor.tensor_type == GGMLQuantizationType.F32:
        values = np.array(tensor.data, dtype=np.float32)  # copy out of the read-only memmap
    else:
        values = ggml_dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
