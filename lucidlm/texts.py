"""Local text for the offline benches and calibrations: one reader, no downloads.

Every Debian or Ubuntu machine has the license texts in :data:`LICENSES`; they are the default
haystack of ``lucidlm bench kv``/``longctx``/``train`` and of ``lucidlm calibrate-heads``. A
directory stands for its files, and each real file is read once (``GPL`` there is a link to
``GPL-3``), so the text is the same on every machine with the same files.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "a.txt").write_text("alpha"); _ = (folder / "b.txt").write_text("beta")
>>> (folder / "same.txt").symlink_to(folder / "a.txt")
>>> read_texts([folder])
'alpha\\n\\nbeta'
>>> read_texts([folder / "b.txt", folder / "a.txt"])  # files in the order given
'beta\\n\\nalpha'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import DataError

#: the default texts (present on Debian/Ubuntu systems)
LICENSES = Path("/usr/share/common-licenses")


def text_files(paths: Sequence[str | Path] = (), flag: str = "--text") -> list[Path]:
    """The files ``paths`` name (a directory: its files, sorted by real path), each real file once;
    :data:`LICENSES` when ``paths`` is empty. A path that is missing, or no file at all, is a
    :class:`~lucidlm.errors.DataError` that names ``flag``."""
    files: dict[Path, None] = {}
    for path in [Path(p) for p in paths] or [LICENSES]:
        if path.is_dir():
            found = sorted({f.resolve() for f in path.iterdir() if f.is_file()})
        elif path.is_file():
            found = [path.resolve()]
        else:
            hint = "pass a text" if path == LICENSES else "expected a text file or a directory of them"
            raise DataError(f"{path} does not exist on this machine: {hint} ({flag} FILE)")
        files.update(dict.fromkeys(found))
    if not files:
        raise DataError(f"no text files in {', '.join(map(str, paths or [LICENSES]))}: give {flag} FILE")
    return list(files)


def read_texts(paths: Sequence[str | Path] = (), flag: str = "--text") -> str:
    """The text of :func:`text_files`, the files separated by a blank line (undecodable bytes replaced)."""
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in text_files(paths, flag))
