"""Where a checkpoint came from: the Hugging Face hub repo id a loaded model can be named by, so
that what is saved beside it (an adapter's ``base_model_name_or_path``) means the same on another
machine, never a local path.

>>> snapshot_repo("/cache/hub/models--Qwen--Qwen3-0.6B/snapshots/0123abc")
'Qwen/Qwen3-0.6B'
>>> repo_from_url("https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/tree/main")
'HuggingFaceTB/SmolLM2-135M-Instruct'
>>> repo_from_url("https://github.com/org/repo") is None
True
"""

from __future__ import annotations

import re
from pathlib import Path

from .embedded import FILENAME, REPO_ID

#: GGUF metadata naming the repository the file was converted from (llama.cpp's convert script
#: writes the ``source`` keys); the plain ``url`` keys may name the GGUF's own repository, a
#: lesser guess. ``general.base_model.*`` names the model this one was fine-tuned from: not used.
GGUF_SOURCE_KEYS = ("general.source.repo_url", "general.source.url", "general.repo_url", "general.url")

_HF_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/([\w.-]+/[\w.-]+?)(?:\.git)?(?:/.*)?$")


def snapshot_repo(path: str | Path) -> str | None:
    """``org/name`` of a hub cache snapshot directory (``models--org--name/snapshots/REV``)."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    return None


def repo_from_url(url: object) -> str | None:
    """``org/name`` of a ``https://huggingface.co/org/name[/...]`` URL, else None."""
    if not isinstance(url, str):
        return None
    match = _HF_URL.match(url.strip())
    if match is None or match[1].split("/")[0] in ("datasets", "spaces"):
        return None
    return match[1]


def hub_id(source: str | Path | None) -> str | None:
    """The hub repo id of the checkpoint at ``source`` when it is known: the embedded default's, a
    hub snapshot's, or the one a GGUF file's ``general.source.*`` metadata names; else None."""
    if not source:
        return None
    path = Path(source)
    if path.name == FILENAME:
        return REPO_ID
    repo = snapshot_repo(path)
    if repo is not None or path.suffix != ".gguf" or not path.is_file():
        return repo
    from ..errors import CheckpointError
    from .gguf import read_metadata

    try:
        meta = read_metadata(path)
    except (CheckpointError, OSError, ValueError):  # unreadable metadata names nothing
        return None
    return next((r for r in map(repo_from_url, (meta.get(k) for k in GGUF_SOURCE_KEYS)) if r), None)
