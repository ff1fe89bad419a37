"""The cache of converted GGUF files (``lucidlm cache list`` / ``lucidlm cache clear``:
:mod:`lucidlm.commands.cache`).

``LLM.load("model.gguf")`` converts the file once into a Hugging Face checkpoint directory (see
:mod:`lucidlm.checkpoints.gguf`) under :func:`cache_root`: ``$LUCIDLM_CACHE`` if set, else
``~/.cache/lucidlm``. One directory per GGUF *content*: the key is a fingerprint of the file (see
:func:`fingerprint`), the dtype and the converter's :data:`FORMAT_VERSION`, never the file's path,
so every virtual environment, clone or copy of the same file shares one conversion.

Every entry appears through one atomic rename of a finished temporary directory, and leaves
through a rename to a ``.trash-`` name before it is deleted, so a reader never sees half an entry.
Each entry holds ``lucidlm-source.json`` (the GGUF's name, path, size, dtype, format version); its
directory's modification time is its last use.

This module imports neither torch nor numpy: ``lucidlm cache`` starts fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import mmap
import os
import pathlib
import re
import shutil
import struct
import time
import uuid
from collections.abc import Iterable

from ..fileio import CACHE_ENV_VAR as ENV_VAR  # noqa: F401  (the one name; lucidlm cache shows it)
from ..fileio import cache_root  # noqa: F401  (the one cache directory; this module's callers name it here)

# Bump when the layout or content of a converted directory changes: entries of other versions are
# then never used again (``lucidlm cache list`` marks them "old", ``lucidlm cache clear`` removes them).
FORMAT_VERSION = 4

SOURCE_FILE = "lucidlm-source.json"  # in each entry: where it came from (what ``cache list`` shows)
_SAMPLE = 4096  # bytes hashed at the start, middle and end of every tensor's data
_DIGEST_CHARS = 20
_ENTRY_RE = re.compile(rf"^(?P<stem>.+)-(?P<digest>[0-9a-f]{{{_DIGEST_CHARS}}})$")
_STALE_TEMP_SECONDS = 24 * 3600  # a .tmp- directory this old belongs to a conversion that died


# ----------------------------------------------------------------------------- the key


def fingerprint(path: str | os.PathLike[str]) -> str | None:
    """A content fingerprint of a GGUF file, cheap enough to compute on every load.

    SHA-256 of: the file's size; every byte before the tensor data (magic, version, all metadata:
    architecture, hyperparameters, the whole tokenizer; then each tensor's name, shape,
    quantisation and offset); and 4 KiB at the start, the middle and the end of each tensor's data.
    It reads the header (a few MB at most, for a large vocabulary) plus 12 KiB per tensor, whatever
    the file's size: milliseconds where hashing a multi-GB file would take seconds to minutes.

    Why that is safe enough: two files with the same fingerprint have the same size, the same
    config and tokenizer, the same tensors at the same offsets in the same quantisation, and the
    same bytes in three places of every tensor. Different checkpoints differ there: another model,
    quantisation or export changes the header or the layout, and a fine-tune (merged LoRA
    included: its update is dense) changes every element of each tensor it trained, hence the
    sampled bytes of that tensor. What it cannot see is an edit confined to unsampled bytes
    (editing weights by hand); ``lucidlm cache clear NAME`` then forces a new conversion.

    Returns None when the header cannot be walked (a corrupt or truncated file: the caller's
    GGUF reader then reports the damage).
    """
    path = pathlib.Path(path)
    try:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            data_start, offsets = _data_layout(mm)
            size = len(mm)
            digest = hashlib.sha256(f"gguf|{size}|".encode())
            digest.update(mm[:data_start])
            bounds = sorted({min(data_start + o, size) for o in offsets} | {size})
            for start, stop in itertools.pairwise(bounds):
                for at in (start, (start + stop - _SAMPLE) // 2, stop - _SAMPLE):
                    at = max(start, min(at, stop - _SAMPLE))
                    digest.update(mm[at:min(at + _SAMPLE, stop)])
            return digest.hexdigest()
    except (OSError, ValueError, struct.error, OverflowError, KeyError):
        return None


def full_fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the whole file (the fallback for a header :func:`fingerprint` cannot walk)."""
    digest = hashlib.sha256(b"gguf-full|")
    with pathlib.Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_digest(fingerprint: str, dtype: str) -> str:
    """The hex digest that names an entry: content, dtype and converter version."""
    key = f"{fingerprint}|{dtype}|v{FORMAT_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:_DIGEST_CHARS]


