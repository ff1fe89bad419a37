"""The result types of every explanation in lucidlm, and their one serialised form.

* :class:`Explanation`: relevance of each prompt token for one predicted target.
* :class:`GenerationExplanation`: for each generated token, the relevance of every earlier token.
* :class:`ImageExplanation`: relevance of each pixel of an image for one class.

Each serialises to the wire format of :mod:`lucidlm.explain.wire` (``to_dict``/``to_json``, read
back to an equal object by ``from_dict``/``from_json``/:func:`load_json`, including files older
versions saved) and renders to the terminal, self-contained HTML and PNG through
:mod:`lucidlm.render`. Files are written atomically (see :func:`lucidlm.fileio.atomic_write`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch

from ..errors import ExplainError
from ..fileio import atomic_write
from ..render import html, png, terminal
from ..render.cells import NEUTRAL, Cell, token_cells
import lucidlm.explain.aggregate as aggregate
import lucidlm.explain.wire as wire

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Explanation", "GenerationExplanation", "ImageExplanation", "load_dict", "load_json"]

PathLike = str | os.PathLike[str]


def _tensor(value: Any, dtype: torch.dtype, name: str, dims: int,
            empty_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``value`` as a CPU tensor of ``dtype`` with ``dims`` dimensions, or an ExplainError. An
    empty ``value`` takes ``empty_shape`` (JSON's ``[]`` has lost the shape of an empty matrix)."""
    t = torch.as_tensor(value).detach().to("cpu", dtype)
    if empty_shape is not None and t.numel() == 0 == math.prod(empty_shape):
        t = t.reshape(empty_shape)
    if t.dim() != dims:
        raise ExplainError(f"{name}: expected a {dims}-D tensor, got shape {tuple(t.shape)}")
    return t


def _check_len(name: str, items: Any, n: int) -> None:
    if items is not None and len(items) != n:
        raise ExplainError(f"{name}: expected {n} entries, got {len(items)}")


def _segment(i: int, value: Any) -> dict[str, Any]:
    """``segments[i]`` as ``{"label": str, "start": int, "end": int}``, or an ExplainError."""
    try:
        segment = {"label": str(value["label"]), "start": int(value["start"]), "end": int(value["end"])}
    except (TypeError, KeyError, ValueError) as e:
        raise ExplainError(f"segments[{i}] = {value!r:.80}: expected a dict with a label and int "
                           "start and end") from e
    if not 0 <= segment["start"] <= segment["end"]:
        raise ExplainError(f"segments[{i}] = {value!r:.80}: expected 0 <= start <= end")
    return segment


def _target_title(target: str, score: float, method: str, label: str = "logit") -> str:
    """``target ' Paris' (logit 17.25) · method attnlrp``; ``label`` names what ``score`` is."""
    return f"target {target!r} ({label} {score:.4g}) · method {method}"


