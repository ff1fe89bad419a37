"""An ``explain-dataset`` directory as the faithfulness evaluation reads it (``lucidlm evaluate DIR``,
:mod:`lucidlm.commands.evaluate`): its manifest, the model that made its explanations, and how a
report names the replacement token (``lucidlm bench faithfulness`` too).

>>> model_for(None, {"model": None}) is None  # the embedded default
True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ExplainError
from ..fileio import read_json


def read_manifest(directory: Path) -> dict[str, Any]:
    """DIR/manifest.json, or {} when the directory has none."""
    path = directory / "manifest.json"
    if not path.exists():
        return {}
    data = read_json(path, ExplainError, "the manifest lucidlm explain-dataset writes")
    if not isinstance(data, dict):
        raise ExplainError(f"{path}: expected a JSON object (the explain-dataset manifest)")
    return data


def model_for(flag: str | None, manifest: dict[str, Any]) -> str | None:
    """The checkpoint to load: ``--model``, else the manifest's ``model`` (a path or a hub repo id;
    the embedded model's name or none: the embedded default)."""
    from ..checkpoints.embedded import FILENAME
    from ..checkpoints.hub import hub_repo

    if flag is not None:
        return flag
    named = manifest.get("model")
    if named is None or named == FILENAME.partition(".")[0]:
        return None
    if Path(named).exists() or hub_repo(str(named)) is not None:
        return str(named)
    raise ExplainError(f"manifest.json names the model {named!r}, which is neither a checkpoint path, a hub "
                       "repo id nor a catalogue name: pass --model")


def replacement_text(tokenizer: Any, replacement: int) -> str:
    """``'<unk>' (id 0)``, or ``id 0`` without a tokenizer.

    >>> replacement_text(None, 7)
    'id 7'
    """
    if tokenizer is None:
        return f"id {replacement}"
    return f"{tokenizer.decode([replacement])!r} (id {replacement})"