def entry_name(gguf_path: str | os.PathLike[str], digest: str) -> str:
    """``<file stem>-<digest>``: readable in ``ls``; lookups go by the digest alone."""
    stem = pathlib.Path(gguf_path).stem.lstrip(".")[:80] or "model"
    return f"{stem}-{digest}"


def find(root: pathlib.Path, digest: str) -> pathlib.Path | None:
    """The complete entry with ``digest`` (whatever the GGUF file was called), or None."""
    if not root.is_dir():
        return None
    for candidate in root.glob(f"*-{digest}"):
        if not candidate.name.startswith(".") and is_complete(candidate):
            return candidate
    return None


_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def is_complete(target: pathlib.Path) -> bool:
    # An entry only appears through an atomic rename, so existence means complete;
    # the file check guards against a directory someone else put there by hand.
    return target.is_dir() and all((target / name).is_file() for name in _REQUIRED_FILES)


def touch(entry: pathlib.Path) -> None:
    """Record a use (the directory's mtime); a read-only cache is still usable."""
    try:
        os.utime(entry)
    except OSError:
        pass


def write_source(directory: pathlib.Path, gguf_path: pathlib.Path, dtype: str, fingerprint: str) -> None:
    """The ``lucidlm-source.json`` of a new entry."""
    resolved = gguf_path.resolve()
    info = {"source": gguf_path.name, "path": str(resolved), "size": resolved.stat().st_size,
            "dtype": dtype.removeprefix("torch."), "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint, "converted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (directory / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


# GGUF value types (gguf.constants.GGUFValueType): fixed sizes, then string and array
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _data_layout(mm) -> tuple[int, list[int]]:
    """(offset where the tensor data starts, each tensor's offset within it) of a GGUF header.

    A minimal walk of the format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md),
    versions 2 and 3, either byte order; raises ValueError or struct.error on anything else.
    """
    size = len(mm)
    if size < 24 or mm[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    order = "<"
    version = struct.unpack_from("<I", mm, 4)[0]
    if version & 0xFFFF == 0:  # a big-endian file
        order, version = ">", struct.unpack_from(">I", mm, 4)[0]
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}")
    u32, u64 = struct.Struct(order + "I"), struct.Struct(order + "Q")
    n_tensors, n_kv = struct.unpack_from(order + "QQ", mm, 8)
    pos = 24

    def check(count: int, item_bytes: int) -> None:  # a corrupt count must not loop over the file
        if count * item_bytes > size - pos:
            raise ValueError("a count runs past the end of the file")

    def string_end(at: int) -> int:
        end = at + 8 + u64.unpack_from(mm, at)[0]
        if end > size:
            raise ValueError("a string runs past the end of the file")
        return end

    alignment = 32
    check(n_kv, 12)
    for _ in range(n_kv):
        key_end = string_end(pos)
        key = mm[pos + 8:key_end]
        kind = u32.unpack_from(mm, key_end)[0]
        pos = key_end + 4
        if key == b"general.alignment" and kind == 4:
            alignment = u32.unpack_from(mm, pos)[0]
        if kind == _STRING:
            pos = string_end(pos)
        elif kind == _ARRAY:
            item, count = u32.unpack_from(mm, pos)[0], u64.unpack_from(mm, pos + 4)[0]
            pos += 12
            if item == _STRING:
                check(count, 8)
                for _ in range(count):
                    pos = string_end(pos)
            else:
                check(count, _SCALAR_SIZES[item])  # nested arrays: KeyError, not produced by llama.cpp
                pos += count * _SCALAR_SIZES[item]
        else:
            pos += _SCALAR_SIZES[kind]
    check(n_tensors, 24)
    offsets = []
    for _ in range(n_tensors):
        pos = string_end(pos)
        n_dims = u32.unpack_from(mm, pos)[0]
        pos += 4 + 8 * n_dims + 4  # dims, quantisation type
        offsets.append(u64.unpack_from(mm, pos)[0])
        pos += 8
    if pos > size or alignment == 0:
        raise ValueError("the header runs past the end of the file")
    return pos + (-pos) % alignment, offsets


# ----------------------------------------------------------------------------- list and clear


@dataclasses.dataclass
class Entry:
    """One converted GGUF file in the cache."""

    path: pathlib.Path  # the entry's directory
    source: str  # the GGUF file's name
    source_path: str | None  # where that file was when it was converted (None: unknown)
    dtype: str | None
    size_bytes: int  # on disk, all files
    last_used: float  # seconds since the epoch
    current: bool  # converted by this version of lucidlm (older entries are never used again)

    @property
    def name(self) -> str:
        return self.path.name


def list_entries(root: str | os.PathLike[str] | None = None) -> list[Entry]:
    """Every converted checkpoint under the cache root, most recently used first."""
    root = cache_root(root)
    if not root.is_dir():
        return []
    entries = [_entry(p) for p in root.iterdir() if _is_entry_dir(p)]
    return sorted(entries, key=lambda e: e.last_used, reverse=True)


def _is_entry_dir(path: pathlib.Path) -> bool:
    """Only what a conversion wrote: a non-hidden ``<stem>-<hex digest>`` directory holding a
    ``config.json`` (so a mistaken ``$LUCIDLM_CACHE=$HOME`` never lists, or clears, anything else)."""
    return (not path.name.startswith(".") and not path.is_symlink() and path.is_dir()
            and _ENTRY_RE.match(path.name) is not None
            and ((path / SOURCE_FILE).is_file() or (path / "config.json").is_file()))


def _entry(path: pathlib.Path) -> Entry:
    try:
        info = json.loads((path / SOURCE_FILE).read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            info = {}
    except (OSError, ValueError):
        info = {}  # converted by a lucidlm older than the source record
    source = info.get("source") or _ENTRY_RE.match(path.name).group("stem") + ".gguf"
    return Entry(path=path, source=str(source), source_path=info.get("path"), dtype=info.get("dtype"),
                 size_bytes=_tree_bytes(path), last_used=path.stat().st_mtime,
                 current=info.get("format_version") == FORMAT_VERSION)


def _tree_bytes(path: pathlib.Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def clear(entries: Iterable[Entry] | None = None, root: str | os.PathLike[str] | None = None) -> int:
    """Remove ``entries`` (default: every entry, and the debris of conversions that died); the
    bytes freed. Each goes by an atomic rename to a ``.trash-`` name first, so a concurrent
    ``LLM.load`` sees the entry whole or not at all (and converts again)."""
    root = cache_root(root)
    if entries is None:
        entries = list_entries(root)
        debris = _debris(root)
    else:
        debris = []
    freed = 0
    for entry in entries:
        freed += _remove(entry.path, entry.size_bytes)
    for path in debris:
        freed += _remove(path, _tree_bytes(path))
    return freed


def _debris(root: pathlib.Path) -> list[pathlib.Path]:
    """``.trash-`` directories a removal left behind, and ``.tmp-`` ones of conversions that died."""
    if not root.is_dir():
        return []
    now = time.time()
    out = []
    for path in root.iterdir():
        if path.is_symlink() or not path.is_dir():
            continue
        if path.name.startswith(".trash-") or (
                path.name.startswith(".tmp-") and now - path.stat().st_mtime > _STALE_TEMP_SECONDS):
            out.append(path)
    return out


def _remove(path: pathlib.Path, size: int) -> int:
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return 0  # someone else removed it
    shutil.rmtree(trash, ignore_errors=True)
    return size


def format_entries(entries: list[Entry], root: str | os.PathLike[str] | None = None) -> str:
    """The table ``lucidlm cache list`` prints."""
    where = cache_root(root)
    origin = f" (${ENV_VAR})" if os.environ.get(ENV_VAR) and root is None else ""
    if not entries:
        return f"conversion cache {where}{origin}: empty"
    total = sum(e.size_bytes for e in entries)
    lines = [f"conversion cache {where}{origin}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
             f"{format_bytes(total)}",
             f"{'source GGUF':<40} {'dtype':<9} {'size':>9}  {'last used':<16}  entry"]
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        note = "" if e.current else "  (old format: no longer used)"
        lines.append(f"{e.source:<40} {e.dtype or '?':<9} {format_bytes(e.size_bytes):>9}  {used:<16}  "
                     f"{e.name}{note}")
    return "\n".join(lines)


def format_bytes(n: int) -> str:
    """Binary units, as ``du -h`` counts.

    >>> format_bytes(540_123_456), format_bytes(999), format_bytes(1536 * 2**20)
    ('515.1 MiB', '999 B', '1.5 GiB')
    """
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def select(entries: list[Entry], names: Iterable[str]) -> tuple[list[Entry], list[str]]:
    """The entries that ``names`` designate (entry name, source GGUF name or its stem), and the
    names that match none."""
    chosen: dict[pathlib.Path, Entry] = {}
    missing = []
    for name in names:
        name = name.rstrip("/")
        hits = [e for e in entries if name in (e.name, e.source, pathlib.Path(e.source).stem)]
        if not hits:
            missing.append(name)
        chosen.update((e.path, e) for e in hits)
    return list(chosen.values()), missing