class Result:
    """The wire format, files, equality and Jupyter display shared by the explanation types."""

    #: the fields holding numbers, whose non-finite values the wire format spells as strings
    _NUMBERS: ClassVar[tuple[str, ...]] = ()

    def to_html(self, full_page: bool = True) -> str:  # pragma: no cover - every subclass has one
        raise NotImplementedError

    def png_figure(self, *options: Any, **named: Any) -> Figure:  # pragma: no cover - every subclass has one
        raise NotImplementedError

    def to_png(self, *options: Any, **named: Any) -> bytes:
        """PNG bytes at 150 dpi of :meth:`png_figure`, which takes the same options (``skip_first``,
        ``columns``; ``overlay`` for an image)."""
        return png.figure_png(self.png_figure(*options, **named))

    def save_png(self, path: PathLike, *options: Any, **named: Any) -> Path:
        """Write :meth:`to_png` to ``path`` atomically; returns the path."""
        return atomic_write(path, self.to_png(*options, **named))

    def __str__(self) -> str:
        return self.to_terminal()

    def to_terminal(self, *options: Any, **named: Any) -> str:  # pragma: no cover - every subclass has one
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The wire format (:mod:`lucidlm.explain.wire`): ``format``, ``version``, ``type``, then
        every field as plain JSON (tensors as nested lists, non-finite floats as strings)."""
        spec = fields(self)  # type: ignore[arg-type]
        return wire.header(type(self).__name__) | {f.name: wire.plain(getattr(self, f.name)) for f in spec}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Rebuild from :meth:`to_dict`, of this version or an older one (see
        :func:`lucidlm.explain.wire.upgrade`); ExplainError names what is wrong with ``data``.
        Keys that are no field (an ``explain-dataset`` row's ``id``) are ignored."""
        data = wire.upgrade(data)
        if data.get("type") != cls.__name__:
            raise ExplainError(f"expected a serialised {cls.__name__}, got type {data.get('type')!r}")
        spec = fields(cls)  # type: ignore[arg-type]
        missing = [f.name for f in spec if f.name not in data and f.default is MISSING]
        if missing:
            raise ExplainError(f"{cls.__name__} JSON lacks field(s) {', '.join(missing)}")
        values = {f.name: data[f.name] for f in spec if f.name in data}
        try:
            for name in set(cls._NUMBERS) & set(values):
                values[name] = wire.unspell(values[name])
            return cls(**values)
        except ExplainError:
            raise
        except (TypeError, ValueError, KeyError, RuntimeError) as e:
            raise ExplainError(f"{cls.__name__} JSON is malformed: {e}") from e

    def to_json(self, indent: int | None = None) -> str:
        """Strict JSON text (see :meth:`to_dict`); :meth:`from_json` reads it back."""
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Self:
        """Rebuild from :meth:`to_json` text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExplainError(f"{cls.__name__}.from_json: not JSON ({e})") from e
        return cls.from_dict(data)

    def save_json(self, path: PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` atomically; returns the path."""
        return atomic_write(path, self.to_json(indent=1))

    def save_html(self, path: PathLike) -> Path:
        """Write the self-contained :meth:`to_html` page to ``path`` atomically."""
        return atomic_write(path, self.to_html())

    def _repr_html_(self) -> str:
        """Jupyter display: the HTML rendering as a fragment (styles scoped to ``.lucidlm``)."""
        return self.to_html(full_page=False)

    def __eq__(self, other: object) -> bool:
        # Field-wise == would compare tensors element-wise; equal wire forms mean equal results
        # (same values and shapes; every tensor field has one dtype, set by __post_init__).
        return isinstance(other, Result) and type(self) is type(other) \
            and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable, like every dataclass with eq


def load_dict(data: dict[str, Any]) -> Result:
    """Read any explanation's ``to_dict()`` (of any version), whichever type it is: an
    :class:`Explanation`, :class:`GenerationExplanation`, :class:`ImageExplanation` or an
    :class:`~lucidlm.explain.diff_result.ExplanationDiff` (its class found by
    :func:`lucidlm.explain.wire.result_type`).

    >>> e = ImageExplanation(torch.zeros(2, 2), None, "cat", 1.0, "attnlrp")
    >>> load_dict(e.to_dict()) == e
    True
    """
    data = wire.upgrade(data)
    return wire.result_type(data.get("type")).from_dict(data)


