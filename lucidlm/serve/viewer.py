"""The interactive viewer: one self-contained HTML page (inline CSS and JS, nothing fetched).

Without data the page runs in *server mode*: it talks to the lucidlm server it was loaded from
(same origin, relative URLs), streams generations and explains any generated token on click.
With data (an ``Explanation``, a ``GenerationExplanation`` or an
:class:`~lucidlm.explain.diff_result.ExplanationDiff`, or its ``to_dict()`` of any version) it runs
in *file mode*: it shows that explanation (a diff as its labelled rows, base, tuned, difference and
adapter, on one colour scale) and calls no server, so the page can be saved and opened from disk.
In server mode against a server with a base model (``lucidlm serve --model BASE --adapter DIR``)
its *diff mode* asks ``/v1/explain`` for ``"diff": true`` and draws the same rows.

The page's code is lucidlm's one JavaScript renderer (:func:`lucidlm.render.html.heatmap_js`, which
the HTML export of a generation inlines too) followed by ``static/viewer.js``; the data is the
explanation's wire form, embedded by the one escaping rule (:func:`lucidlm.render.html.script_json`).

>>> from lucidlm.explain.explanation import Explanation
>>> e = Explanation(["</script>", "<!--"], [], [1.0, -1.0], "x", [], 2.0, "attnlrp")
>>> page = viewer_page(e)
>>> page.count("</script>") == page.count("<script")  # the data cannot close its element early
True
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from ..render.html import heatmap_js, inline_script, script_json

__all__ = ["viewer_page"]

_STATIC = Path(__file__).parent / "static"
_CSS, _JS, _DATA = "/*__LUCIDLM_CSS__*/", "/*__LUCIDLM_JS__*/", "<!--__LUCIDLM_DATA__-->"


@cache
def _template() -> str:
    """index.html with viewer.css, the shared renderer and viewer.js inlined (read once per process)."""
    page = (_STATIC / "index.html").read_text(encoding="utf-8")
    css = (_STATIC / "viewer.css").read_text(encoding="utf-8")
    js = inline_script((_STATIC / "viewer.js").read_text(encoding="utf-8"), "viewer.js")
    # Inline CSS ends its element at the first "</style": the stylesheet must not hold one.
    if "</style" in css.lower():
        raise RuntimeError("viewer.css contains '</style', which would end its inline element")
    # str.replace, not str.format: the sources are full of braces
    return page.replace(_CSS, css).replace(_JS, heatmap_js() + "\n" + js)


def viewer_page(data: Any = None) -> str:
    """The viewer as one HTML document.

    ``data``: ``None`` for server mode; or, to show it offline (file mode), an ``Explanation`` /
    ``GenerationExplanation`` / ``ExplanationDiff`` or its ``to_dict()`` (an older version's is
    upgraded: the page reads the current wire format only).
    """
    embedded = ""
    if data is not None:
        from ..explain.explanation import load_dict

        wire = (load_dict(data) if isinstance(data, dict) else data).to_dict()
        embedded = f'<script type="application/json" id="lucidlm-data">{script_json(wire)}</script>'
    return _template().replace(_DATA, embedded)
