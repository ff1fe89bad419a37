"""What fine-tuning changed, over a dataset: the aggregate of an ``explain-dataset --diff-against``
run (:func:`diff_report`, ``lucidlm diff-report DIR``).

From the rows of a diff run (:func:`lucidlm.explain.dataset.read_results`) or from
:class:`~lucidlm.explain.diff.ExplanationDiff` s, a :class:`DiffReport` holds:

* **words** whose relevance changed most: each record's change (tuned − base relevance) summed
  over the tokens of each word (:meth:`Explanation.words <lucidlm.explain.explanation.Explanation.words>`'s
  grouping), keyed by the word's text without its surrounding whitespace; a word's ``mean_change``
  is the mean over its occurrences in all records. Ranked by ``|mean_change|``, sign kept;
  ``min_count`` leaves out words seen fewer times.
* **components** (``layers``, ``heads``, ``neurons``) with the largest mean change of their latent
  relevance (:meth:`ExplanationDiff.component_changes`, mean over the records that hold it), largest
  increase first, as :meth:`ExplanationDiff.components` ranks them: the names are those
  :meth:`ExplanationDiff.ablate` takes. Empty when the rows hold no latent relevances.
* **adapter_share**: how much of the tuned relevance flows through the adapter branches. Per record
  with an adapter part ``a`` (and so a base-weights part ``b = tuned − a``),
  ``share = Σ|a_i| / (Σ|a_i| + Σ|b_i|)`` over the prompt tokens: 0 when the adapter carries nothing
  (its initial state, B = 0), 1 when everything flows through it; absolute values, so the parts
  cannot cancel and the share stays in [0, 1]. The report gives the mean over those records
  (``None`` when no record has an adapter part: a full fine-tune, a merged adapter).
* **scores**: the change of the explained score (``logit_delta``) over records: mean, median, the
  fraction of records whose score rose, min and max, and the mean base and tuned scores
  (``deltas``: every record's change, for the histogram).

``to_text()`` is the table ``lucidlm diff-report`` prints, ``to_dict()``/``save_json`` the numbers
(``{"format": "lucidlm.diff-report", "version": 1, ...}``), ``to_png()``/``save_png`` a summary
figure: bars of the top words and components and a histogram of the score changes.

>>> import torch
>>> from lucidlm.explain.explanation import Explanation
>>> def explained(relevance, score):
...     return Explanation(["<s>", " a", " b"], [1, 2, 3], torch.tensor(relevance), " c", [4], score, "cp-lrp")
>>> d = ExplanationDiff(explained([0.0, 1.0, 1.0], -2.0), explained([0.0, 3.0, 1.0], -1.0),
...                     adapter_relevance=torch.tensor([0.0, 1.0, 0.0]))
>>> report = diff_report([d, d])
>>> report.words[0], report.adapter_share, report.scores["rose"]
({'word': 'a', 'mean_change': 2.0, 'count': 2}, 0.25, 1.0)
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ExplainError
from .components import KINDS
from .diff import ExplanationDiff

#: what the ``"format"`` field of a saved report says, and its version
REPORT_FORMAT, REPORT_VERSION = "lucidlm.diff-report", 1
SHARE_RULE = "sum|adapter| / (sum|adapter| + sum|base weights|) per record"


@dataclasses.dataclass
class DiffReport:
    """The aggregate of a set of diffs (see :mod:`lucidlm.explain.diff_report`)."""

    records: int
    methods: list[str]
    score_labels: list[str]
    words: list[dict[str, Any]]
    components: dict[str, list[dict[str, Any]]]
    adapter_share: float | None
    adapter_records: int
    scores: dict[str, float]
    deltas: list[float]

    def to_dict(self) -> dict[str, Any]:
        """Every field, as strict JSON holds it (a non-finite float spelled as in the wire format)."""
        from .wire import plain

        return {"format": REPORT_FORMAT, "version": REPORT_VERSION, "share_rule": SHARE_RULE,
                **plain(dataclasses.asdict(self))}

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` to ``path`` atomically."""
        from ..fileio import atomic_write

        return atomic_write(path, json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False, indent=1) + "\n")

    def to_text(self) -> str:
        """The readable table: score changes, adapter share, words, components."""
        s = self.scores
        lines = [f"{self.records} diffs ({', '.join(self.methods)}; score: {', '.join(self.score_labels)})",
                 f"score change (tuned - base): mean {s['mean']:+.4g}, median {s['median']:+.4g}, rose in "
                 f"{s['rose']:.0%} of records (min {s['min']:+.4g}, max {s['max']:+.4g}; mean base {s['base']:.4g}, "
                 f"tuned {s['tuned']:.4g})"]
        if self.adapter_share is None:
            lines.append("adapter share: none (no record has an adapter part: a full fine-tune or a merged adapter)")
        else:
            lines.append(f"adapter share of the relevance: {self.adapter_share:.1%} (mean over {self.adapter_records} "
                         f"records of {SHARE_RULE})")
        lines += ["", "words whose relevance changed most (mean change over their occurrences)",
                  f"  {'change':>10}  {'count':>5}  word"]
        lines += [f"  {w['mean_change']:>+10.4g}  {w['count']:>5}  {w['word']!r}" for w in self.words]
        for kind, ranked in self.components.items():
            lines += ["", f"{kind} with the largest mean change (increase first)", f"  {'change':>10}  component"]
            lines += [f"  {c['mean_change']:>+10.4g}  {c['name']}" for c in ranked]
        return "\n".join(lines)

    def to_png(self) -> bytes:
        """PNG bytes: the top words' and components' mean changes as bars (red increase, blue
        decrease) and a histogram of the score changes."""
        from ..render.png import figure_png

        return figure_png(self._figure())

    def save_png(self, path: str | Path) -> Path:
        """Write :meth:`to_png` to ``path`` atomically."""
        from ..fileio import atomic_write

        return atomic_write(path, self.to_png())

    def _figure(self):
        from ..render.png import new_figure

        panels = [("words: mean change of relevance", [(repr(w["word"]), w["mean_change"]) for w in self.words])]
        panels += [(f"{kind}: mean change of latent relevance", [(c["name"], c["mean_change"]) for c in ranked])
                   for kind, ranked in self.components.items() if ranked]
        heights = [0.6 + 0.22 * max(1, len(bars)) for _, bars in panels] + [2.2]
        fig = new_figure(8.0, sum(heights) + 0.4 * len(heights))
        grid = fig.add_gridspec(len(heights), 1, height_ratios=heights, hspace=0.6)
        for row, (title, bars) in enumerate(panels):
            _bars(fig.add_subplot(grid[row]), title, bars)
        hist = fig.add_subplot(grid[-1])
        finite = [d for d in self.deltas if math.isfinite(d)]
        hist.hist(finite, bins=min(30, max(5, len(finite))), color="0.45")
        hist.axvline(0.0, color="black", linewidth=0.8)
        hist.set_title(f"score change (tuned - base) over {self.records} records: rose in {self.scores['rose']:.0%}",
                       fontsize=9)
        hist.set_xlabel(", ".join(self.score_labels) + " change", fontsize=8)
        hist.tick_params(labelsize=7)
        return fig


