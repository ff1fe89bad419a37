"""The tensor table of a GGUF file, read without ``gguf.GGUFReader``'s objects for every metadata value.

``GGUFReader`` turns each metadata value (a vocabulary of 49k strings, its merges ...) into numpy
objects: for a 100 MB model that is about 170 MB of transient memory. Loading with
``keep_quantized=True`` must stay close to the file's size, and needs from the header only the
architecture and each tensor's name, type, shape and place; this module walks the header for just
those (the values are skipped, the format is https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).

>>> import gguf, numpy as np, pathlib, tempfile
>>> path = pathlib.Path(tempfile.mkdtemp()) / "t.gguf"
>>> writer = gguf.GGUFWriter(str(path), arch="llama")
>>> writer.add_token_list(["a", "b"])
>>> writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 32), np.float32))
>>> writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
>>> arch, infos = tensor_infos(path)
>>> arch, infos[0].name, infos[0].kind, infos[0].shape, infos[0].nbytes
('llama', 'blk.0.attn_q.weight', 'F32', [4, 32], 512)
"""

from __future__ import annotations

import dataclasses
import pathlib
import struct
from typing import BinaryIO

from ...errors import GGUFError

__all__ = ["TensorInfo", "tensor_infos"]

# GGUF value types -> struct format of a fixed-size value (8: string, 9: array are walked)
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: ``shape`` in torch (row-major) order, ``offset`` from the file's start."""

    name: str
    kind: str  # the ggml type's name: "Q8_0", "F32" ...
    shape: list[int]
    offset: int
    nbytes: int


def tensor_infos(path: pathlib.Path) -> tuple[str, list[TensorInfo]]:
    """``(general.architecture, the tensors)`` of GGUF ``path``.

    Raises:
        GGUFError: the header is truncated or names a value or tensor type this reader does not know.
    """
    try:
        with open(path, "rb") as handle:
            return _walk(handle, path)
    except (struct.error, UnicodeDecodeError, KeyError, ValueError) as exc:
        raise GGUFError(f"{path} is truncated or corrupt: its header cannot be read ({exc})") from exc


def _walk(handle: BinaryIO, path: pathlib.Path) -> tuple[str, list[TensorInfo]]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    magic, _version, n_tensors, n_kv = struct.unpack("<4sIQQ", handle.read(24))
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file: it starts with {magic!r}")
    arch, alignment = None, 32
    for _ in range(n_kv):
        key = _string(handle)
        kind = _unpack(handle, "I")
        if key == "general.architecture" and kind == _STRING:
            arch = _string(handle)
        elif key == "general.alignment" and kind == 4:
            alignment = _unpack(handle, "I")
        else:
            _skip(handle, kind)
    raw = []
    for _ in range(n_tensors):
        name = _string(handle)
        dims = [_unpack(handle, "Q") for _ in range(_unpack(handle, "I"))]
        raw.append((name, GGMLQuantizationType(_unpack(handle, "I")), dims, _unpack(handle, "Q")))
    start = -(-handle.tell() // alignment) * alignment  # the data begins at the next aligned offset
    infos = []
    for name, qtype, dims, offset in raw:
        block, size = GGML_QUANT_SIZES[qtype]
        count = 1
        for d in dims:
            count *= d
        infos.append(TensorInfo(name, qtype.name, list(reversed(dims)), start + offset, count // block * size))
    if arch is None:
        raise GGUFError(f"{path} lacks the metadata key 'general.architecture'")
    return arch, infos


def _unpack(handle: BinaryIO, fmt: str):
    size = struct.calcsize("<" + fmt)
    return struct.unpack("<" + fmt, handle.read(size))[0]


def _string(handle: BinaryIO) -> str:
    return handle.read(_unpack(handle, "Q")).decode("utf-8")


def _skip(handle: BinaryIO, kind: int) -> None:
    if kind in _FIXED:
        handle.seek(struct.calcsize("<" + _FIXED[kind]), 1)
    elif kind == _STRING:
        handle.seek(_unpack(handle, "Q"), 1)
    elif kind == _ARRAY:
        item, count = _unpack(handle, "I"), _unpack(handle, "Q")
        if item in _FIXED:
            handle.seek(struct.calcsize("<" + _FIXED[item]) * count, 1)
        else:
            for _ in range(count):
                _skip(handle, item)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")
