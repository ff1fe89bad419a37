"""Colours and tokens: the one colour map of lucidlm, the colour scale, and tokens ready to draw.

One colour map is used everywhere (terminal, HTML, PNG, and ``static/heatmap.js`` in the browser):
a linear blend from blue (negative) through white (zero) to red (positive), the same as
matplotlib's ``bwr``, so a value looks the same in every rendering. ``scale`` is the value drawn at
full colour (see :func:`color_scale`).

>>> cells, scale = token_cells(["<s>", " Hello", " world"], torch.tensor([9.0, 1.0, -0.5]))
>>> scale, cells[1].color, cells[2].color, cells[0].sink
(1.0, (255, 0, 0), (128, 128, 255), True)
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

RGB = tuple[int, int, int]
POSITIVE: RGB = (255, 0, 0)
NEGATIVE: RGB = (0, 0, 255)
NEUTRAL: RGB = (255, 255, 255)
EVICTED: RGB = (215, 215, 215)  # grey: no sign, so it cannot be mistaken for a relevance colour
EVICTED_TEXT: RGB = (110, 110, 110)
FUTURE: RGB = (245, 245, 245)  # matrix cells a generated token could not see

SINK_NOTE = "attention sink, excluded from the colour scale"
EVICTED_NOTE = "evicted from the KV cache: the model no longer saw this token"
#: the one-line legend of every rendering of an Explanation (terminal, HTML, PNG)
LEGEND = "relevance: red supports the target, blue opposes it"
MATRIX_LEGEND = "relevance, each row on its own scale: red supports that row's token, blue opposes it"
#: the one-line legend of every rendering of stacked rows on one scale (an ExplanationDiff's)
STACK_LEGEND = ("relevance, every row on one scale: red supports the target, blue opposes it "
                "(in a difference row: red gained support, blue lost it)")


# ----------------------------------------------------------------------------- colours


def color_scale(values: torch.Tensor, skip_first: bool = True) -> float:
    """The |value| drawn at full colour: the largest finite |value|, leaving out token 0 if asked.

    >>> color_scale(torch.tensor([5.0, -2.0, 1.0])), color_scale(torch.tensor([5.0, -2.0]), False)
    (2.0, 5.0)
    """
    v = values.detach().double().flatten()
    if skip_first and v.numel() > 1:  # a one-token prompt has nothing else to scale by
        v = v[1:]
    v = v[torch.isfinite(v)].abs()
    top = float(v.max()) if v.numel() else 0.0
    return top if top > 0 else 1.0  # all-zero relevance: any scale draws it white


def rgb_array(values: np.ndarray, scale: float) -> np.ndarray:
    """Colours (uint8, shape ``values.shape + (3,)``) of ``values``; the one colour map of lucidlm.

    |value| >= scale is full red/blue; NaN is white.

    >>> rgb_array(np.array([1.0, -0.5, 0.0, np.nan, -0.25]), 1.5).tolist()[1:]
    [[170, 170, 255], [255, 255, 255], [255, 255, 255], [213, 213, 255]]
    """
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    t = np.clip(np.abs(v) / scale, 0.0, 1.0)[..., None]
    end = np.where((v > 0)[..., None], POSITIVE, NEGATIVE)
    # halves round up, as JavaScript's Math.round in static/heatmap.js (np.rint would round them to even)
    return np.floor(np.asarray(NEUTRAL) + (end - np.asarray(NEUTRAL)) * t + 0.5).astype(np.uint8)


def rgb(value: float, scale: float) -> RGB:
    """Colour of one value (see :func:`rgb_array`).

    >>> rgb(2.0, 1.0), rgb(-1.0, 1.0)
    ((255, 0, 0), (0, 0, 255))
    """
    r, g, b = rgb_array(np.array([value]), scale)[0].tolist()
    return r, g, b


def text_rgb(background: RGB) -> RGB:
    """Black or white text, whichever reads better on ``background`` (full blue needs white).

    >>> text_rgb((255, 255, 255)), text_rgb((0, 0, 255))
    ((0, 0, 0), (255, 255, 255))
    """
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b >= 128 else (255, 255, 255)


def hex_color(color: RGB) -> str:
    """``#rrggbb``.

    >>> hex_color((255, 0, 16))
    '#ff0010'
    """
    return "#{:02x}{:02x}{:02x}".format(*color)


def colormap():
    """The matplotlib colormap equal to :func:`rgb_array` (used for colour bars and images)."""
    from matplotlib.colors import LinearSegmentedColormap

    stops = [tuple(c / 255 for c in color) for color in (NEGATIVE, NEUTRAL, POSITIVE)]
    return LinearSegmentedColormap.from_list("lucidlm", stops)


# ----------------------------------------------------------------------------- tokens


def _control_map() -> dict[int, str]:
    # Control characters are drawn as Unicode "control pictures": an ESC inside a token must not
    # reach the terminal as an escape sequence, and none of them has a visible glyph of its own.
    table = {code: chr(0x2400 + code) for code in range(32)}
    table.update({127: "\u2421", **{code: "\ufffd" for code in range(0x80, 0xA0)}})
    table.update({ord("\n"): "\u21b5", ord("\t"): "\u21e5", ord("\r"): "\u240d"})
    return table


_VISIBLE = str.maketrans(_control_map())


def visible(token: str) -> str:
    """How a token is displayed: newline as ↵, tab as ⇥, other control characters as symbols.

    Spaces stay spaces (the coloured background shows them); an empty token shows as ∅.

    >>> visible(" a\\nb\\t"), visible("\\x1b[31m"), visible("")
    (' a↵b⇥', '␛[31m', '∅')
    """
    return token.translate(_VISIBLE) or "\u2205"


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes: wide (CJK) characters count 2, combining marks 0.

    >>> display_width("ab"), display_width("日本"), display_width("e\\u0301")
    (2, 4, 1)
    """
    wide = sum(unicodedata.east_asian_width(ch) in "WF" for ch in text)
    combining = sum(unicodedata.combining(ch) != 0 for ch in text)
    return len(text) + wide - combining


