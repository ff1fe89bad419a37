"""``lucidlm faithfulness DIR`` (``lucidlm evaluate`` runs benchmarks): faithfulness metrics of the explanations ``lucidlm explain-dataset``
wrote to DIR, measured on the model that made them.

The rows come from :func:`lucidlm.explain.dataset.read_results` (record order); the model is
``--model``, else the one DIR/manifest.json names, else the embedded default
(:func:`lucidlm.evaluate.runs.model_for`). The table goes to stdout; ``--out`` writes the full
result as JSON and ``--plot`` the mean curves as a PNG, both atomically. ``lucidlm.evaluate``
imports torch, so it is imported only when the command runs.

>>> args = FAITHFULNESS.parse(["run", "--steps", "4"])
>>> args.metrics, args.score, args.steps
('deletion,insertion,comprehensiveness,sufficiency,abpc', 'prob', 4)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ExplainError
from .options import Command, positive, token_id


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, metavar="DIR", help="an explain-dataset output directory")
    p.add_argument("--metrics", default="deletion,insertion,comprehensiveness,sufficiency,abpc",
                   help="comma-separated metrics")
    p.add_argument("--model", default=None, help="the checkpoint that made the explanations (default: the one "
                                                 "DIR/manifest.json names, else the embedded model)")
    p.add_argument("--replacement", type=token_id, default=None, metavar="ID",
                   help="token id that replaces removed tokens (default: the single-space token, else 0)")
    p.add_argument("--score", default="prob", choices=["prob", "logit"], help="the target's probability or logit")
    p.add_argument("--steps", type=positive, default=None, help="curve points per prompt (default: every token)")
    p.add_argument("--keep-first", action="store_true", help="never replace token 0 (often the attention sink)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="write the result as JSON (default: none)")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE",
                   help="write the mean deletion/insertion curves as a PNG (default: none)")


def run(args: argparse.Namespace) -> int:
    """Check every argument, then load the rows and the model and measure."""
    from ..api import LLM
    from ..evaluate.metrics import check_metrics, faithfulness
    from ..evaluate.runs import model_for, read_manifest, replacement_text
    from ..explain.dataset import read_results

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


def _check_inputs(directory: Path, *outputs: Path | None) -> None:
    if not directory.is_dir():
        raise ExplainError(f"{directory}: no such directory (expected the output of lucidlm explain-dataset)")
    for path in outputs:
        if path is not None and not Path(path).parent.is_dir():
            raise ExplainError(f"{path}: the directory {Path(path).parent} does not exist")


FAITHFULNESS = Command("faithfulness", "faithfulness metrics of the explanations lucidlm explain-dataset wrote to DIR",
                       add_arguments, run)
