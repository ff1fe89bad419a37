"""Rendering helpers behind every explanation: colours, token display, ANSI, HTML, PNG, file writes.

One colour map is used everywhere (terminal, HTML, PNG): a linear blend from blue (negative)
through white (zero) to red (positive), the same as matplotlib's ``bwr``, so a value looks the
same in every rendering. ``scale`` is the value drawn at full colour (see :func:`color_scale`).

matplotlib is imported inside the PNG functions only: importing lucidlm must stay cheap, and we
never touch pyplot's global state or the user's interactive backend (figures are drawn with the
Agg canvas directly).

>>> cells, scale = token_cells(["<s>", " Hello", " world"], torch.tensor([9.0, 1.0, -0.5]))
>>> scale, cells[1].color, cells[2].color, cells[0].sink
(1.0, (255, 0, 0), (128, 128, 255), True)
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import textwrap
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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

    >>> rgb_array(np.array([1.0, -0.5, 0.0, np.nan]), 1.0).tolist()
    [[255, 0, 0], [128, 128, 255], [255, 255, 255], [255, 255, 255]]
    """
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    t = np.clip(np.abs(v) / scale, 0.0, 1.0)[..., None]
    end = np.where((v > 0)[..., None], POSITIVE, NEGATIVE)
    return np.rint(np.asarray(NEUTRAL) + (end - np.asarray(NEUTRAL)) * t).astype(np.uint8)


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
        """Position and token, e.g. ``#3 ' cat'``."""
        return f"#{self.index} {self.token!r}"

    def label(self) -> str:
        """Tooltip text: position, token and value, plus what is special about it."""
        notes = [EVICTED_NOTE] * self.evicted + [SINK_NOTE] * self.sink
        return "; ".join([f"{self.name}: {self.value:+.4g}", *notes])


def cell_notes(cells: Sequence[Cell]) -> list[str]:
    """Sentences explaining the marked tokens (sink, evicted), for headers of every rendering."""
    notes = [f"token 0 {c.token!r} ({c.value:+.3g}) is an {SINK_NOTE}" for c in cells if c.sink]
    evicted = sum(c.evicted for c in cells)
    if evicted:
        notes.append(f"{evicted} token(s) evicted from the KV cache (grey, struck through)")
    return notes


def token_cells(
    tokens: Sequence[str],
    values: torch.Tensor,
    evicted: torch.Tensor | None = None,
    skip_first: bool = True,
) -> tuple[list[Cell], float]:
    """Cells for a heatmap over ``tokens`` and the colour scale they were coloured with."""
    values = values.detach().double().flatten()
    scale = color_scale(values, skip_first)
    colors = rgb_array(values.numpy(), scale).tolist()
    gone = [False] * len(tokens) if evicted is None else [bool(e) for e in evicted.tolist()]
    cells = [
        Cell(i, tok, visible(tok), float(v), EVICTED if out else tuple(c), out,
             skip_first and i == 0 and len(tokens) > 1, tok.count("\n"))
        for i, (tok, v, c, out) in enumerate(zip(tokens, values.tolist(), colors, gone))
    ]
    return cells, scale


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


# ----------------------------------------------------------------------------- terminal

RESET = "\x1b[0m"


def ansi(text: str, background: RGB, foreground: RGB, *, strike: bool = False,
         underline: bool = False) -> str:
    """``text`` with a 24-bit background/foreground colour (and strike-through/underline).

    >>> ansi("a", (255, 0, 0), (0, 0, 0))
    '\\x1b[48;2;255;0;0m\\x1b[38;2;0;0;0ma\\x1b[0m'
    """
    style = "\x1b[9m" * strike + "\x1b[4m" * underline
    bg, fg = ";".join(map(str, background)), ";".join(map(str, foreground))
    return f"{style}\x1b[48;2;{bg}m\x1b[38;2;{fg}m{text}{RESET}"


def terminal_cell(cell: Cell, color: bool) -> str:
    """One token for the terminal: coloured, or plain text with its value in brackets."""
    if color:
        return ansi(cell.text, cell.color, cell.fg, strike=cell.evicted, underline=cell.sink)
    note = "evicted" if cell.evicted else f"{cell.value:+.3g}" + " sink" * cell.sink
    return f"~{cell.text}~[{note}]" if cell.evicted else f"{cell.text}[{note}]"


