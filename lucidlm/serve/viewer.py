"""The interactive viewer: one self-contained HTML page (inline CSS and JS, nothing fetched).

Without data the page runs in *server mode*: it talks to the lucidlm server it was loaded from
(same origin, relative URLs), streams generations and explains any generated token on click.
With data (the :meth:`~lucidlm.explain.explanation.Explanation.to_dict` of an ``Explanation`` or a
``GenerationExplanation``) it runs in *file mode*: it shows that explanation and calls no server,
so the page can be saved and opened from disk.

>>> page = viewer_page({"type": "Explanation", "tokens": ["</script>"]})
>>> page.count("</script>") == page.count("<script")  # the data cannot close its element early
True
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["viewer_page"]

_STATIC = Path(__file__).parent / "static"
_CSS, _JS, _DATA = "/*__LUCIDLM_CSS__*/", "/*__LUCIDLM_JS__*/", "<!--__LUCIDLM_DATA__-->"


@cache
def _template() -> str:
    """index.html with viewer.css and viewer.js inlined (read once per process)."""
    page = (_STATIC / "index.html").read_text(encoding="utf-8")
    css = (_STATIC / "viewer.css").read_text(encoding="utf-8")
    js = (_STATIC / "viewer.js").read_text(encoding="utf-8")
    # Inline code ends its element at the first "</style" / "</script": the sources must not hold one.
    for name, text, end in (("viewer.css", css, "</style"), ("viewer.js", js, "</script")):
        if end in text.lower():
            raise RuntimeError(f"{name} contains {end!r}, which would end its inline element")
    # str.replace, not str.format: the sources are full of braces
    return page.replace(_CSS, css).replace(_JS, js)


def _script_json(data: Any) -> str:
    """Strict JSON safe inside ``<script type="application/json">``: ``</`` becomes ``<\\/`` (so
    ``</script>`` cannot end the element) and ``<!--`` becomes ``\\u003c!--`` (which would switch
    the HTML parser into its escaped-script state); both read back unchanged with JSON.parse."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("<!--", "\\u003c!--").replace("</", "<\\/")


def viewer_page(data: dict[str, Any] | None = None) -> str:
    """The viewer as one HTML document.

    ``data``: ``None`` for server mode, or the ``to_dict()`` of an ``Explanation`` /
    ``GenerationExplanation`` to show it offline (file mode).
    """
    embedded = ""
    if data is not None:
        embedded = f'<script type="application/json" id="lucidlm-data">{_script_json(data)}</script>'
    return _template().replace(_DATA, embedded)
