"""The result of :func:`lucidlm.evaluate.faithfulness`: per-explanation curves and metrics, their
means, a table, JSON and a plot.

>>> ex = ExampleResult(0, 2, 0.9, 0.1, {"deletion": 0.3}, {"deletion": ([0.0, 0.5, 1.0], [0.9, 0.2, 0.1])})
>>> r = FaithfulnessResult([ex, ExampleResult(1, 1, 0.8, 0.2, {"deletion": 0.5}, {})], ("deletion",),
...                        "prob", 0, (0.5,), None, method="attnlrp")
>>> r.mean
{'deletion': 0.4}
>>> FaithfulnessResult.from_dict(r.to_dict()).to_dict() == r.to_dict()
True
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExplainError
from ..fileio import atomic_write

#: whether a larger value of each metric means a more faithful explanation
HIGHER_IS_BETTER = {"deletion": False, "insertion": True, "comprehensiveness": True, "sufficiency": False,
                    "abpc": True}
#: a curve: x = fraction of the prompt's tokens replaced (deletion) or restored (insertion), y = score
Curve = tuple[list[float], list[float]]


@dataclass
class ExampleResult:
    """One explanation's result: its id, the number of tokens that were replaced in turn (the prompt's
    length, less token 0 with ``keep_first``), the score of the intact and of the
    all-replaced prompt, each metric, and the curves behind them (``"deletion"``, ``"insertion"``,
    ``"lerf"``: the least-relevant-first deletion curve behind ABPC)."""

    id: Any
    n_tokens: int
    full_score: float
    empty_score: float
    metrics: dict[str, float]
    curves: dict[str, Curve] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (read back by :meth:`from_dict`)."""
        return {"id": _plain(self.id), "n_tokens": self.n_tokens, "full_score": self.full_score,
                "empty_score": self.empty_score, "metrics": dict(self.metrics),
                "curves": {k: {"x": list(x), "y": list(y)} for k, (x, y) in self.curves.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExampleResult:
        curves = {k: (list(c["x"]), list(c["y"])) for k, c in data.get("curves", {}).items()}
        return cls(data["id"], data["n_tokens"], data["full_score"], data["empty_score"], data["metrics"], curves)


@dataclass
class FaithfulnessResult:
    """Every explanation's :class:`ExampleResult` and the settings they were measured with
    (``score``: ``"prob"`` or ``"logit"``; ``replacement``: the token id; ``fractions``: the
    comprehensiveness/sufficiency bins; ``steps``: curve points, None = every token; ``method``:
    the explanation method when all explanations name the same one; ``keep_first``: token 0 was
    never replaced)."""

    examples: list[ExampleResult]
    metrics: tuple[str, ...]
    score: str
    replacement: int
    fractions: tuple[float, ...]
    steps: int | None
    method: str | None = None
    keep_first: bool = False

    @property
    def mean(self) -> dict[str, float]:
        """Each metric's mean over the explanations."""
        return {m: float(np.mean(self.values(m))) for m in self.metrics}

    @property
    def stderr(self) -> dict[str, float]:
        """Each metric's standard error of the mean (0 for a single explanation)."""
        n = len(self.examples)
        return {m: float(np.std(self.values(m), ddof=1) / math.sqrt(n)) if n > 1 else 0.0 for m in self.metrics}

    def values(self, metric: str) -> list[float]:
        """``metric`` of every explanation, in input order."""
        if metric not in self.metrics:
            raise ExplainError(f"metric {metric!r} was not measured: this result has {', '.join(self.metrics)}")
        return [e.metrics[metric] for e in self.examples]

    def mean_curve(self, name: str, points: int = 101) -> Curve:
        """The mean of every explanation's ``name`` curve, each interpolated linearly onto ``points``
        evenly spaced x in [0, 1] (prompts differ in length, so their curves in x)."""
        curves = [e.curves[name] for e in self.examples if name in e.curves]
        if not curves:
            raise ExplainError(f"no {name} curve was measured: pass metrics that need it")
        grid = np.linspace(0.0, 1.0, points)
        return grid.tolist(), np.mean([np.interp(grid, x, y) for x, y in curves], axis=0).tolist()

    def table(self) -> str:
        """The means as a fixed-width table: metric, mean, standard error, which way is better."""
        lines = [f"{'metric':<18}{'mean':>10}{'± s.e.':>10}  better"]
        mean, err = self.mean, self.stderr
        for m in self.metrics:
            lines.append(f"{m:<18}{mean[m]:>10.4f}{err[m]:>10.4f}  {'higher' if HIGHER_IS_BETTER[m] else 'lower'}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: settings, means, standard errors and every example (curves included)."""
        return {"settings": {"metrics": list(self.metrics), "score": self.score, "replacement": self.replacement,
                             "fractions": list(self.fractions), "steps": self.steps, "method": self.method,
                             "keep_first": self.keep_first},
                "n_examples": len(self.examples), "mean": self.mean, "stderr": self.stderr,
                "examples": [e.to_dict() for e in self.examples]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaithfulnessResult:
        """Rebuild from :meth:`to_dict`."""
        s = data["settings"]
        return cls([ExampleResult.from_dict(e) for e in data["examples"]], tuple(s["metrics"]), s["score"],
                   s["replacement"], tuple(s["fractions"]), s["steps"], s.get("method"), s.get("keep_first", False))

    def to_json(self, indent: int | None = 1) -> str:
        """Strict JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False, indent=indent)

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path`` atomically."""
        return atomic_write(path, self.to_json())

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Write a PNG of the mean deletion and insertion curves (whichever were measured, each
        labelled with its mean area) to ``path`` atomically (drawn by
        :func:`lucidlm.evaluate.plot.curves_png`)."""
        from .plot import CURVES, curves_png

        curves = {name: self.mean_curve(name) for name in CURVES if any(name in e.curves for e in self.examples)}
        if not curves:
            raise ExplainError("plot: no deletion or insertion curve was measured (metrics "
                               f"{', '.join(self.metrics)}): measure deletion or insertion to plot them")
        areas = {name: self.mean[name] for name in curves if name in self.metrics}
        method = f" · method {self.method}" if self.method else ""
        title = f"faithfulness: mean curves over {len(self.examples)} explanations{method}"
        return atomic_write(path, curves_png(curves, areas, self.score, title))


def _plain(value: Any) -> Any:
    """An id as JSON can hold it: numpy scalars as Python numbers, anything else unusual as text."""
    if isinstance(value, np.generic):
        return value.item()
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