def terminal_text(cells: Sequence[Cell], width: int, color: bool) -> str:
    """Tokens wrapped into lines at most ``width`` columns wide (tokens keep their own spaces)."""
    pieces = [terminal_cell(c, color) for c in cells]
    widths = [display_width(c.text) if color else display_width(p) for c, p in zip(cells, pieces)]
    lines: list[str] = [""]
    for piece, (line, _) in zip(pieces, layout(widths, [c.breaks for c in cells], width)):
        lines.extend([""] * (line + 1 - len(lines)))
        lines[line] += piece
    return "\n".join(lines)


def terminal_legend(scale: float, color: bool, steps: int = 21, note: str = LEGEND) -> str:
    """``-s ▕bar▏ +s  note``: the colour bar of a terminal rendering, and its one-line legend.

    >>> terminal_legend(2.5, color=False)
    'colour scale ±2.5 · relevance: red supports the target, blue opposes it'
    """
    if not color:
        return f"colour scale ±{scale:.3g} · {note}"
    stops = rgb_array(np.linspace(-scale, scale, steps), scale).tolist()
    bar = "".join(ansi(" ", tuple(c), (0, 0, 0)) for c in stops)
    return f"{-scale:+.3g} {bar} {scale:+.3g}  {note}"


# ----------------------------------------------------------------------------- HTML

CSS = """
.lucidlm{font-family:system-ui,sans-serif;line-height:1.9;max-width:60em}
.lucidlm-head{margin-bottom:.4em}
.lucidlm-text{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;
 word-break:break-word;border:1px solid #ddd;padding:.5em;border-radius:4px}
.lucidlm-tok{border-radius:3px;padding:.1em 0;box-shadow:inset 0 0 0 .5px #e0e0e0}
.lucidlm-evicted{background:#d7d7d7!important;color:#6e6e6e!important;text-decoration:line-through}
.lucidlm-sink{outline:1.5px dashed #555;outline-offset:-1px}
.lucidlm-future{opacity:.35}
.lucidlm-current{outline:2px solid #000}
.lucidlm-gen{cursor:pointer;font-weight:bold}
.lucidlm-legend{display:flex;align-items:center;gap:.5em;margin-top:.5em;font-size:.85em}
.lucidlm-bar{width:16em;height:.9em;border:1px solid #999;
 background:linear-gradient(to right,%(neg)s,%(mid)s,%(pos)s)}
.lucidlm img{max-width:100%%}
""" % {"neg": hex_color(NEGATIVE), "mid": hex_color(NEUTRAL), "pos": hex_color(POSITIVE)}


def esc(text: str) -> str:
    """HTML-escape text and attribute values.

    >>> esc('<script>"')
    '&lt;script&gt;&quot;'
    """
    return html.escape(text, quote=True)


def html_cell(cell: Cell, extra: dict[str, str] | None = None) -> str:
    """One ``<span>`` with the token's colour, a tooltip, and a ``<br>`` per newline.

    ``extra`` adds attributes; its ``class`` is appended to the token's own classes.
    """
    extra = dict(extra or {})
    classes = " ".join(["lucidlm-tok"] + ["lucidlm-evicted"] * cell.evicted
                       + ["lucidlm-sink"] * cell.sink + [extra.pop("class", "")]).strip()
    style = f"background:{hex_color(cell.color)};color:{hex_color(cell.fg)}"
    attrs = {"class": classes, "style": style, "title": cell.label(), **extra}
    rendered = "".join(f' {k}="{esc(v)}"' for k, v in attrs.items())
    return f"<span{rendered}>{esc(cell.text)}</span>" + "<br>" * cell.breaks


def html_cells(cells: Sequence[Cell], extra: Callable[[Cell], dict[str, str]] | None = None) -> str:
    """The spans of all cells inside the monospace text box; ``extra`` adds per-cell attributes."""
    spans = "".join(html_cell(c, extra(c) if extra else None) for c in cells)
    return f'<div class="lucidlm-text">{spans}</div>'


