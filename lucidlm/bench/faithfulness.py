"""``lucidlm bench faithfulness``: every explanation method on the same prompts, in one table.

For each prompt (default: the packaged factual-recall and grammar prompts) the model's top next
token is the target, the same for every method. Each method (the LRP methods and the baselines of
:data:`lucidlm.methods.EXPLAIN_METHODS`, ``random`` the floor every method must beat) explains every
prompt through :func:`lucidlm.explain.explainer.explain`; the row gives the time per explanation
and the means of :func:`lucidlm.evaluate.faithfulness`: deletion and insertion areas,
comprehensiveness, sufficiency and ABPC (the metrics and their papers are described in
:mod:`lucidlm.evaluate.metrics`). A method that cannot explain (an :class:`~lucidlm.errors.ExplainError`)
gets a row saying why instead of stopping the bench.

>>> from lucidlm.evaluate.result import FaithfulnessResult, ExampleResult
>>> m = {"deletion": 0.1, "insertion": 0.6, "comprehensiveness": 0.4, "sufficiency": 0.05, "abpc": 0.5}
>>> r = FaithfulnessResult([ExampleResult(0, 3, 0.7, 0.0, m)], tuple(m), "prob", 0, (0.5,), None)
>>> print(format_row(Row("attnlrp", 0.0123, r)))
attnlrp                 0.0123     0.100     0.600     0.400     0.050     0.500
"""

from __future__ import annotations

import argparse
import importlib.resources
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# every method explain() offers, random included
from .args import FAITHFULNESS_METHODS as METHODS
from .args import add_faithfulness as add_arguments
from .args import method_list

if TYPE_CHECKING:
    from ..evaluate import FaithfulnessResult

PROMPT_FILE = "faithfulness_prompts.txt"
#: the table's metric columns: (metric, heading)
COLUMNS = (("deletion", "deletion"), ("insertion", "insertion"), ("comprehensiveness", "compreh."),
           ("sufficiency", "suffic."), ("abpc", "ABPC"))


# ----------------------------------------------------------------------------- prompts
def load_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts, one a line (blank lines and ``#`` comments skipped); default: the packaged file."""
    if path is None:
        text = importlib.resources.files("lucidlm.bench").joinpath(PROMPT_FILE).read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    return [line.rstrip("\n") for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


# ----------------------------------------------------------------------------- measuring
@dataclass
class Row:
    """One method's line: seconds per explanation and its faithfulness, or why it failed."""

    method: str
    seconds: float = float("nan")
    result: FaithfulnessResult | None = None
    error: str | None = None


def bench(llm, prompts: Sequence[str], methods: Sequence[str] = METHODS, replacement: int | None = None,
          score: str = "prob", keep_first: bool = False,
          on_explained: Callable[[], None] | None = None) -> list[Row]:
    """A :class:`Row` per method over ``prompts``, each explained for its top next token
    (``replacement``, ``score``, ``keep_first``: see :func:`lucidlm.evaluate.faithfulness`).
    ``on_explained`` is called after every explanation (a progress bar's update)."""
    ids, targets = top_targets(llm, prompts)
    return [measure(llm, method, ids, targets, replacement, score, keep_first, on_explained) for method in methods]


def top_targets(llm, prompts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """Each prompt's ids and the model's top next token after it (the target every method explains)."""
    import torch

    from ..explain.explainer import prompt_ids

    ids = [prompt_ids(llm.tokenizer, p) for p in prompts]
    device = next(llm.model.parameters()).device
    with torch.no_grad():
        targets = [int(llm.model(torch.tensor([i], device=device), last_only=True)[0, -1].argmax()) for i in ids]
    return ids, targets


def measure(llm, method: str, ids: Sequence[list[int]], targets: Sequence[int], replacement: int | None,
            score: str, keep_first: bool = False, on_explained: Callable[[], None] | None = None) -> Row:
    """One method's :class:`Row`: explain every prompt (timed), then measure faithfulness."""
    from ..errors import ExplainError
    from ..evaluate import faithfulness
    from ..explain.explainer import explain

    explanations, seconds = [], 0.0
    try:
        for prompt, target in zip(ids, targets):
            t0 = time.perf_counter()
            explanations.append(explain(llm.model, llm.tokenizer, prompt, target=target, method=method))
            seconds += time.perf_counter() - t0
            if on_explained is not None:
                on_explained()
    except ExplainError as exc:
        return Row(method, error=str(exc))
    result = faithfulness(llm, explanations, replacement=replacement, score=score, keep_first=keep_first)
    return Row(method, seconds / len(ids), result)


# ----------------------------------------------------------------------------- the table
def header_lines(n_prompts: int, source: str | None, score: str, replaced_by: str,
                 keep_first: bool = False) -> list[str]:
    """The table's three header lines."""
    heads = "".join(f"{h:>10}" for _, h in COLUMNS)
    return [f"faithfulness on {source or 'the model'}: {n_prompts} prompts, each explained for its top next "
            f"token; score {score}, tokens replaced by {replaced_by}" + (", token 0 kept" if keep_first else ""),
            ("areas on [0, 1]; deletion and sufficiency: lower is better; insertion, comprehensiveness and ABPC: "
             "higher is better"),
            f"{'method':<22}{'s/expl':>8}{heads}"]


def format_row(row: Row) -> str:
    """One method's line of the table."""
    if row.error is not None:
        return f"{row.method:<22}  error: {row.error}"
    mean = row.result.mean
    return f"{row.method:<22}{row.seconds:>8.4f}" + "".join(f"{mean[m]:>10.3f}" for m, _ in COLUMNS)


# ----------------------------------------------------------------------------- CLI
def run(args) -> int:
    import torch

    from ..api import LLM
    from ..evaluate.runs import replacement_text
    from ..explain.baselines import default_replacement
    from . import emit, progress

    methods, prompts = _methods_and_prompts(args)  # checked before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM.load(args.model, progress=True)
    llm.model.eval()
    replacement = default_replacement(llm.tokenizer) if args.replacement is None else args.replacement
    replaced_by = replacement_text(llm.tokenizer, replacement)
    for line in header_lines(len(prompts), llm.source, args.score, replaced_by, args.keep_first):
        emit(line)
    t0, abpc = time.perf_counter(), []
    ids, targets = top_targets(llm, prompts)
    bar = progress(len(prompts) * len(methods), "bench faithfulness", unit="explanation")
    try:
        for method in methods:
            row = measure(llm, method, ids, targets, replacement, args.score, args.keep_first,
                          on_explained=lambda: bar.update(1))
            emit(format_row(row))
            if row.error is None:
                abpc.append(f"{method} {row.result.mean['abpc']:.2f}")
                bar.set_postfix_str("ABPC " + ", ".join(abpc))
    finally:
        bar.close()
    emit(f"{len(prompts)} prompts in {time.perf_counter() - t0:.0f} s")
    return 0


def _methods_and_prompts(args) -> tuple[list[str], list[str]]:
    from ..errors import ExplainError

    methods = method_list(args.methods, METHODS)
    if args.n_prompts is not None and args.n_prompts < 1:
        raise ExplainError(f"--n-prompts {args.n_prompts}: expected at least 1")
    prompts = load_prompts(args.prompts)[:args.n_prompts]
    if not prompts:
        raise ExplainError(f"{args.prompts}: no prompts (one a line; '#' starts a comment)")
    return methods, prompts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
