"""Explanations as terminal text: 24-bit ANSI colours, or plain text with values in brackets.

>>> import torch
>>> from lucidlm.render.cells import token_cells
>>> cells, scale = token_cells(["<s>", " Hi", " there"], torch.tensor([3.0, 0.5, -1.0]))
>>> print(heatmap(cells, scale, "target '!'", width=40, color=False))
target '!'
token 0 "<s>" (+3) is an attention sink, excluded from the colour scale
<s>[+3 sink] Hi[+0.5] there[-1]
colour scale ±1 · relevance: red supports the target, blue opposes it
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence

import numpy as np

from .cells import LEGEND, RGB, STACK_LEGEND, Cell, Row, cell_notes, display_width, layout, rgb_array, stack_notes, \
    visible

RESET = "\x1b[0m"


def color_stdout() -> bool:
    """Whether text printed to stdout should be coloured: stdout is a terminal, and NO_COLOR
    (https://no-color.org) is unset or empty."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return bool(sys.stdout is not None and sys.stdout.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


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


def heatmap(cells: Sequence[Cell], scale: float, title: str, width: int | None = None,
            color: bool | None = None) -> str:
    """An explanation's terminal rendering: ``title`` and the notes on marked tokens, the tokens
    wrapped at ``width`` (default: the terminal's), the colour bar. ``color=None`` colours only
    when :func:`color_stdout` says so."""
    color = color_stdout() if color is None else color
    width = width or shutil.get_terminal_size((100, 24)).columns
    header = "\n".join([title, *cell_notes(cells)])
    return "\n".join([header, terminal_text(cells, width, color), terminal_legend(scale, color)])


def stack(rows: Sequence[Row], scale: float, title: str, width: int | None = None, color: bool | None = None,
          legend: str = STACK_LEGEND) -> str:
    """Rows on one colour scale (:func:`~lucidlm.render.cells.stacked_cells`): ``title`` and the
    notes, then each row's label and its tokens wrapped at ``width``, then one colour bar.
    ``color=None`` colours only when :func:`color_stdout` says so.

    >>> import torch
    >>> from lucidlm.render.cells import stacked_cells
    >>> rows, scale = stacked_cells(["a", " b"], [("x", "first", torch.tensor([1.0, -1.0])),
    ...                                           ("y", "second", torch.tensor([0.5, 2.0]))], skip_first=False)
    >>> print(stack(rows, scale, "two rows", width=40, color=False))
    two rows
    first:
    a[+1] b[-1]
    second:
    a[+0.5] b[+2]
    colour scale ±2 · relevance, every row on one scale: red supports the target, blue opposes it (in a difference row: red gained support, blue lost it)
    """
    color = color_stdout() if color is None else color
    width = width or shutil.get_terminal_size((100, 24)).columns
    lines = [title, *stack_notes(rows)]
    for row in rows:
        lines += [f"{row.label}:", terminal_text(row.cells, width, color)]
    return "\n".join([*lines, terminal_legend(scale, color, note=legend)])


def top_tokens(title: str, rows: Sequence[tuple[str, Sequence[Cell], Sequence[tuple[int, str, float]]]],
               color: bool | None = None) -> str:
    """One line per row ``(target, cells, top)``: the row's number, its target and its ``top``
    tokens ``(index, token, value)``, each coloured as in ``cells`` (the compact view of a
    generation)."""
    color = color_stdout() if color is None else color
    lines = [title]
    for i, (target, cells, top) in enumerate(rows):
        tops = [terminal_cell(cells[j], color) + f"({v:+.3g})" * color for j, _, v in top]
        lines.append(f"{i:>4} {visible(target)!r:<16} ← " + "  ".join(tops))
    return "\n".join(lines)
