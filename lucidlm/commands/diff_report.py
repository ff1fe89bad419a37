"""``lucidlm diff-report DIR``: what fine-tuning changed over a dataset, from the rows of an
``explain-dataset --diff-against BASE`` run (:func:`lucidlm.explain.diff_report.diff_report`): the
words whose relevance changed most, the components with the largest mean change, the adapter's
share of the relevance and the score changes, as a table and, on request, JSON and a PNG summary.

>>> args = DIFF_REPORT.parse(["run", "--top", "20"])
>>> str(args.dir), args.top, args.min_count, args.json
('run', 20, 1, None)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import Command, Paths, positive

REPORT_EPILOG = ("Words: each record's change (tuned - base relevance) summed over a word's tokens, averaged over "
                 "the word's occurrences, ranked by magnitude. Components: mean change of the latent relevance of "
                 "each layer, head and neuron, largest increase first (names ExplanationDiff.ablate takes). "
                 "Adapter share: per record sum|adapter| / (sum|adapter| + sum|base weights|) over the prompt "
                 "tokens, averaged over the records.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, metavar="DIR", help="the --out directory of explain-dataset --diff-against")
    p.add_argument("--top", type=positive, default=10, metavar="N", help="words and components of each kind listed")
    p.add_argument("--min-count", type=positive, default=1, metavar="N",
                   help="the fewest occurrences a listed word needs")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the report's numbers as JSON (default: none)")
    p.add_argument("--png", type=Path, metavar="FILE", help="write a PNG summary (default: none)")


def inputs(args: argparse.Namespace) -> Paths:
    return [("DIR", args.dir)]


def outputs(args: argparse.Namespace) -> Paths:
    return [("--json", args.json), ("--png", args.png)]


def no_model(args: argparse.Namespace) -> tuple[str, None]:
    return "", None


def run(args: argparse.Namespace) -> int:
    from ..explain.dataset import read_results
    from ..explain.diff_report import diff_report

    report = diff_report(read_results(args.dir), top=args.top, min_count=args.min_count)
    print(f"{args.dir}: {report.to_text()}")
    for path, save in ((args.json, report.save_json), (args.png, report.save_png)):
        if path is not None:
            save(path)
            print(f"wrote {path}", file=sys.stderr)
    return 0


DIFF_REPORT = Command("diff-report", "what fine-tuning changed over a dataset: aggregate an explain-dataset "
                      "--diff-against run", add_arguments, run, epilog=REPORT_EPILOG, inputs=inputs, outputs=outputs,
                      model=no_model)