def quoted(token: str) -> str:
    """A token in quotes as JSON (and the JavaScript renderer, ``JSON.stringify``) quote it, so
    a page names a token one way whichever side drew it.

    >>> print(quoted(' cat"'), quoted("a\\nb"))
    " cat\\"" "a\\nb"
    """
    return json.dumps(token, ensure_ascii=False)


def token_name(index: int, token: str) -> str:
    """Position and token as every tooltip names them, e.g. ``#3 " cat"``."""
    return f"#{index} {quoted(token)}"


class Cell(NamedTuple):
    """One token ready to draw."""

    index: int
    token: str  # as given
    text: str  # as displayed (see :func:`visible`)
    value: float
    color: RGB  # background
    evicted: bool
    sink: bool  # token 0 left out of the colour scale
    breaks: int  # line breaks after the token (its newlines)

    @property
    def fg(self) -> RGB:
        """Text colour."""
        return EVICTED_TEXT if self.evicted else text_rgb(self.color)

    @property
    def name(self) -> str:
        """Position and token (:func:`token_name`), e.g. ``#3 " cat"``."""
        return token_name(self.index, self.token)

    def label(self) -> str:
        """Tooltip text: position, token and value, plus what is special about it."""
        notes = [EVICTED_NOTE] * self.evicted + [SINK_NOTE] * self.sink
        return "; ".join([f"{self.name}: {self.value:+.4g}", *notes])


def cell_notes(cells: Sequence[Cell]) -> list[str]:
    """Sentences explaining the marked tokens (sink, evicted), for headers of every rendering."""
    notes = [f"token 0 {quoted(c.token)} ({c.value:+.3g}) is an {SINK_NOTE}" for c in cells if c.sink]
    evicted = sum(c.evicted for c in cells)
    if evicted:
        notes.append(f"{evicted} token(s) evicted from the KV cache (grey, struck through)")
    return notes


