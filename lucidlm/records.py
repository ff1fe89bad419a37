"""Records: JSON objects read from a JSONL file (or given as a list of dicts), each with where it
came from, so that every later error can name ``file:line``. Shared by training
(:mod:`lucidlm.train.data`) and dataset explanations (:mod:`lucidlm.explain.dataset`).

>>> [(r.data, r.source) for r in read_records([{"text": "a"}, {"text": "b"}])]
[({'text': 'a'}, 'record 0'), ({'text': 'b'}, 'record 1')]
>>> read_records([])
Traceback (most recent call last):
...
lucidlm.errors.DataError: data: the dataset is empty (no records)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import DataError


@dataclasses.dataclass(frozen=True)
class Record:
    """One record and where it came from (``source`` is ``file:line`` or ``record N``)."""

    data: dict[str, Any]
    source: str


def read_records(data: str | Path | Sequence[dict[str, Any]]) -> list[Record]:
    """Records from a JSONL path (or a list of dicts). Malformed lines raise :class:`DataError`
    naming ``file:line``; an empty dataset raises too."""
    if isinstance(data, (str, Path)):
        records = list(_read_jsonl(Path(data)))
        where = str(data)
    else:
        records = []
        for n, item in enumerate(data):
            if not isinstance(item, dict):
                raise DataError(f"record {n}: expected a dict, got {type(item).__name__}")
            records.append(Record(item, f"record {n}"))
        where = "data"
    if not records:
        raise DataError(f"{where}: the dataset is empty (no records)")
    return records


def _read_jsonl(path: Path) -> Iterable[Record]:
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected a JSONL dataset, one JSON object per line)")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{n}: not UTF-8 text ({exc})") from None
            if not line:
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(item, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(item).__name__}")
            yield Record(item, f"{path}:{n}")