def load_json(text: str) -> Result:
    """Read any explanation's JSON (:func:`load_dict` of it), whichever type it is."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExplainError(f"load_json: not JSON ({e})") from e
    return load_dict(data)


# ----------------------------------------------------------------------------- Explanation


@dataclass(eq=False, repr=False)
class Explanation(Result):
    """Relevance of every prompt token for one predicted target.

    ``evicted`` (bool per token) marks tokens a KV-cache policy dropped, so the model never saw
    them for this prediction: they have relevance 0 and every rendering greys and strikes them
    through. ``kept_heads`` (layers, KV groups, tokens) bool, under an evicting policy, says which
    tokens each head still held for the prediction (a per-head policy keeps different ones per
    head; ``evicted`` marks those no head of any layer held). ``layers`` holds latent relevances, e.g. ``"layers.3.attn"`` -> ``(n_heads,)``.
    ``token_ids`` may be empty when the ids are unknown. ``segments`` (optional) names character
    ranges of :attr:`text`, ``[{"label": "Document 1", "start": 12, "end": 80}, ...]``: set by
    ``LLM.explain(..., context=[...])`` and :meth:`spans`, read by :meth:`context`.
    :meth:`words` and :meth:`spans` return new explanations over words or spans, which render
    and serialise like any other.

    >>> e = Explanation(tokens=["<s>", "The", " capital", " of", " France"],
    ...                 token_ids=[1, 450, 7483, 310, 3444],
    ...                 relevance=torch.tensor([4.0, 0.1, 0.8, -0.2, 1.6]),
    ...                 target=" Paris", target_ids=[3681], target_logit=17.25, method="attnlrp")
    >>> e.top(2, skip_first=True)
    [(4, ' France', 1.600000023841858), (2, ' capital', 0.800000011920929)]
    >>> print(e.to_terminal(color=False, width=80).splitlines()[2])
    <s>[+4 sink]The[+0.1] capital[+0.8] of[-0.2] France[+1.6]
    >>> e.title()
    "target ' Paris' (logit 17.25) · method attnlrp"
    >>> Explanation.from_json(e.to_json()) == e
    True
    """

    tokens: list[str]
    token_ids: list[int]
    relevance: torch.Tensor
    target: str
    target_ids: list[int]
    target_logit: float
    method: str
    evicted: torch.Tensor | None = None
    layers: dict[str, torch.Tensor] | None = None
    prompt: str | None = None
    #: what ``target_logit`` holds: "logit", "logit difference" (a contrast), "log-prob" (a
    #: continuation's summed log-probabilities) or "logit sum" (a continuation, objective="logit").
    #: Every rendering labels the value with it; JSON without it (older files) reads as "logit".
    score_label: str = "logit"
    #: labelled character ranges of :attr:`text` (documents of a RAG prompt, user spans), or None;
    #: JSON without it (older files) reads as None.
    segments: list[dict[str, Any]] | None = None
    #: (layers, KV groups, tokens) bool: what each head held for the prediction (an explanation
    #: under an evicting KV-cache policy), or None; JSON carries it only when set.
    kept_heads: torch.Tensor | None = None

    _NUMBERS: ClassVar[tuple[str, ...]] = ("relevance", "target_logit", "layers")

    def __post_init__(self) -> None:
        self.tokens = [str(t) for t in self.tokens]
        n = len(self.tokens)
        self.token_ids = [int(i) for i in self.token_ids]
        if self.token_ids:
            _check_len("token_ids", self.token_ids, n)
        self.relevance = _tensor(self.relevance, torch.float32, "relevance", 1)
        _check_len("relevance", self.relevance, n)
        self.target, self.method = str(self.target), str(self.method)
        self.target_ids = [int(i) for i in self.target_ids]
        self.target_logit = float(self.target_logit)
        self.score_label = str(self.score_label) if self.score_label else "logit"
        if self.evicted is not None:
            self.evicted = _tensor(self.evicted, torch.bool, "evicted", 1)
            _check_len("evicted", self.evicted, n)
        if self.layers is not None:
            self.layers = {str(k): torch.as_tensor(v).detach().cpu() for k, v in self.layers.items()}
        if self.segments is not None:
            self.segments = [_segment(i, s) for i, s in enumerate(self.segments)]
        if self.kept_heads is not None:
            self.kept_heads = _tensor(self.kept_heads, torch.bool, "kept_heads", 3, (0, 0, n))
            if self.kept_heads.shape[-1] != n:
                raise ExplainError(f"kept_heads: expected shape (layers, groups, {n}), got "
                                   f"{tuple(self.kept_heads.shape)}")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if self.kept_heads is None:  # only explanations under a KV-cache policy carry it
            del data["kept_heads"]
        return data

    # ------------------------------------------------------------------ aggregation

    @property
    def text(self) -> str:
        """The text the tokens spell, which character offsets (:meth:`spans`, ``segments``)
        index: the prompt when the tokens match it, so offsets are offsets into the prompt string
        and a BOS token the tokenizer added takes no characters; otherwise (no prompt, e.g. an
        explanation of token ids) the concatenated tokens. See :mod:`lucidlm.explain.aggregate`.
        """
        return aggregate.align(self.tokens, self.prompt).text

    def words(self, agg: str = "sum") -> Explanation:
        """The same explanation over words: each word's relevance is the ``agg`` of its tokens'
        (``"sum"``, default, conserves the total; ``"mean"``, ``"max"``, ``"absmax"``: the value
        of largest magnitude, sign kept).

        A word keeps its leading whitespace, so the words join to :attr:`text` (with any special
        token the text lacks, such as BOS, in place). A special token, a line break and a
        punctuation-only token are words of their own; a token starting with whitespace, or
        following one that ends in whitespace, starts a word (a token of spaces only is the
        leading space of the next word); the bytes of a character split across tokens stay in
        one word (rules: :func:`lucidlm.explain.aggregate.word_groups`). A word is evicted only
        if all its tokens were. ``token_ids`` is empty and ``layers`` None in the result.

        >>> e = Explanation(["<s>", "The", " cap", "ital", " of", " Fr", "ance", "."], [],
        ...                 torch.tensor([4.0, 0.5, 1.0, 0.5, -0.25, 2.0, 1.0, 0.125]),
        ...                 " Paris", [3681], 17.25, "attnlrp", prompt="The capital of France.")
        >>> w = e.words()
        >>> w.tokens, w.relevance.tolist()
        (['<s>', 'The', ' capital', ' of', ' France', '.'], [4.0, 0.5, 1.5, -0.25, 3.0, 0.125])
        >>> e.words("max").relevance.tolist()[2]
        1.0
        """
        a = aggregate.align(self.tokens, self.prompt)
        return self._regrouped(a, aggregate.word_groups(a), agg, self.segments)

    def spans(self, spans: Sequence[tuple[int, int]] | Mapping[str, tuple[int, int]],
              agg: str = "sum") -> Explanation:
        """The same explanation over character spans of :attr:`text`: ``[(start, end), ...]`` or
        ``{"label": (start, end), ...}`` (Python slice bounds; with a prompt, offsets into the
        prompt string, whatever BOS token the tokenizer added).

        A token belongs to the span holding its first non-space character (so ``" Paris"`` is in
        a span starting at ``P``); a token straddling a span's end stays with the span it starts
        in. The text outside every span is kept, as segments of its own between the spans (a
        special token the text lacks, such as BOS, is always one by itself), so with
        ``agg="sum"`` the result's relevances add up to this one's. The result's tokens are the
        segments' text, its ``segments`` the spans (read them back with :meth:`context`; a span
        that holds no token has no token in the result). Overlapping spans, spans outside the
        text, a label used twice or the label ``"other"``: ExplainError naming the span.

        >>> e = Explanation(["Paris", " is", " in", " France"], [], torch.tensor([1.0, 2.0, 3.0, 4.0]),
        ...                 ".", [13], 5.0, "attnlrp", prompt="Paris is in France")
        >>> s = e.spans({"where": (12, 18)})
        >>> s.tokens, s.relevance.tolist(), s.context()
        (['Paris is in', ' France'], [6.0, 4.0], {'where': 4.0, 'other': 6.0})
        """
        a = aggregate.align(self.tokens, self.prompt)
        checked = aggregate.check_spans(spans, len(a.text))
        groups, _ = aggregate.span_groups(a, checked)
        return self._regrouped(a, groups, agg, checked)

    def context(self, agg: str = "sum") -> dict[str, float]:
        """Relevance of each segment (e.g. each document of ``LLM.explain(..., context=docs)``
        and the question), by label in order, then ``"other"``: every token outside them (the
        "Document i:" headers, blank lines, BOS). Tokens are assigned as in :meth:`spans`; with
        ``agg="sum"`` the values add up to the total relevance. Values are computed in float64
        from this explanation's tokens (call it on the token-level explanation for ``"mean"``,
        ``"max"`` and ``"absmax"``: on a :meth:`spans` result they would aggregate aggregates).

        >>> e = Explanation(["A", " b", " Q"], [], torch.tensor([1.0, 2.0, 4.0]), "x", [1], 7.0,
        ...                 "cp-lrp", prompt="A b Q", segments=[{"label": "doc", "start": 0, "end": 3}])
        >>> e.context(), e.context("max")
        ({'doc': 3.0, 'other': 4.0}, {'doc': 2.0, 'other': 4.0})
        """
        if not self.segments:
            raise ExplainError("context(): this explanation has no segments: explain with "
                               "LLM.explain(prompt, context=[...]) or call spans() first")
        a = aggregate.align(self.tokens, self.prompt)
        checked = aggregate.check_spans(self.segments, len(a.text))
        keys = aggregate.assign(a, checked)
        groups = [[i for i, k in enumerate(keys) if k == n] for n in range(len(checked))]
        groups.append([i for i, k in enumerate(keys) if k is None])
        values = aggregate.aggregate(self.relevance, groups, agg, torch.float64).tolist()
        return dict(zip([s["label"] for s in checked] + [aggregate.OTHER], values))

    def _regrouped(self, a: aggregate.Alignment, groups: list[list[int]], agg: str,
                   segments: list[dict[str, Any]] | None) -> Explanation:
        """A copy over ``groups`` of tokens: their joined text, ``agg`` of their relevances."""
        relevance = aggregate.aggregate(self.relevance, groups, agg)
        evicted = None if self.evicted is None else \
            torch.tensor([bool(self.evicted[g].all()) for g in groups], dtype=torch.bool)
        kept_heads = None if self.kept_heads is None else \
            torch.stack([self.kept_heads[..., g].any(-1) for g in groups], dim=-1)  # a head holds a word by a token
        return replace(self, tokens=["".join(a.pieces[i] for i in g) for g in groups], token_ids=[],
                       relevance=relevance, evicted=evicted, layers=None, segments=segments, kept_heads=kept_heads)

    def top(self, k: int = 5, skip_first: bool = False) -> list[tuple[int, str, float]]:
        """The ``k`` most positively relevant tokens as ``(index, token, relevance)``, highest first.

        Evicted tokens are left out (the model did not see them); so is token 0 with
        ``skip_first`` (an attention sink tops every list and says little).
        """
        values = self.relevance.double().nan_to_num(nan=-math.inf)
        keep = torch.ones_like(values, dtype=torch.bool) if self.evicted is None else ~self.evicted
        if skip_first and len(keep) > 1:
            keep[0] = False
        order = [i for i in torch.argsort(values, descending=True, stable=True).tolist() if keep[i]]
        return [(i, self.tokens[i], float(self.relevance[i])) for i in order[:k]]

    def cells(self, skip_first: bool = True) -> tuple[list[Cell], float]:
        """Tokens ready to draw and the colour scale (the |relevance| drawn at full colour)."""
        return token_cells(self.tokens, self.relevance, self.evicted, skip_first)

    def title(self) -> str:
        """One-line header: target, the explained score labelled with :attr:`score_label`, and
        method."""
        return _target_title(self.target, self.target_logit, self.method, self.score_label)

    def to_terminal(self, skip_first: bool = True, width: int | None = None,
                    color: bool | None = None) -> str:
        """Header, tokens with 24-bit ANSI backgrounds (red +, blue −), and a colour bar.

        ``color=None`` (default) colours only when stdout is a terminal and NO_COLOR is not set,
        so ``print(e.to_terminal())`` piped to a file writes no escape codes; ``color=True`` or
        ``False`` forces it. Plain text shows each token's value in brackets. ``width`` defaults
        to the terminal's; ``skip_first`` leaves token 0 out of the colour scale (underlined).
        """
        return terminal.heatmap(*self.cells(skip_first), self.title(), width, color)

    def to_html(self, skip_first: bool = True, full_page: bool = True) -> str:
        """Self-contained HTML: header, tokens with tooltips showing their values, colour bar."""
        return html.heatmap_page(*self.cells(skip_first), self.title(), f"lucidlm: {self.target}", full_page)

    def png_figure(self, skip_first: bool = True, columns: int = 80) -> Figure:
        """The matplotlib Figure :meth:`to_png` draws (Agg canvas, outside pyplot): title, tokens
        wrapped at ``columns`` (the figure is only as wide as the longest line), colour bar
        with ticks at ±scale and 0, one-line legend."""
        return png.tokens_figure(*self.cells(skip_first), self.title(), columns)

    def __repr__(self) -> str:
        best = self.top(1, skip_first=True)
        return (f"Explanation(target={self.target!r}, method={self.method!r}, "
                f"n_tokens={len(self.tokens)}, top={best[0][1] if best else None!r})")


# ----------------------------------------------------------------------------- generation


@dataclass(eq=False, repr=False)
class GenerationExplanation(Result):
    """For each generated token, the relevance of every earlier token.

    ``matrix[i, j]`` is the relevance of token j (prompt tokens first, then generated ones) for
    generated token i; entries with ``j >= len(prompt_tokens) + i`` are not earlier tokens and are
    ignored (0 or NaN). ``evicted`` (same shape, bool) marks tokens the KV cache had dropped when
    token i was generated. Ids and logits are optional; :meth:`row` fills what it has.

    >>> g = GenerationExplanation(["<s>", "Hi"], [" there", "!"],
    ...     torch.tensor([[2.0, 1.0, 0.0, 0.0], [2.0, 0.5, -1.0, 0.0]]), "attnlrp")
    >>> g.row(1).top(2, skip_first=True)
    [(1, 'Hi', 0.5), (2, ' there', -1.0)]
    >>> GenerationExplanation.from_json(g.to_json()) == g
    True
    """

    prompt_tokens: list[str]
    generated_tokens: list[str]
    matrix: torch.Tensor
    method: str
    prompt_ids: list[int] | None = None
    generated_ids: list[int] | None = None
    target_logits: list[float] | None = None
    evicted: torch.Tensor | None = None
    prompt: str | None = None

    _NUMBERS: ClassVar[tuple[str, ...]] = ("matrix", "target_logits")

    def __post_init__(self) -> None:
        self.prompt_tokens = [str(t) for t in self.prompt_tokens]
        self.generated_tokens = [str(t) for t in self.generated_tokens]
        self.method = str(self.method)
        shape = (len(self.generated_tokens), len(self.tokens))
        self.matrix = _tensor(self.matrix, torch.float32, "matrix", 2, shape)
        if tuple(self.matrix.shape) != shape:
            raise ExplainError(f"matrix: expected shape (n_generated, n_prompt + n_generated) = "
                               f"{shape}, got {tuple(self.matrix.shape)}")
        if self.evicted is not None:
            self.evicted = _tensor(self.evicted, torch.bool, "evicted", 2, shape)
            if tuple(self.evicted.shape) != shape:
                raise ExplainError(
                    f"evicted: expected shape {shape}, got {tuple(self.evicted.shape)}")
        for name, n in (("prompt_ids", shape[1] - shape[0]), ("generated_ids", shape[0]),
                        ("target_logits", shape[0])):
            _check_len(name, getattr(self, name), n)
        if self.prompt_ids is not None:
            self.prompt_ids = [int(i) for i in self.prompt_ids]
        if self.generated_ids is not None:
            self.generated_ids = [int(i) for i in self.generated_ids]
        if self.target_logits is not None:
            self.target_logits = [float(x) for x in self.target_logits]

    @property
    def tokens(self) -> list[str]:
        """Prompt then generated tokens: the columns of :attr:`matrix`."""
        return self.prompt_tokens + self.generated_tokens

    def row(self, i: int) -> Explanation:
        """The explanation of generated token ``i`` (negative counts from the end) over the
        tokens before it."""
        n_gen = len(self.generated_tokens)
        if not -n_gen <= i < n_gen:
            raise IndexError(f"row({i}): {n_gen} token(s) were generated")
        i %= n_gen
        n = len(self.prompt_tokens) + i
        ids = self.prompt_ids + self.generated_ids if self.prompt_ids and self.generated_ids else []
        return Explanation(
            tokens=self.tokens[:n], token_ids=ids[:n], relevance=self.matrix[i, :n],
            target=self.generated_tokens[i],
            target_ids=[self.generated_ids[i]] if self.generated_ids else [],
            target_logit=self.target_logits[i] if self.target_logits else math.nan,
            method=self.method, evicted=None if self.evicted is None else self.evicted[i, :n],
            prompt=self.prompt)

    def rows(self) -> list[Explanation]:
        """:meth:`row` for every generated token."""
        return [self.row(i) for i in range(len(self.generated_tokens))]

    def title(self) -> str:
        """One-line header."""
        return (f"{len(self.generated_tokens)} generated token(s) after "
                f"{len(self.prompt_tokens)} prompt token(s) · method {self.method}")

    def to_terminal(self, k: int = 5, skip_first: bool = True, color: bool | None = None) -> str:
        """Compact view: one line per generated token with its ``k`` most relevant earlier tokens
        (coloured on that row's own scale). ``row(i).to_terminal()`` shows a full row.
        ``color=None`` (default) colours only on a terminal without NO_COLOR (as
        :meth:`Explanation.to_terminal`)."""
        title = self.title() + f" · top {k} earlier tokens each" + " (token 0 left out)" * skip_first
        rows = [(r.target, r.cells(skip_first)[0], r.top(k, skip_first)) for r in self.rows()]
        return terminal.top_tokens(title, rows, color)

    def to_html(self, skip_first: bool = True, full_page: bool = True) -> str:
        """Self-contained interactive page: hover (or click, to pin) a generated token to see its
        row as a heatmap over the earlier tokens (drawn by ``lucidlm/render/static/heatmap.js``
        from this generation's :meth:`to_dict`, inlined). Without JS the page shows the last
        generated token's row."""
        n_gen = len(self.generated_tokens)
        last = self.matrix[-1] if n_gen else torch.zeros(len(self.tokens))
        last_evicted = self.evicted[-1] if self.evicted is not None and n_gen else None
        cells, scale = token_cells(self.tokens, last, last_evicted, skip_first)
        cells = [c._replace(color=NEUTRAL) if c.index == len(cells) - 1 and n_gen else c
                 for c in cells]  # the last token is the one explained, not an input
        return html.generation_page(cells, scale, len(self.prompt_tokens), self.to_dict(), self.title(),
                                    f"lucidlm: generation ({self.method})", skip_first, full_page)

    def png_figure(self, skip_first: bool = True) -> Figure:
        """The matplotlib Figure :meth:`to_png` draws: title, the matrix (rows = generated
        tokens, columns = all tokens), colour bar and one-line legend."""
        if not self.generated_tokens:
            raise ExplainError("GenerationExplanation.to_png: no token was generated")
        colors = png.row_colors([r.cells(skip_first)[0] for r in self.rows()], len(self.tokens))
        return png.matrix_figure(colors, self.tokens, self.generated_tokens, self.title())

    def __repr__(self) -> str:
        return (f"GenerationExplanation(method={self.method!r}, n_prompt={len(self.prompt_tokens)}, "
                f"generated={''.join(self.generated_tokens)[:40]!r})")


# ----------------------------------------------------------------------------- images


@dataclass(eq=False, repr=False)
class ImageExplanation(Result):
    """Relevance of each pixel (``relevance``: (H, W)) for one class of an image model.

    ``image`` is the input, (3, H, W) (or (1, H, W)) in [0, 1], or None.

    >>> e = ImageExplanation(torch.randn(8, 8), torch.rand(3, 8, 8), "tabby cat", 9.5, "attnlrp")
    >>> e.to_png()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
    """

    relevance: torch.Tensor
    image: torch.Tensor | None
    target: str
    target_logit: float
    method: str

    _NUMBERS: ClassVar[tuple[str, ...]] = ("relevance", "image", "target_logit")

    def __post_init__(self) -> None:
        self.relevance = _tensor(self.relevance, torch.float32, "relevance", 2)
        self.target, self.method = str(self.target), str(self.method)
        self.target_logit = float(self.target_logit)
        if self.image is None:
            return
        self.image = _tensor(self.image, torch.float32, "image", 3)
        if self.image.shape[0] not in (1, 3) or self.image.shape[1:] != self.relevance.shape:
            h, w = self.relevance.shape
            raise ExplainError(f"image: expected shape (3, {h}, {w}) to match relevance, "
                               f"got {tuple(self.image.shape)}")

    def title(self) -> str:
        """One-line header."""
        return _target_title(self.target, self.target_logit, self.method)

    def png_figure(self, overlay: bool = True) -> Figure:
        """The matplotlib Figure :meth:`to_png` draws: the heatmap (colour map symmetric around 0),
        over the image if ``overlay`` (opacity follows |relevance|) or beside it."""
        image = None
        if self.image is not None:  # (C, H, W) -> (H, W, 3) for matplotlib
            image = self.image.clamp(0, 1).expand(3, -1, -1).permute(1, 2, 0).numpy()
        return png.image_figure(self.relevance.numpy(), image, overlay, self.title())

    def to_html(self, full_page: bool = True, overlay: bool = True) -> str:
        """Self-contained HTML: header and the PNG inline as a ``data:`` URI."""
        return html.image_page(self.to_png(overlay), self.title(), f"lucidlm: {self.target}", full_page)

    def __str__(self) -> str:
        return f"{self.title()} · {tuple(self.relevance.shape)} pixels"

    def __repr__(self) -> str:
        return (f"ImageExplanation(target={self.target!r}, method={self.method!r}, "
                f"shape={tuple(self.relevance.shape)})")
