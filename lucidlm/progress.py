"""Progress bars on stderr: one look for the benches and ``lucidlm explain-dataset``.

tqdm is imported only when a bar is made, so importing this module costs nothing.

>>> import io, contextlib
>>> with contextlib.redirect_stderr(io.StringIO()) as err:
...     with progress(2, "demo", unit="step") as bar:
...         bar.update(2)
>>> "demo: 100%" in err.getvalue() and "2/2" in err.getvalue()
True
"""

from __future__ import annotations


def progress(total: float, desc: str, unit: str = "run", **options):
    """A progress bar on stderr (always shown, even when stderr is not a terminal: a bench is
    long, silent work otherwise); ``options`` go to tqdm."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, **options)