def html_legend(scale: float, note: str = LEGEND) -> str:
    """The colour bar from ``-scale`` to ``+scale`` and its one-line legend ``note``."""
    return (f'<div class="lucidlm-legend"><span>{-scale:+.3g}</span><span class="lucidlm-bar">'
            f"</span><span>{scale:+.3g}</span><span>{esc(note)}</span></div>")


def html_json(data: object) -> str:
    """JSON safe inside ``<script type="application/json">`` ("</script>" cannot end it early)."""
    return json.dumps(data, ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")


def html_document(body: str, title: str, full_page: bool = True) -> str:
    """Wrap ``body`` with the inline stylesheet: a whole page, or a fragment for Jupyter."""
    fragment = f"<style>{CSS}</style>\n<div class=\"lucidlm\">{body}</div>"
    if not full_page:
        return fragment
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"</head><body>\n{fragment}\n</body></html>\n")


def png_data_uri(png: bytes) -> str:
    """``data:`` URI of a PNG, so pages embed images without files or network."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ----------------------------------------------------------------------------- PNG

DPI = 150  # every PNG (the pHYs chunk says so, and the pixels are there to back it)
FONT = {"family": "DejaVu Sans Mono", "size": 11}  # ships with matplotlib; monospace => no measuring
CHAR_W, LINE_H = 0.0085 * FONT["size"], 0.024 * FONT["size"]  # inches per column / per line
MARGIN = 0.12  # inches around the drawing
BAR_W, BAR_H = 2.4, 0.14  # the colour bar, inches


def new_figure(width: float, height: float) -> Figure:
    """A figure drawn by the Agg canvas, outside pyplot (no global state, any backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


@contextlib.contextmanager
def _quiet_glyphs() -> Iterator[None]:
    """Silence "Glyph ... missing from font": a token in a script the font lacks draws as boxes,
    which is expected and no reason to warn on every rendering."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        yield


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes at :data:`DPI` (written to disk by
    :func:`lucidlm.fileio.atomic_write`, never directly)."""
    buf = io.BytesIO()
    with _quiet_glyphs():
        # "tight" grows the canvas to every label and title, so long ones are never cut off.
        fig.savefig(buf, format="png", dpi=DPI, facecolor="white", bbox_inches="tight",
                    pad_inches=0.15)
    return buf.getvalue()


def text_size(fig: Figure, text) -> tuple[float, float]:
    """Width and height in inches of a text artist of ``fig``, as drawn."""
    with _quiet_glyphs():
        box = text.get_window_extent(fig.canvas.get_renderer())
    return box.width / fig.dpi, box.height / fig.dpi


def _wrap(fig: Figure, artist, line: str, width: float) -> str:
    """``line`` wrapped at spaces to lines about ``width`` inches wide in ``artist``'s font."""
    artist.set_text(line)
    drawn = text_size(fig, artist)[0]
    if drawn <= width:
        return line
    chars = max(20, int(len(line) * width / drawn))
    return "\n".join(textwrap.wrap(line, chars, break_long_words=False, break_on_hyphens=False))


def add_colorbar(fig: Figure, rect: Sequence[float], scale: float, label: str = "",
                 tick_labels: Sequence[str] | None = None) -> None:
    """A horizontal colour bar from ``-scale`` to ``+scale`` in the figure region ``rect``, with
    ticks at ``-scale``, 0 and ``+scale`` (labelled with the values, or ``tick_labels``)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(Normalize(-scale, scale), colormap())
    bar = fig.colorbar(mappable, cax=fig.add_axes(rect), orientation="horizontal")
    labels = tick_labels or [f"{-scale:+.3g}".replace("-", "\u2212"), "0", f"{scale:+.3g}"]
    bar.set_ticks([-scale, 0.0, scale], labels=list(labels), fontsize=8)
    bar.ax.minorticks_off()
    if label:
        bar.set_label(label, fontsize=9)


def tokens_figure(cells: Sequence[Cell], scale: float, title: str, columns: int = 80,
                  legend: str = LEGEND) -> Figure:
    """The figure behind :func:`tokens_png`: the title (``fig.texts[0]``), the tokens as coloured
    boxes wrapped like text at ``columns``, a colour bar (ticks at ±``scale`` and 0) and the
    one-line ``legend`` (``fig.texts[1]``).

    The figure is as wide as the longest wrapped line, or as the title or legend if wider: a short
    prompt gives a small image, not ``columns`` of blank space.
    """
    from matplotlib.patches import Rectangle

    widths = [display_width(c.text) for c in cells]
    places = layout(widths, [c.breaks for c in cells], columns)
    lines = (places[-1][0] + 1) if places else 1
    used = max([col + w for (_, col), w in zip(places, widths)], default=0) or 1
    fig = new_figure(1.0, 1.0)
    first, *notes = title.split("\n")
    head = fig.text(0, 1, first, ha="left", va="top", fontsize=10, parse_math=False)
    foot = fig.text(0, 0, legend, ha="left", va="bottom", fontsize=9, parse_math=False)
    text_w, text_h = used * CHAR_W, lines * LINE_H
    fit = max(text_w, text_size(fig, head)[0], text_size(fig, foot)[0], BAR_W + 0.3)
    if notes:  # the notes under the title wrap to the width the rest needs, never widen it
        head.set_text("\n".join([first, *(_wrap(fig, head, note, fit) for note in notes)]))
    (head_w, head_h), (foot_w, foot_h) = text_size(fig, head), text_size(fig, foot)
    # Inches from the bottom: legend, the bar's tick labels, the bar, the tokens, the title.
    bar_y = MARGIN + foot_h + 0.28
    text_y = bar_y + BAR_H + 0.2
    width = 2 * MARGIN + max(text_w, head_w, foot_w, BAR_W + 0.3)
    height = text_y + text_h + 0.12 + head_h + MARGIN
    fig.set_size_inches(width, height)
    head.set_position((MARGIN / width, 1 - MARGIN / height))
    foot.set_position((MARGIN / width, MARGIN / height))
    ax = fig.add_axes((MARGIN / width, text_y / height, text_w / width, text_h / height))
    ax.set_xlim(0, used)
    ax.set_ylim(lines, 0)
    ax.set_axis_off()
    for cell, w, (line, col) in zip(cells, widths, places):
        ax.add_patch(Rectangle((col, line + 0.1), w, 0.8, facecolor=np.divide(cell.color, 255),
                               edgecolor="0.3" if cell.sink else "0.85",
                               linestyle="--" if cell.sink else "-", linewidth=0.6,
                               hatch="//" if cell.evicted else None))
        ax.text(col, line + 0.5, cell.text, fontdict=FONT, va="center", ha="left",
                color=np.divide(cell.fg, 255), parse_math=False)
        if cell.evicted:  # strike-through, as in the terminal and HTML
            ax.plot([col, col + w], [line + 0.5] * 2, color=np.divide(EVICTED_TEXT, 255), lw=1)
    add_colorbar(fig, ((MARGIN + 0.15) / width, bar_y / height, BAR_W / width, BAR_H / height),
                 scale)
    return fig


def tokens_png(cells: Sequence[Cell], scale: float, title: str, columns: int = 80,
               legend: str = LEGEND) -> bytes:
    """Tokens as coloured boxes wrapped like text, a title, a colour bar and a legend (see
    :func:`tokens_figure`)."""
    return figure_png(tokens_figure(cells, scale, title, columns, legend))


def matrix_figure(colors: np.ndarray, xlabels: Sequence[str], ylabels: Sequence[str],
                  title: str, legend: str = MATRIX_LEGEND) -> Figure:
    """The figure behind :func:`matrix_png`: the title (``fig.texts[0]``), a pre-coloured
    (rows, cols, 3) uint8 matrix with token labels, a colour bar (each row on its own scale, so
    ticks at ±"row max" and 0) and the one-line ``legend`` (``fig.texts[1]``)."""
    rows, cols = colors.shape[:2]
    # Inches per cell: room for a label each, until the figure would pass ~14 x 12 inches (beyond
    # that labels are thinned anyway and a huge canvas only costs time and memory).
    cell = min(0.22, 12.0 / max(cols, 1), 9.5 / max(rows, 1))
    fig = new_figure(1.0, 1.0)
    head = fig.text(0.5, 1, title, ha="center", va="top", fontsize=10, parse_math=False)
    foot = fig.text(0.5, 0, legend, ha="center", va="bottom", fontsize=9, parse_math=False)
    (head_w, head_h), (foot_w, foot_h) = text_size(fig, head), text_size(fig, foot)
    labels = {}
    for axis, names in (("x", xlabels), ("y", ylabels)):
        step = max(1, math.ceil(len(names) / 60))  # thin the labels of long sequences
        labels[axis] = (range(0, len(names), step), [visible(t) for t in names[::step]])
    # 7-point monospace labels: ~0.06 inches a character (x labels are rotated, so vertical).
    x_room = 0.1 + 0.06 * max([display_width(t) for t in labels["x"][1]], default=1)
    y_room = 0.1 + 0.06 * max([display_width(t) for t in labels["y"][1]], default=1)
    grid_w, grid_h = cols * cell, rows * cell
    bar_y = MARGIN + foot_h + 0.28
    grid_y = bar_y + BAR_H + 0.12 + x_room
    width = 2 * MARGIN + max(y_room + grid_w, head_w, foot_w, BAR_W + 0.3)
    height = grid_y + grid_h + 0.15 + head_h + MARGIN
    fig.set_size_inches(width, height)
    head.set_position((0.5, 1 - MARGIN / height))
    foot.set_position((0.5, MARGIN / height))
    left = max(MARGIN + y_room, (width - grid_w) / 2)  # centred when the texts are wider
    ax = fig.add_axes((left / width, grid_y / height, grid_w / width, grid_h / height))
    ax.imshow(colors, aspect="auto", interpolation="nearest")
    for setter, (ticks, names) in ((ax.set_xticks, labels["x"]), (ax.set_yticks, labels["y"])):
        setter(ticks, names, fontsize=7, fontfamily="DejaVu Sans Mono")
    ax.tick_params(axis="x", rotation=90)
    add_colorbar(fig, ((width - BAR_W) / 2 / width, bar_y / height, BAR_W / width, BAR_H / height),
                 1.0, tick_labels=["\u2212row max", "0", "+row max"])
    return fig


def matrix_png(colors: np.ndarray, xlabels: Sequence[str], ylabels: Sequence[str],
               title: str, legend: str = MATRIX_LEGEND) -> bytes:
    """A pre-coloured (rows, cols, 3) uint8 matrix with token labels (see :func:`matrix_figure`)."""
    return figure_png(matrix_figure(colors, xlabels, ylabels, title, legend))


def image_figure(relevance: np.ndarray, image: np.ndarray | None, overlay: bool,
                 title: str) -> Figure:
    """The figure behind :func:`image_png`."""
    scale = color_scale(torch.from_numpy(relevance), skip_first=False)
    panels = 1 if image is None or overlay else 2
    fig = new_figure(4.0 * panels, 4.6)
    fig.suptitle(title, fontsize=10)
    axes = [fig.add_axes((0.05 + i / panels, 0.22, 0.9 / panels, 0.68)) for i in range(panels)]
    heat = {"cmap": colormap(), "vmin": -scale, "vmax": scale, "interpolation": "nearest"}
    if image is not None:
        axes[0].imshow(image, interpolation="nearest")
    if image is not None and overlay:  # opacity follows |r|: irrelevant pixels show the image
        alpha = np.clip(np.abs(relevance) / scale, 0, 1) * 0.85
        axes[0].imshow(relevance, alpha=alpha, **heat)
    else:
        axes[-1].imshow(relevance, **heat)
    for ax in axes:
        ax.set_axis_off()
    add_colorbar(fig, (0.2, 0.1, 0.6, 0.035), scale, LEGEND)
    return fig


def image_png(relevance: np.ndarray, image: np.ndarray | None, overlay: bool, title: str) -> bytes:
    """Pixel relevance ``(H, W)`` as a heatmap symmetric around 0, over or beside ``(H, W, 3)``."""
    return figure_png(image_figure(relevance, image, overlay, title))