def token_cells(
    tokens: Sequence[str],
    values: torch.Tensor,
    evicted: torch.Tensor | None = None,
    skip_first: bool = True,
    scale: float | None = None,
) -> tuple[list[Cell], float]:
    """Cells for a heatmap over ``tokens`` and the colour scale they were coloured with
    (``scale``, or :func:`color_scale` of ``values`` when it is None)."""
    values = values.detach().double().flatten()
    scale = color_scale(values, skip_first) if scale is None else scale
    colors = rgb_array(values.numpy(), scale).tolist()
    gone = [False] * len(tokens) if evicted is None else [bool(e) for e in evicted.tolist()]
    cells = [
        Cell(i, tok, visible(tok), float(v), EVICTED if out else tuple(c), out,
             skip_first and i == 0 and len(tokens) > 1, tok.count("\n"))
        for i, (tok, v, c, out) in enumerate(zip(tokens, values.tolist(), colors, gone))
    ]
    return cells, scale


class Row(NamedTuple):
    """One labelled row of a stack drawn on one colour scale (see :func:`stacked_cells`)."""

    key: str  # what the row is, for scripts and tests: "base", "tuned", "difference", "adapter"
    label: str  # what a reader sees, e.g. "tuned (logit 15.1)"
    cells: list[Cell]


def stacked_cells(tokens: Sequence[str], rows: Sequence[tuple[str, str, torch.Tensor]],
                  evicted: torch.Tensor | None = None, skip_first: bool = True) -> tuple[list[Row], float]:
    """Rows ``(key, label, values)`` of values over the same ``tokens``, coloured on ONE scale (the
    largest finite |value| of any row, token 0 of each left out with ``skip_first``), so that a
    colour means the same number in every row.

    >>> rows, scale = stacked_cells(["<s>", " a", " b"], [("x", "x", torch.tensor([9.0, 1.0, 0.5])),
    ...                                                   ("y", "y", torch.tensor([0.0, -2.0, 0.0]))])
    >>> scale, rows[0].cells[1].color, rows[1].cells[1].color
    (2.0, (255, 128, 128), (0, 0, 255))
    """
    kept = [values.detach().double().flatten() for _, _, values in rows]
    if skip_first:
        kept = [v[1:] if v.numel() > 1 else v for v in kept]
    scale = color_scale(torch.cat(kept) if kept else torch.zeros(0), skip_first=False)
    return [Row(key, label, token_cells(tokens, values, evicted, skip_first, scale)[0])
            for key, label, values in rows], scale


def stack_notes(rows: Sequence[Row]) -> list[str]:
    """The header sentences of a stack: token 0 as a sink (once, its values differ by row) and the
    evicted tokens of each row that has any."""
    sink = next((c for row in rows for c in row.cells if c.sink), None)
    notes = [f"token 0 {quoted(sink.token)} is an {SINK_NOTE}"] if sink else []
    for row in rows:
        evicted = sum(c.evicted for c in row.cells)
        if evicted:
            notes.append(f"{row.label}: {evicted} token(s) evicted from the KV cache (grey, struck through)")
    return notes


def layout(widths: Sequence[int], breaks: Sequence[int], width: int) -> list[tuple[int, int]]:
    """Greedy wrap of items ``widths`` wide into lines ``width`` wide: ``(line, column)`` per item.

    ``breaks[i]`` forced line breaks follow item i (its newlines). An item wider than a line gets
    a line of its own.

    >>> layout([3, 3, 3], [0, 1, 0], 7)
    [(0, 0), (0, 3), (1, 0)]
    >>> layout([3, 3, 3], [0, 0, 0], 5)
    [(0, 0), (1, 0), (2, 0)]
    """
    line, col, out = 0, 0, []
    for w, n in zip(widths, breaks):
        if col and col + w > width:
            line, col = line + 1, 0
        out.append((line, col))
        col += w
        if n:
            line, col = line + n, 0
    return out
