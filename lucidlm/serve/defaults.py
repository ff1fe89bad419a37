"""Sampling defaults of the server: what a request that leaves out ``temperature``/``top_p``/``top_k`` gets.

As vLLM does (``--generation-config auto``), the checkpoint's ``generation_config.json`` wins when
it names them; ``"do_sample": false`` there means greedy, whatever else it says. Otherwise the one
server default holds: greedy (``temperature`` 0), the same as the CLI and :meth:`LLM.generate`.

>>> from_generation_config({"temperature": 0.6, "top_p": 0.9, "do_sample": True})
{'temperature': 0.6, 'top_p': 0.9, 'top_k': None, 'source': 'generation_config.json'}
>>> from_generation_config({"do_sample": False, "temperature": 0.6})["temperature"]
0.0
>>> from_generation_config({"eos_token_id": 2})
{'temperature': 0.0, 'top_p': 1.0, 'top_k': None, 'source': 'server default (greedy)'}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: the documented server default: greedy, as the CLI (``lucidlm generate``/``chat``)
SERVER_DEFAULT: dict[str, Any] = {"temperature": 0.0, "top_p": 1.0, "top_k": None}
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")
SERVER_DEFAULT_NOTE = "server default (greedy)"


def from_generation_config(generation: dict[str, Any]) -> dict[str, Any]:
    """The defaults that ``generation`` (a ``generation_config.json``) gives, with their ``source``."""
    given = {k: generation[k] for k in SAMPLING_FIELDS if generation.get(k) is not None}
    if generation.get("do_sample") is False:
        given = {"temperature": 0.0} if given or "do_sample" in generation else {}
    if not given:
        return {**SERVER_DEFAULT, "source": SERVER_DEFAULT_NOTE}
    top_k = given.get("top_k")
    return {"temperature": float(given.get("temperature", 1.0)), "top_p": float(given.get("top_p", 1.0)),
            "top_k": int(top_k) if top_k and top_k > 0 else None, "source": "generation_config.json"}


def sampling_defaults(directory: str | Path | None) -> dict[str, Any]:
    """The defaults for a checkpoint ``directory`` (None, or no readable ``generation_config.json``
    there: the server default)."""
    path = Path(directory) / "generation_config.json" if directory is not None else None
    try:
        generation = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, ValueError):
        generation = {}
    return from_generation_config(generation if isinstance(generation, dict) else {})
