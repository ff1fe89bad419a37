"""Atomic file and directory writes (readers see the old file or the new one, never a partial
one; modes follow the umask, as a plain ``open()``/``mkdir`` would give), JSON reading with a
typed error that names the file, and :func:`cache_root`, the one directory lucidlm caches in.

Used by everything that writes a user-visible file (heatmaps, JSON, saved checkpoints) or a cache
entry (converted GGUF files, the built decode kernel).

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> atomic_write(os.path.join(d, "a.txt"), "hi").read_text(), os.listdir(d)
('hi', ['a.txt'])
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: overrides where lucidlm caches (default ``~/.cache/lucidlm``)
CACHE_ENV_VAR = "LUCIDLM_CACHE"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """lucidlm's cache directory: ``cache_dir``, else ``$LUCIDLM_CACHE``, else ``~/.cache/lucidlm``.
    Converted GGUF checkpoints and the built decode kernel live under it (nothing is created here).

    >>> cache_root("/tmp/c"), cache_root("~/c") == Path.home() / "c"
    (PosixPath('/tmp/c'), True)
    """
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "lucidlm"
    return Path(cache_dir).expanduser()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block succeeds it is renamed over
    ``path`` (with the mode a plain ``open()`` would give), on any error it is removed."""
    path = check_target(path)
    # same directory as the target so os.replace is a rename within one file system
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # name the file the caller asked for, not our temporary one
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file 0600; give it the mode a plain open() would have
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def temp_dir(parent: str | os.PathLike[str], prefix: str) -> Path:
    """A new, empty directory in ``parent`` with a unique name starting with ``prefix``, and the
    mode a plain ``mkdir`` would give it (``tempfile.mkdtemp`` makes it ``0700``)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` to fill; when the block succeeds it is renamed
    to ``path`` (which may exist only as an empty directory), on any error it is removed. Readers
    never see a half-written directory, and it gets the mode a plain ``mkdir`` would give.

    >>> import tempfile, os
    >>> out = Path(tempfile.mkdtemp()) / "ckpt"
    >>> with atomic_dir(out) as tmp:
    ...     _ = (tmp / "config.json").write_text("{}")
    >>> sorted(os.listdir(out)), out.stat().st_mode & 0o777 == 0o777 & ~_umask()
    (['config.json'], True)
    """
    import shutil

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(path.parent, f".{path.name}.")
    try:
        yield tmp
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        os.rename(tmp, path)  # fails (and we clean up) if path exists and is not an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_target(path: str | os.PathLike[str]) -> Path:
    """The path to write, after checking it can be: its directory exists and it is not one."""
    path = Path(path).expanduser()
    parent = path.parent
    if not parent.exists():
        raise FileNotFoundError(
            errno.ENOENT, f"cannot write {path}: directory {parent} does not exist", str(path))
    if not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"cannot write {path}: {parent} is not a directory",
                                 str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path}: it is a directory", str(path))
    return path


@functools.cache
def _umask() -> int:
    # The only portable way to read the umask is to set it and put it back; cached so this
    # (process-wide, racy) dance happens once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` all at once; on any error nothing is left behind."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    return check_target(path)


def read_json(path: str | os.PathLike[str], error: type[Exception], expected: str = "a JSON file") -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file raises ``error`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file (expected {expected})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{path}: not valid JSON ({exc})") from None