def _bars(ax, title: str, bars: list[tuple[str, float]]) -> None:
    from ..render.cells import NEGATIVE, POSITIVE

    labels, values = [b[0] for b in bars][::-1], [b[1] for b in bars][::-1]
    colors = [tuple(c / 255 for c in (POSITIVE if v >= 0 else NEGATIVE)) for v in values]
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels=labels, fontsize=7)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=7)


# ----------------------------------------------------------------------------- the aggregate
def diff_report(diffs: Iterable[ExplanationDiff | dict], top: int = 10, min_count: int = 1) -> DiffReport:
    """Aggregate ``diffs`` (:class:`ExplanationDiff` s, or the rows of an ``explain-dataset
    --diff-against`` run): the ``top`` words and components of each kind (see the module
    docstring); ``min_count``: the fewest occurrences a ranked word needs."""
    for name, value in (("top", top), ("min_count", min_count)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ExplainError(f"{name}={value!r}: expected a positive integer")
    diffs = [_diff(n, d) for n, d in enumerate(diffs)]
    if not diffs:
        raise ExplainError("diff_report: no diffs to aggregate")
    shares = [share for d in diffs if (share := adapter_share(d)) is not None]
    deltas = [float(d.logit_delta) for d in diffs]
    return DiffReport(
        records=len(diffs), methods=sorted({d.tuned.method for d in diffs}),
        score_labels=sorted({d.tuned.score_label for d in diffs}), words=_words(diffs, top, min_count),
        components=_components(diffs, top), adapter_share=statistics.fmean(shares) if shares else None,
        adapter_records=len(shares), scores=_scores(diffs, deltas), deltas=deltas)


def _diff(n: int, item: ExplanationDiff | dict) -> ExplanationDiff:
    if isinstance(item, ExplanationDiff):
        return item
    if not isinstance(item, dict) or item.get("type") != "ExplanationDiff":
        kind = item.get("type") if isinstance(item, dict) else type(item).__name__
        raise ExplainError(f"record {n}: expected a diff (an ExplanationDiff or its row), got {kind!r}: "
                           "make the rows with explain-dataset --diff-against BASE")
    return ExplanationDiff.from_dict(item)


def adapter_share(diff: ExplanationDiff) -> float | None:
    """``Σ|adapter| / (Σ|adapter| + Σ|base weights|)`` over the tokens of one diff (see the module
    docstring), ``None`` without an adapter part; 0 when both parts are zero."""
    if diff.adapter_relevance is None:
        return None
    adapter = float(diff.adapter_relevance.double().abs().sum())
    base = float(diff.base_relevance_of_tuned.double().abs().sum())
    return adapter / (adapter + base) if adapter + base > 0 else 0.0


def _words(diffs: Sequence[ExplanationDiff], top: int, min_count: int) -> list[dict[str, Any]]:
    changes: dict[str, list[float]] = {}
    for d in diffs:
        words = dataclasses.replace(d.tuned, relevance=d.relevance, layers=None).words()
        for word, change in zip(words.tokens, words.relevance.tolist()):
            changes.setdefault(word.strip() or word, []).append(change)
    ranked = [{"word": w, "mean_change": statistics.fmean(v), "count": len(v)}
              for w, v in changes.items() if len(v) >= min_count]
    ranked.sort(key=lambda r: (-_magnitude(r["mean_change"]), r["word"]))
    return ranked[:top]


def _magnitude(x: float) -> float:
    return abs(x) if math.isfinite(x) else -1.0  # a NaN ranks last


def _components(diffs: Sequence[ExplanationDiff], top: int) -> dict[str, list[dict[str, Any]]]:
    if any(d.base.layers is None or d.tuned.layers is None for d in diffs):
        return {}
    out = {}
    for kind in KINDS:
        changes: dict[str, list[float]] = {}
        for d in diffs:
            for name, change in d.component_changes(kind).items():
                changes.setdefault(name, []).append(change)
        ranked = sorted(((statistics.fmean(v), name) for name, v in changes.items()), key=lambda r: (-r[0], r[1]))
        out[kind] = [{"name": name, "mean_change": change} for change, name in ranked[:top]]
    return out


def _scores(diffs: Sequence[ExplanationDiff], deltas: list[float]) -> dict[str, float]:
    finite = [x for x in deltas if math.isfinite(x)] or [math.nan]
    return {"mean": statistics.fmean(finite), "median": statistics.median(finite),
            "rose": sum(x > 0 for x in deltas) / len(deltas), "min": min(finite), "max": max(finite),
            "base": statistics.fmean(float(d.base.target_logit) for d in diffs),
            "tuned": statistics.fmean(float(d.tuned.target_logit) for d in diffs)}
