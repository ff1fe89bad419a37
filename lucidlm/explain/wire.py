"""The wire format of explanations: the one JSON form that files, the server's ``/v1/explain``,
``explain-dataset`` rows and the viewer all use (README, "Wire format").

A dict with ``"format": "lucidlm.explanation"``, ``"version"`` (:data:`VERSION`), ``"type"``
(``"Explanation"``, ``"GenerationExplanation"``, ``"ImageExplanation"`` or ``"ExplanationDiff"``: the
names of :data:`TYPES`) and then every field of that type. Tensors are (nested) lists, so any JSON reader gets plain numbers; a float JSON cannot
spell is the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``, which Python's ``float()`` and
JavaScript's ``Number()`` both read back. :func:`upgrade` reads the forms older versions wrote.

>>> plain({"relevance": torch.tensor([1.5, float("nan")]), "logit": float("-inf")})
{'relevance': [1.5, 'NaN'], 'logit': '-Infinity'}
>>> unspell([1.5, "NaN", ["Infinity"]])
[1.5, nan, [inf]]
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from ..errors import ExplainError

#: what the ``"format"`` field of every serialised explanation says
FORMAT = "lucidlm.explanation"
#: the version :meth:`to_dict` writes. 1: tensors as ``{"__tensor__": {dtype, shape, data}}``,
#: non-finite floats as ``{"__float__": "nan"}``, no ``format`` field (files saved before the
#: wire format was shared); 2: this module's form.
VERSION = 2
#: every serialised type, by the name its ``"type"`` field holds, and the module that defines it:
#: :func:`result_type` imports that module when a dict of the type is read, so the reader
#: (:func:`lucidlm.explain.explanation.load_dict`) needs no import of the modules that build on it
#: (:mod:`lucidlm.explain.diff_result` imports :mod:`lucidlm.explain.explanation`). A fixed table,
#: not a registry filled at import time.
TYPES: Mapping[str, str] = MappingProxyType({
    "Explanation": "lucidlm.explain.explanation",
    "GenerationExplanation": "lucidlm.explain.explanation",
    "ImageExplanation": "lucidlm.explain.explanation",
    "ExplanationDiff": "lucidlm.explain.diff_result",
})
_TENSOR, _FLOAT = "__tensor__", "__float__"  # version 1's spellings


def spell(x: float) -> float | str:
    """``x``, or the string that stands for it when JSON has no number for it.

    >>> spell(0.5), spell(float("nan")), spell(float("inf"))
    (0.5, 'NaN', 'Infinity')
    """
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def plain(value: Any) -> Any:
    """``value`` as strict JSON can hold it: tensors as nested lists, non-finite floats spelled."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    if isinstance(value, float):
        return spell(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def unspell(value: Any) -> Any:
    """The numbers of a numeric field back: spelled floats (strings) as floats, through lists and
    dicts; anything else as it is (a string that is no number: ExplainError)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ExplainError(f"expected a number, got the string {value!r:.40}") from None
    if isinstance(value, list):
        return [unspell(v) for v in value]
    if isinstance(value, dict):
        return {k: unspell(v) for k, v in value.items()}
    return value


def header(kind: str) -> dict[str, Any]:
    """The fields that open every serialised explanation of type ``kind``."""
    return {"format": FORMAT, "version": VERSION, "type": kind}


def result_type(name: Any) -> type:
    """The class of the serialised type ``name`` (a ``"type"`` field), from :data:`TYPES`.

    >>> result_type("ExplanationDiff").__module__
    'lucidlm.explain.diff_result'
    """
    module = TYPES.get(name) if isinstance(name, str) else None
    if module is None:
        raise ExplainError(f"'type' {name!r}: expected one of {', '.join(TYPES)}")
    return getattr(importlib.import_module(module), name)


def upgrade(data: Any) -> dict[str, Any]:
    """``data`` in the current form, whichever version wrote it: this one, version 1 (and the
    unversioned dicts before it), or an ``explain-dataset`` row of version 1 (no ``type``; the
    score under ``logit``). Raises ExplainError for anything else, or a newer version.

    >>> upgrade({"id": 3, "tokens": ["a"], "relevance": [1.0], "logit": 2.0})["target_logit"]
    2.0
    """
    if not isinstance(data, dict):
        raise ExplainError(f"expected a serialised explanation (a dict), got {type(data).__name__}")
    version = data.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
        raise ExplainError(f"explanation JSON version {version!r} is newer than {VERSION}, the newest "
                           "this lucidlm reads: upgrade lucidlm")
    if "format" in data:
        if data["format"] != FORMAT:
            raise ExplainError(f"format {data['format']!r}: expected {FORMAT!r}")
        return data
    if "type" not in data and "logit" in data and "relevance" in data:  # a version 1 dataset row
        data = {k: v for k, v in data.items() if k != "logit"} | {
            "type": "Explanation", "target_logit": data["logit"]}
    return {k: _read_v1(v) for k, v in data.items()}


def _read_v1(value: Any) -> Any:
    """A version 1 value: tensors and non-finite floats were spelled as tagged dicts."""
    if isinstance(value, list):
        return [_read_v1(v) for v in value]
    if not isinstance(value, dict):
        return value
    if _FLOAT in value:
        return float(value[_FLOAT])
    if _TENSOR not in value:
        return {k: _read_v1(v) for k, v in value.items()}
    spec = value[_TENSOR]
    dtype = getattr(torch, str(spec["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ExplainError(f"tensor dtype {spec['dtype']!r} in JSON: expected a torch dtype name")
    data = [float(x) if isinstance(x, str) else x for x in spec["data"]]
    return torch.tensor(data, dtype=dtype).reshape(spec["shape"])
