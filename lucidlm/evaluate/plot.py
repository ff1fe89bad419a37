"""The picture of a faithfulness result: mean deletion and insertion curves.

Drawn with matplotlib's Agg canvas outside pyplot (no global state, any backend), like every
lucidlm PNG (:mod:`lucidlm.render.png`). It draws plain curves; which curves a result has, and
their means, are :meth:`lucidlm.evaluate.result.FaithfulnessResult.plot`'s business.

>>> curves_png({"deletion": ([0.0, 0.5, 1.0], [0.9, 0.2, 0.1])}, {"deletion": 0.3}, "prob", "a title")[:4]
b'\\x89PNG'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..render.png import figure_png, new_figure

#: the curves drawn, their legend labels and colours (deletion falls, insertion rises)
CURVES = {"deletion": ("deletion (most relevant first removed)", "tab:blue"),
          "insertion": ("insertion (most relevant first restored)", "tab:orange")}


def curves_png(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], areas: Mapping[str, float],
               score: str, title: str) -> bytes:
    """PNG bytes: each of ``curves`` (``"deletion"``, ``"insertion"``: x and y) labelled with its
    area in ``areas`` where it has one; the y axis is ``p(target)`` for ``score="prob"``, else the
    target's logit."""
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    for name in (name for name in CURVES if name in curves):
        label, color = CURVES[name]
        area = f", area {areas[name]:.3f}" if name in areas else ""
        ax.plot(*curves[name], color=color, label=label + area)
    ax.set_xlabel("fraction of the prompt's tokens")
    ax.set_ylabel("p(target)" if score == "prob" else "target logit")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return figure_png(fig)
