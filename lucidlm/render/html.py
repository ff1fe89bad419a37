"""Explanations as self-contained HTML: inline CSS and JavaScript, images as ``data:`` URIs, nothing
fetched from the network. Also the one escaping of JSON inside ``<script>`` (:func:`script_json`)
and the one JavaScript renderer (:func:`heatmap_js`), which the viewer page inlines too.

>>> from lucidlm.render.cells import token_cells
>>> import torch
>>> cells, scale = token_cells(["<s>", " a<b"], torch.tensor([2.0, -1.0]))
>>> page = heatmap_page(cells, scale, "target 'x'", "lucidlm: x")
>>> page.startswith("<!DOCTYPE html>"), " a&lt;b</span>" in page, "<script" in page
(True, True, False)
"""

from __future__ import annotations

import base64
import html
import json
import uuid
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from .cells import LEGEND, MATRIX_LEGEND, NEGATIVE, NEUTRAL, POSITIVE, STACK_LEGEND, Cell, Row, cell_notes, \
    hex_color, stack_notes

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
.lucidlm-row{margin-top:.4em}
.lucidlm-label{font-size:.9em;font-weight:600}
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


def script_json(data: Any) -> str:
    """Strict JSON safe inside a ``<script type="application/json">`` element: every ``<`` is
    written ``\\u003c``, so neither ``</script>`` nor ``<!--`` in the data can end the element or
    switch the HTML parser's state; ``JSON.parse`` reads it back unchanged. The one rule for JSON
    in a page (the HTML export and the viewer).

    >>> script_json({"token": "</script><!--"})
    '{"token": "\\\\u003c/script>\\\\u003c!--"}'
    """
    return json.dumps(data, ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")


def inline_script(source: str, name: str) -> str:
    """``source`` checked for ``</script``, which would end its inline element early."""
    if "</script" in source.lower():
        raise RuntimeError(f"{name} contains '</script', which would end its inline element")
    return source


@cache
def heatmap_js() -> str:
    """``static/heatmap.js``, the one JavaScript renderer (read once per process): it defines
    ``lucidlmHeatmap`` (colours, cells, painting, the generation page)."""
    path = Path(__file__).with_name("static") / "heatmap.js"
    return inline_script(path.read_text(encoding="utf-8"), path.name)


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


# ----------------------------------------------------------------------------- pages


def heatmap_page(cells: Sequence[Cell], scale: float, title: str, page_title: str,
                 full_page: bool = True) -> str:
    """An explanation's page: ``title`` and the notes on marked tokens, the tokens with their
    values as tooltips, the colour bar. Static HTML: it needs no script."""
    head = "".join(f"<div>{esc(line)}</div>" for line in [title, *cell_notes(cells)])
    body = f'<div class="lucidlm-head">{head}</div>{html_cells(cells)}{html_legend(scale, LEGEND)}'
    return html_document(body, page_title, full_page)


def stack_page(rows: Sequence[Row], scale: float, title: str, page_title: str, full_page: bool = True,
               legend: str = STACK_LEGEND) -> str:
    """Rows on one colour scale (:func:`~lucidlm.render.cells.stacked_cells`, e.g. a diff's base,
    tuned and difference): ``title`` and the notes, each row's label over its tokens (a
    ``div.lucidlm-row[data-row=KEY]``), one colour bar. Static HTML: it needs no script."""
    head = "".join(f"<div>{esc(line)}</div>" for line in [title, *stack_notes(rows)])
    body = "".join(f'<div class="lucidlm-row" data-row="{esc(row.key)}"><div class="lucidlm-label">'
                   f"{esc(row.label)}</div>{html_cells(row.cells)}</div>" for row in rows)
    return html_document(f'<div class="lucidlm-head">{head}</div>{body}{html_legend(scale, legend)}', page_title,
                         full_page)


GENERATION_INFO = "Hover a bold (generated) token to see what it relied on; click to pin. Showing the last one."


def generation_page(cells: Sequence[Cell], scale: float, n_prompt: int, data: dict[str, Any], title: str,
                    page_title: str, skip_first: bool = True, full_page: bool = True) -> str:
    """A generation's interactive page: ``cells`` (every token, coloured by the last generated
    token's row, which is the one shown without JavaScript), the generated ones (from
    ``n_prompt`` on) to hover or click; ``data``, the generation's wire form, is what
    :func:`heatmap_js` recolours the tokens from."""
    root = f"lucidlm-{uuid.uuid4().hex[:12]}"  # unique: several outputs share a notebook page

    def generated(cell: Cell) -> dict[str, str]:
        if cell.index < n_prompt:
            return {}
        current = " lucidlm-current" if cell.index == len(cells) - 1 else ""
        return {"class": "lucidlm-gen" + current, "data-g": str(cell.index - n_prompt)}

    body = (f'<div id="{root}" data-skip-first="{int(skip_first)}"><div class="lucidlm-head">'
            f'<div>{esc(title)}</div><div class="lucidlm-info">{esc(GENERATION_INFO)}</div></div>'
            + html_cells(cells, generated) + html_legend(scale, MATRIX_LEGEND)
            + f'<script type="application/json" class="lucidlm-data">{script_json(data)}</script>'
            + f"<script>{heatmap_js()}\nlucidlmHeatmap.generationPage(document.getElementById({root!r}));"
            + "</script></div>")
    return html_document(body, page_title, full_page)


def image_page(png: bytes, title: str, page_title: str, full_page: bool = True) -> str:
    """An image explanation's page: ``title`` and the PNG inline as a ``data:`` URI."""
    img = f'<img alt="{esc(title)}" src="{png_data_uri(png)}">'
    return html_document(f'<div class="lucidlm-head">{esc(title)}</div>{img}', page_title, full_page)
