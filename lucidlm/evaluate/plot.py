"""The picture of a faithfulness result: the mean deletion and insertion curves.

Drawn with matplotlib's Agg canvas outside pyplot (no global state, any backend), like every
lucidlm PNG (:mod:`lucidlm.explain.heatmaps`).

>>> from lucidlm.evaluate.result import ExampleResult, FaithfulnessResult
>>> ex = ExampleResult(0, 2, 0.9, 0.1, {"deletion": 0.3}, {"deletion": ([0.0, 0.5, 1.0], [0.9, 0.2, 0.1])})
>>> curves_png(FaithfulnessResult([ex], ("deletion",), "prob", 0, (0.5,), None))[:4]
b'\\x89PNG'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ExplainError
from ..explain import heatmaps as hm

if TYPE_CHECKING:
    from .result import FaithfulnessResult

#: the curves drawn, their legend labels and colours (deletion falls, insertion rises)
_CURVES = {"deletion": ("deletion (most relevant first removed)", "tab:blue"),
           "insertion": ("insertion (most relevant first restored)", "tab:orange")}


def curves_png(result: FaithfulnessResult) -> bytes:
    """PNG bytes: the mean deletion and insertion curves of ``result`` (whichever were measured),
    each labelled with its mean area."""
    drawn = [name for name in _CURVES if any(name in e.curves for e in result.examples)]
    if not drawn:
        raise ExplainError("plot: no deletion or insertion curve was measured (metrics "
                           f"{', '.join(result.metrics)}): measure deletion or insertion to plot them")
    fig = hm.new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    for name in drawn:
        label, color = _CURVES[name]
        x, y = result.mean_curve(name)
        area = f", area {result.mean[name]:.3f}" if name in result.metrics else ""
        ax.plot(x, y, color=color, label=label + area)
    ax.set_xlabel("fraction of the prompt's tokens")
    ax.set_ylabel("p(target)" if result.score == "prob" else "target logit")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    method = f" · method {result.method}" if result.method else ""
    ax.set_title(f"faithfulness: mean curves over {len(result.examples)} explanations{method}", fontsize=9)
    return hm.figure_png(fig)
