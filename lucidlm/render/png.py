"""Explanations as PNG: matplotlib figures drawn by the Agg canvas, outside pyplot.

matplotlib is imported inside these functions only: importing lucidlm must stay cheap, and we never
touch pyplot's global state or the user's interactive backend. Every PNG is :data:`DPI` dots per
inch; files are written by :func:`lucidlm.fileio.atomic_write`, never here.

>>> fig = new_figure(2.0, 1.0)
>>> figure_png(fig)[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
True
"""

from __future__ import annotations

import contextlib
import io
import math
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .cells import EVICTED_TEXT, FUTURE, LEGEND, MATRIX_LEGEND, STACK_LEGEND, Cell, Row, cell_notes, color_scale, \
    colormap, display_width, layout, stack_notes, visible

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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
    """Tokens as a PNG figure: the title and the notes on marked tokens (``fig.texts[0]``), the
    tokens as coloured boxes wrapped like text at ``columns``, a colour bar (ticks at ±``scale``
    and 0) and the one-line ``legend`` (``fig.texts[1]``).

    The figure is as wide as the longest wrapped line, or as the title or legend if wider: a short
    prompt gives a small image, not ``columns`` of blank space.
    """
    return _blocks_figure([Row("", "", list(cells))], scale, title, cell_notes(cells), columns, legend)


def rows_figure(rows: Sequence[Row], scale: float, title: str, columns: int = 80,
                legend: str = STACK_LEGEND) -> Figure:
    """Rows on one colour scale (:func:`~lucidlm.render.cells.stacked_cells`, e.g. a diff's base,
    tuned and difference) as a PNG figure: the title and notes (``fig.texts[0]``), each row's label
    (``fig.texts[2:]``, in order) over its tokens wrapped at ``columns``, one colour bar and the
    ``legend`` (``fig.texts[1]``)."""
    return _blocks_figure(rows, scale, title, stack_notes(rows), columns, legend)


def _blocks_figure(rows: Sequence[Row], scale: float, title: str, notes: Sequence[str], columns: int,
                   legend: str) -> Figure:
    """Title and notes, then per row its label (none when empty) and its tokens, then the colour bar
    and legend: the drawing behind :func:`tokens_figure` and :func:`rows_figure`."""
    widths = [display_width(c.text) for c in rows[0].cells] if rows else []
    places = layout(widths, [c.breaks for c in rows[0].cells] if rows else [], columns)
    lines = (places[-1][0] + 1) if places else 1
    used = max([col + w for (_, col), w in zip(places, widths)], default=0) or 1
    fig = new_figure(1.0, 1.0)
    first = title.split("\n")[0]
    notes = title.split("\n")[1:] + list(notes)
    head = fig.text(0, 1, first, ha="left", va="top", fontsize=10, parse_math=False)
    foot = fig.text(0, 0, legend, ha="left", va="bottom", fontsize=9, parse_math=False)
    labels = [fig.text(0, 0, row.label, ha="left", va="bottom", fontsize=9, fontweight="bold", parse_math=False)
              if row.label else None for row in rows]
    label_sizes = [text_size(fig, t) if t is not None else (0.0, 0.0) for t in labels]
    text_w, text_h = used * CHAR_W, lines * LINE_H
    fit = max(text_w, text_size(fig, head)[0], text_size(fig, foot)[0], BAR_W + 0.3,
              *(w for w, _ in label_sizes))
    if notes:  # the notes under the title wrap to the width the rest needs, never widen it
        head.set_text("\n".join([first, *(_wrap(fig, head, note, fit) for note in notes)]))
    (head_w, head_h), (foot_w, foot_h) = text_size(fig, head), text_size(fig, foot)
    # Inches from the bottom: legend, the bar's tick labels, the bar, the rows (last first), the title.
    bar_y = MARGIN + foot_h + 0.28
    y, row_y = bar_y + BAR_H + 0.2, []
    for k, (_, label_h) in reversed(list(enumerate(label_sizes))):
        row_y.insert(0, y)
        y += text_h + (label_h + 0.04 if labels[k] is not None else 0.0) + (0.12 if k else 0.0)
    width = 2 * MARGIN + max(text_w, head_w, foot_w, BAR_W + 0.3, *(w for w, _ in label_sizes))
    height = y + 0.12 + head_h + MARGIN
    fig.set_size_inches(width, height)
    head.set_position((MARGIN / width, 1 - MARGIN / height))
    foot.set_position((MARGIN / width, MARGIN / height))
    for row, label, text_y in zip(rows, labels, row_y):
        if label is not None:
            label.set_position((MARGIN / width, (text_y + text_h + 0.04) / height))
        ax = fig.add_axes((MARGIN / width, text_y / height, text_w / width, text_h / height))
        _draw_cells(ax, row.cells, widths, places, used, lines)
    add_colorbar(fig, ((MARGIN + 0.15) / width, bar_y / height, BAR_W / width, BAR_H / height),
                 scale)
    return fig


def _draw_cells(ax, cells: Sequence[Cell], widths: Sequence[int], places: Sequence[tuple[int, int]], used: int,
                lines: int) -> None:
    """Tokens as coloured boxes at their ``places`` (line, column) on ``ax``, which spans ``used``
    columns and ``lines`` lines."""
    from matplotlib.patches import Rectangle

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


def matrix_figure(colors: np.ndarray, xlabels: Sequence[str], ylabels: Sequence[str],
                  title: str, legend: str = MATRIX_LEGEND) -> Figure:
    """A matrix as a PNG figure: the title (``fig.texts[0]``), a pre-coloured
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


def image_figure(relevance: np.ndarray, image: np.ndarray | None, overlay: bool,
                 title: str) -> Figure:
    """Pixel relevance ``(H, W)`` as a heatmap symmetric around 0, over or beside ``image``
    ``(H, W, 3)`` (``overlay``: opacity follows |relevance|), with a colour bar."""
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




def row_colors(rows: Sequence[Sequence[Cell]], columns: int) -> np.ndarray:
    """The (rows, columns, 3) uint8 colours of a matrix whose row i is drawn by ``rows[i]`` (its
    first cells); the cells a row lacks (tokens after it) are :data:`~lucidlm.render.cells.FUTURE`.

    >>> from lucidlm.render.cells import token_cells
    >>> row_colors([token_cells(["a"], torch.tensor([1.0]))[0]], 2).tolist()
    [[[255, 0, 0], [245, 245, 245]]]
    """
    colors = np.full((len(rows), columns, 3), FUTURE, dtype=np.uint8)
    for i, cells in enumerate(rows):
        colors[i, : len(cells)] = [c.color for c in cells]
    return colors
