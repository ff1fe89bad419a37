"""``lucidlm evaluate DIR``: faithfulness metrics of the explanations ``lucidlm explain-dataset``
wrote to DIR, measured on the model that made them.

The rows come from :func:`lucidlm.explain.dataset.read_results` (record order); the model is
``--model``, else the one DIR/manifest.json names, else the embedded default. The table goes to
stdout; ``--out`` writes the full result as JSON and ``--plot`` the mean curves as a PNG, both
atomically.

>>> model_for(None, {"model": None}) is None  # the embedded default
True
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import ExplainError
from ..fileio import read_json


def run(args: argparse.Namespace) -> int:
    """The command: checks every argument, then loads the rows and the model and measures."""
    from ..api import LLM
    from ..explain.dataset import read_results
    from .metrics import check_metrics, faithfulness

    directory = Path(args.directory)
    metrics = check_metrics([m.strip() for m in args.metrics.split(",") if m.strip()])
    _check_inputs(directory, args.out, args.plot)
    manifest = read_manifest(directory)
    rows = read_results(directory)
    llm = LLM.load(model_for(args.model, manifest), progress=True)
    llm.model.eval()
    result = faithfulness(llm, rows, metrics=metrics, replacement=args.replacement, score=args.score,
                          steps=args.steps, keep_first=args.keep_first, progress=True)
    method = result.method or manifest.get("method") or "unknown method"
    print(f"faithfulness of {len(rows)} explanations ({method}) in {directory} on {llm.name}: "
          f"score {args.score}, tokens replaced by {replacement_text(llm.tokenizer, result.replacement)}"
          + (", token 0 kept" if args.keep_first else ""))
    print(result.table())
    if args.out is not None:
        print(f"wrote {result.save_json(args.out)}", file=sys.stderr)
    if args.plot is not None:
        print(f"wrote {result.plot(args.plot)}", file=sys.stderr)
    return 0


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
    from ..checkpoints.hub import is_repo_id

    if flag is not None:
        return flag
    named = manifest.get("model")
    if named is None or named == FILENAME.partition(".")[0]:
        return None
    if Path(named).exists() or is_repo_id(str(named)):
        return str(named)
    raise ExplainError(f"manifest.json names the model {named!r}, which is neither a checkpoint path nor a hub "
                       "repo id: pass --model")


def replacement_text(tokenizer: Any, replacement: int) -> str:
    """``'<unk>' (id 0)``, or ``id 0`` without a tokenizer.

    >>> replacement_text(None, 7)
    'id 7'
    """
    if tokenizer is None:
        return f"id {replacement}"
    return f"{tokenizer.decode([replacement])!r} (id {replacement})"


def _check_inputs(directory: Path, *outputs: Path | None) -> None:
    if not directory.is_dir():
        raise ExplainError(f"{directory}: no such directory (expected the output of lucidlm explain-dataset)")
    for path in outputs:
        if path is not None and not Path(path).parent.is_dir():
            raise ExplainError(f"{path}: the directory {Path(path).parent} does not exist")
