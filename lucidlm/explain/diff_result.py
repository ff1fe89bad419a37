"""The result of :func:`lucidlm.explain.diff.explain_diff`: :class:`ExplanationDiff`, its wire form
and its renderings.

Every rendering (terminal, HTML, PNG; the viewer's diff mode draws the same rows from the wire
form) stacks the rows of :meth:`ExplanationDiff.rows` over the prompt tokens on ONE colour scale,
so a colour means the same relevance in every row: the base model's relevance, the tuned model's,
their difference (tuned − base) and, when the tuned model ran adapter branches, the part of the
tuned relevance that came through the adapter.

>>> base = Explanation(["<s>", "Hi", " there"], [1, 2, 3], [2.0, 0.5, 0.25], "!", [4], 12.5, "cp-lrp")
>>> tuned = Explanation(["<s>", "Hi", " there"], [1, 2, 3], [2.0, 1.5, -0.25], "!", [4], 14.0, "cp-lrp")
>>> d = ExplanationDiff(base, tuned)
>>> d.relevance.tolist(), d.logit_delta
([0.0, 1.0, -0.5], 1.5)
>>> print(d.to_terminal(color=False, width=60))
what tuning changed · target '!' · logit 12.5 → 14 (+1.5) · method cp-lrp
token 0 "<s>" is an attention sink, excluded from the colour scale
base (logit 12.5):
<s>[+2 sink]Hi[+0.5] there[+0.25]
tuned (logit 14):
<s>[+2 sink]Hi[+1.5] there[-0.25]
tuned − base (+1.5):
<s>[+0 sink]Hi[+1] there[-0.5]
colour scale ±1.5 · relevance, every row on one scale: red supports the target, blue opposes it (in a difference row: red gained support, blue lost it)
>>> ExplanationDiff.from_json(d.to_json()) == d
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ExplainError
from ..render import html, png, terminal
from ..render.cells import Row, stacked_cells
from . import wire
from .components import KINDS, component_values
from .explanation import Explanation, Result

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ExplanationDiff"]

#: the keys of :meth:`ExplanationDiff.rows`, in the order every rendering draws them
ROW_KEYS = ("base", "tuned", "difference", "adapter")


@dataclasses.dataclass(eq=False)
class ExplanationDiff(Result):
    """The explanations of one prompt by a base and a tuned model, and what changed between them
    (see :mod:`lucidlm.explain.diff`). ``ablate`` needs the tuned model, so it works on a diff
    made by :func:`~lucidlm.explain.diff.explain_diff`, not on one read back from JSON.

    Serialises to the wire format (:meth:`to_dict`, ``to_json``, ``save_json``; read back by
    :meth:`from_dict`, ``from_json`` or :func:`lucidlm.explain.explanation.load_json`) and renders
    its :meth:`rows` on one colour scale (:meth:`to_terminal`, :meth:`to_html`, ``save_html``,
    :meth:`to_png`, :meth:`save_png`, and in Jupyter)."""

    base: Explanation
    tuned: Explanation
    adapter_relevance: torch.Tensor | None = None
    _ablation: Any = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("base", "tuned"):
            if not isinstance(getattr(self, name), Explanation):
                raise ExplainError(f"{name}: expected an Explanation, got {type(getattr(self, name)).__name__}")
        n = len(self.tuned.tokens)
        if len(self.base.tokens) != n:
            raise ExplainError(f"base has {len(self.base.tokens)} tokens and tuned {n}: a diff compares the "
                               "explanations of the same prompt ids")
        if self.adapter_relevance is not None:
            self.adapter_relevance = torch.as_tensor(self.adapter_relevance).detach().to("cpu", torch.float32)
            if tuple(self.adapter_relevance.shape) != (n,):
                raise ExplainError(f"adapter_relevance: expected shape ({n},), got "
                                   f"{tuple(self.adapter_relevance.shape)}")

    @property
    def relevance(self) -> torch.Tensor:
        """Tuned minus base relevance, per prompt token."""
        return self.tuned.relevance - self.base.relevance

    @property
    def logit_delta(self) -> float:
        """The change of the explained score (tuned − base)."""
        return self.tuned.target_logit - self.base.target_logit

    @property
    def tokens(self) -> list[str]:
        return self.tuned.tokens

    @property
    def base_relevance_of_tuned(self) -> torch.Tensor | None:
        """The part of the tuned relevance that came through the base weights only (tuned minus
        the adapter's part); ``None`` without adapter branches."""
        return None if self.adapter_relevance is None else self.tuned.relevance - self.adapter_relevance

    def component_changes(self, kind: str = "layers") -> dict[str, float]:
        """Per component of ``kind`` (``"layers"``, ``"heads"``, ``"neurons"``): the change of its
        latent relevance, tuned − base."""
        if kind not in KINDS:
            raise ExplainError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
        if self.base.layers is None or self.tuned.layers is None:
            raise ExplainError("this diff holds no latent relevances: explain it with layers='all' (or indices)")
        tuned = component_values(self.tuned.layers, kind)
        base = component_values(self.base.layers, kind)
        return {name: tuned[name] - base.get(name, 0.0) for name in tuned}

    def components(self, kind: str = "layers", top: int | None = None) -> list[tuple[str, float]]:
        """Components ranked by the change of their latent relevance, largest increase first (the
        ones that carry the score's gain), as ``(name, change)`` pairs; ``top``: the first ``top``."""
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 0):
            raise ExplainError(f"top={top!r}: expected None or an integer >= 0")
        ranked = sorted(self.component_changes(kind).items(), key=lambda item: (-item[1], item[0]))
        return ranked if top is None else ranked[:top]

    def ablate(self, names: Iterable[str]) -> float:
        """The tuned model's explained score (same prompt, same target ids) with the named
        components zeroed: one forward with hooks, nothing changed for good."""
        if self._ablation is None:
            raise ExplainError("ablate needs the tuned model: call it on a diff made by explain_diff, "
                               "not on one read back from a file")
        if isinstance(names, str):
            names = [names]
        return self._ablation(list(names))

    # ------------------------------------------------------------------ wire format

    def to_dict(self) -> dict[str, Any]:
        """The wire format (:mod:`lucidlm.explain.wire`): ``format``, ``version``, ``type``
        (``"ExplanationDiff"``), ``base`` and ``tuned`` (each an ``Explanation``'s dict), and, for
        readers that want them without arithmetic, ``relevance`` (tuned − base), ``logit_delta`` and
        ``adapter_relevance`` (null without adapter branches)."""
        return wire.header("ExplanationDiff") | {
            "base": self.base.to_dict(), "tuned": self.tuned.to_dict(), "relevance": wire.plain(self.relevance),
            "logit_delta": wire.plain(self.logit_delta), "adapter_relevance": wire.plain(self.adapter_relevance)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExplanationDiff:
        """Rebuild from :meth:`to_dict` (``ablate`` then needs the model: it is not in the dict)."""
        data = wire.upgrade(data)
        if data.get("type") != cls.__name__:
            raise ExplainError(f"expected a serialised {cls.__name__}, got type {data.get('type')!r}")
        try:
            adapter = data.get("adapter_relevance")
            return cls(Explanation.from_dict(data["base"]), Explanation.from_dict(data["tuned"]),
                       None if adapter is None else wire.unspell(adapter))
        except KeyError as exc:
            raise ExplainError(f"serialised ExplanationDiff: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ExplainError(f"serialised ExplanationDiff is malformed: {exc}") from exc

    # ------------------------------------------------------------------ renderings

    def rows(self) -> list[tuple[str, str, torch.Tensor]]:
        """What every rendering draws, as ``(key, label, relevance per token)``: ``"base"``,
        ``"tuned"`` and ``"difference"`` (tuned − base), then ``"adapter"`` (the tuned relevance
        that came through the adapter) when there is one. Labels name the explained score, e.g.
        ``"base (logit 12.3)"``, ``"tuned − base (+2.8)"``."""
        label = self.tuned.score_label
        rows = [("base", f"base ({label} {self.base.target_logit:.4g})", self.base.relevance),
                ("tuned", f"tuned ({label} {self.tuned.target_logit:.4g})", self.tuned.relevance),
                ("difference", f"tuned \u2212 base ({self.logit_delta:+.4g})", self.relevance)]
        if self.adapter_relevance is not None:
            rows.append(("adapter", "through the adapter", self.adapter_relevance))
        return rows

    def title(self) -> str:
        """One-line header: target, the two scores and their change, method."""
        t = self.tuned
        return (f"what tuning changed · target {t.target!r} · {t.score_label} {self.base.target_logit:.4g} \u2192 "
                f"{t.target_logit:.4g} ({self.logit_delta:+.4g}) · method {t.method}")

    def cells(self, skip_first: bool = True) -> tuple[list[Row], float]:
        """The :meth:`rows` ready to draw, and their one colour scale (``skip_first``: token 0 is
        left out of it, as an attention sink)."""
        return stacked_cells(self.tokens, self.rows(), self.tuned.evicted, skip_first)

    def to_terminal(self, skip_first: bool = True, width: int | None = None, color: bool | None = None) -> str:
        """Header, then each row's label and tokens with 24-bit ANSI backgrounds on one scale, then
        the colour bar. ``color=None`` colours only when stdout is a terminal and NO_COLOR is not
        set (plain text shows each value in brackets), as :meth:`Explanation.to_terminal`."""
        return terminal.stack(*self.cells(skip_first), self.title(), width, color)

    def to_html(self, skip_first: bool = True, full_page: bool = True) -> str:
        """Self-contained HTML: header, each row's label over its tokens (values as tooltips), one
        colour bar."""
        return html.stack_page(*self.cells(skip_first), self.title(), f"lucidlm: diff {self.tuned.target}",
                               full_page)

    def png_figure(self, skip_first: bool = True, columns: int = 80) -> Figure:
        """The matplotlib Figure :meth:`to_png` draws (Agg canvas, outside pyplot): title, each row's
        label and tokens wrapped at ``columns``, one colour bar, legend."""
        return png.rows_figure(*self.cells(skip_first), self.title(), columns)

    def __repr__(self) -> str:
        return (f"ExplanationDiff(target={self.tuned.target!r}, method={self.tuned.method!r}, "
                f"n_tokens={len(self.tuned.tokens)}, logit_delta={self.logit_delta:+.4g}, "
                f"adapter={'yes' if self.adapter_relevance is not None else 'no'})")
